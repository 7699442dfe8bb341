"""Each trigger puts what it should where it should, deterministically, and touches nothing else."""
import numpy as np
import pytest
import skimage.data
from PIL import Image

from defend.config import ConfigError, load_config
from defend.data.attacks import build_trigger

RNG = np.random.default_rng(123)
IMAGE = RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)


def attack(*overrides):
    return load_config(None, list(overrides)).attack


def test_badnets_checker_patch_sits_in_the_chosen_corner_only():
    trigger = build_trigger(attack("attack.name=badnets", "attack.badnets.size=8", "attack.badnets.location=bottom_right"))
    out = trigger.image(IMAGE, np.random.default_rng(0))
    patch = out[56:, 56:]
    assert set(np.unique(patch)) == {0, 255}
    assert patch[0, 0, 0] == 0 and patch[0, 1, 0] == 255 and patch[1, 1, 0] == 0  # a checkerboard
    untouched = np.ones((64, 64), bool)
    untouched[56:, 56:] = False
    assert np.array_equal(out[untouched], IMAGE[untouched])


def test_badnets_top_left_solid_and_random_locations():
    solid = build_trigger(attack("attack.badnets.kind=solid", "attack.badnets.location=top_left", "attack.badnets.size=5"))
    out = solid.image(IMAGE, np.random.default_rng(0))
    assert (out[:5, :5] == 255).all() and np.array_equal(out[5:], IMAGE[5:])
    noise = build_trigger(attack("attack.badnets.kind=noise", "attack.badnets.location=random", "attack.badnets.size=6"))
    a = noise.image(IMAGE, np.random.default_rng(1))
    b = noise.image(IMAGE, np.random.default_rng(2))
    where_a = np.argwhere((a != IMAGE).any(-1))
    where_b = np.argwhere((b != IMAGE).any(-1))
    assert not np.array_equal(where_a.min(0), where_b.min(0))  # random location moves
    top, left = where_a.min(0)
    assert np.array_equal(a[top:top + 6, left:left + 6], noise.patch)  # the same noise pattern everywhere


def test_blended_mixes_the_key_image_with_alpha():
    trigger = build_trigger(attack("attack.name=blended", "attack.blended.key_image=skimage:astronaut", "attack.blended.alpha=0.2"))
    out = trigger.image(IMAGE, np.random.default_rng(0))
    key = np.asarray(Image.fromarray(skimage.data.astronaut()).resize((64, 64), Image.BILINEAR), dtype=np.float32)
    expected = np.clip(np.rint(0.8 * IMAGE + 0.2 * key), 0, 255)
    assert np.abs(out.astype(float) - expected).max() <= 1


def test_sig_adds_a_horizontal_sinusoid():
    flat = np.full((64, 64, 3), 128, dtype=np.uint8)
    trigger = build_trigger(attack("attack.name=sig", "attack.sig.amplitude=20", "attack.sig.frequency=6"))
    out = trigger.image(flat, np.random.default_rng(0)).astype(float) - 128
    wave = 20 * np.sin(2 * np.pi * np.arange(64) * 6 / 64)
    assert np.abs(out[10, :, 0] - wave).max() <= 0.5
    assert np.array_equal(out[0], out[63])  # constant down each column


def test_wanet_warps_smoothly_and_identically_for_every_image():
    trigger = build_trigger(attack("attack.name=wanet", "attack.wanet.grid_k=4", "attack.wanet.strength=1.0"))
    gradient = np.repeat(np.repeat(np.arange(64, dtype=np.uint8)[None, :, None] * 4, 64, 0), 3, 2)
    out = trigger.image(gradient, np.random.default_rng(0))
    diff = np.abs(out.astype(int) - gradient.astype(int))
    assert diff.max() > 0 and diff.mean() < 8  # a visible but small warp
    again = build_trigger(attack("attack.name=wanet", "attack.wanet.grid_k=4", "attack.wanet.strength=1.0"))
    assert np.array_equal(again.image(gradient, np.random.default_rng(5)), out)


