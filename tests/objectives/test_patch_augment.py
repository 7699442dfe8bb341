"""PCR's second view: which pixels change, and how."""
import pytest
import torch

from defend.data.patch_augment import patch_augment


def images(n=3, size=36):
    # a border of 4 px that does not fill a whole 8 px patch; values distinct per pixel
    return torch.arange(n * 3 * size * size, dtype=torch.float32).reshape(n, 3, size, size) + 1


def changed_patches(before, after, s=8):
    rows, cols = before.shape[2] // s, before.shape[3] // s
    diff = (before != after).any(1)  # (n, H, W)
    return diff[:, : rows * s, : cols * s].reshape(-1, rows, s, cols, s).any(4).any(2)  # (n, rows, cols)


@pytest.mark.parametrize("mode", ["shuffle", "mask", "noise"])
def test_the_chosen_fraction_of_patches_changes_and_nothing_else(mode):
    x = images()
    out = patch_augment(x, 8, 0.5, mode, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == x.dtype
    changed = changed_patches(x, out)
    assert changed.sum((1, 2)).tolist() == [8, 8, 8]  # round(0.5 * 16) patches of each image
    assert torch.equal(out[:, :, 32:, :], x[:, :, 32:, :]) and torch.equal(out[:, :, :, 32:], x[:, :, :, 32:])
    unchanged = ~changed.repeat_interleave(8, 1).repeat_interleave(8, 2)  # (n, 32, 32)
    body_x, body_out = x[:, :, :32, :32], out[:, :, :32, :32]
    assert torch.equal(body_out.permute(1, 0, 2, 3)[:, unchanged], body_x.permute(1, 0, 2, 3)[:, unchanged])
    assert torch.equal(x, images())  # the input itself is left alone
    if mode == "mask":
        assert (body_out.permute(1, 0, 2, 3)[:, ~unchanged] == 0).all()


def test_shuffle_moves_whole_patches_among_the_chosen_positions():
    x = images(n=1)
    out = patch_augment(x, 8, 0.75, "shuffle", torch.Generator().manual_seed(1))

    def patches(t):
        return [t[0, :, r * 8:(r + 1) * 8, c * 8:(c + 1) * 8] for r in range(4) for c in range(4)]

    before, after = patches(x), patches(out)
    assert sorted(p.sum().item() for p in before) == sorted(p.sum().item() for p in after)
    for p in after:  # every output patch is one of the input patches, intact
        assert any(torch.equal(p, q) for q in before)


def test_the_same_generator_state_gives_the_same_view_and_fraction_zero_changes_nothing():
    x = images()
    a = patch_augment(x, 8, 0.3, "noise", torch.Generator().manual_seed(5))
    b = patch_augment(x, 8, 0.3, "noise", torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    assert torch.equal(patch_augment(x, 8, 0.0, "mask", torch.Generator()), x)


def test_bad_shapes_and_modes_are_refused():
    with pytest.raises(ValueError, match="larger than"):
        patch_augment(images(size=8), 16, 0.5, "mask", torch.Generator())
    with pytest.raises(ValueError, match="unknown patch augmentation mode"):
        patch_augment(images(), 8, 0.5, "blur", torch.Generator())
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        patch_augment(torch.zeros(4, 10), 8, 0.5, "mask", torch.Generator())