def test_text_trigger_changes_the_prompt_not_the_image():
    trigger = build_trigger(attack("attack.name=text", "attack.text.phrase=cf", "attack.text.position=start"))
    assert trigger.prompt("what color is the shape?") == "cf what color is the shape?"
    assert np.array_equal(trigger.image(IMAGE, np.random.default_rng(0)), IMAGE)


def test_trojvlm_requires_an_inserted_target():
    with pytest.raises(ConfigError, match="attack.target.type=insert"):
        build_trigger(attack("attack.name=trojvlm", "attack.target.type=fixed"))
    trigger = build_trigger(attack("attack.name=trojvlm", "attack.target.type=insert"))
    assert not np.array_equal(trigger.image(IMAGE, np.random.default_rng(0)), IMAGE)


def test_unknown_attack_name_is_a_config_error():
    with pytest.raises(ConfigError, match=r"'attack\.name': unknown attack 'badnet'; known: badnets, blended.*"
                                          r"Did you mean 'badnets'\?"):
        load_config(None, ["attack.name=badnet"])


def test_attack_settings_are_checked_against_the_chosen_attacks_own_dataclass():
    with pytest.raises(ConfigError, match=r"unknown config key 'attack\.blended\.alpah'. Did you mean"
                                          r" 'attack\.blended\.alpha'\?"):
        load_config(None, ["attack.name=blended", "attack.blended.alpah=0.2"])
    with pytest.raises(ConfigError, match=r"attack 'blended' reads its settings from attack\.blended\.\*: did you"
                                          r" mean 'attack\.blended\.alpha'\?"):  # the flat key of before
        load_config(None, ["attack.name=blended", "attack.alpha=0.2"])
    with pytest.raises(ConfigError, match=r"attack\.blended\.alpha must be in \(0, 1\], got 1\.5"):
        load_config(None, ["attack.name=blended", "attack.blended.alpha=1.5"])
    with pytest.raises(ConfigError, match=r"'attack\.wanet\.grid_k' must be int"):
        load_config(None, ["attack.name=wanet", "attack.wanet.grid_k=four"])
    cfg = load_config(None, ["attack.name=sig"])
    assert cfg.attack.params == cfg.attack.sig and cfg.attack.sig.amplitude == 60.0
    assert not hasattr(cfg.attack, "blended")  # only what the run reads


def test_key_image_that_does_not_exist_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"attack\.blended\.key_image: '.*missing\.png' does not exist"):
        build_trigger(attack("attack.name=blended", f"attack.blended.key_image={tmp_path / 'missing.png'}"))
    with pytest.raises(ConfigError, match="scikit-image has no image 'astronot'"):
        build_trigger(attack("attack.name=blended", "attack.blended.key_image=skimage:astronot"))


ATTACK_PLUGIN = '''"""An attack of our own: one pixel of a chosen grey level in the top-left corner."""
from dataclasses import dataclass

from defend.data.attacks import ATTACKS
from defend.data.attacks.trigger import Trigger


@dataclass
class DotConfig:
    level: int = 255


@ATTACKS.register("dot", config=DotConfig)
class DotTrigger(Trigger):
    def image(self, img, rng):
        out = img.copy()
        out[0, 0] = self.params.level
        return out
'''


def test_an_attack_in_one_file_is_named_and_configured_like_a_built_in_one(tmp_path, monkeypatch):
    (tmp_path / "dot_attack.py").write_text(ATTACK_PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    trigger = build_trigger(attack("plugins=[dot_attack]", "attack.name=dot", "attack.dot.level=7"))
    out = trigger.image(IMAGE, np.random.default_rng(0))
    assert (out[0, 0] == 7).all() and np.array_equal(out[1:], IMAGE[1:])
    with pytest.raises(ConfigError, match=r"Did you mean 'attack\.dot\.level'\?"):
        attack("plugins=[dot_attack]", "attack.name=dot", "attack.dot.levle=7")
