"""Defense objectives on 2 ranks under ZeRO, started as users start them."""
import json

import pytest

from tests.distributed.runs import finetune, losses

TWO_RANKS = ["launcher=torchrun", "nproc=2", "train.max_steps=3"]
PCR = ["objective.name=pcr", "objective.pcr.patch_size=16"]


def terms(out):
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def test_pcr_under_zero3_gives_the_zero2_losses(tmp_path):
    finetune(tmp_path / "zero2", *TWO_RANKS, *PCR, "deepspeed=zero2")
    finetune(tmp_path / "zero3", *TWO_RANKS, *PCR, "deepspeed=zero3")
    zero2, zero3 = losses(tmp_path / "zero2"), losses(tmp_path / "zero3")
    assert list(zero3) == [1, 2, 3]
    for step, loss in zero2.items():
        assert zero3[step] == pytest.approx(loss, rel=1e-4, abs=1e-5), step
    assert all("pcr_discrepancy" in r and "pcr_entropy" in r for r in terms(tmp_path / "zero3"))
    assert (tmp_path / "zero3" / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("objective", [PCR, ["objective.name=[pcr, abl]", "objective.pcr.patch_size=16",
                                             "objective.abl.isolation_steps=1", "objective.abl.unlearn_batch_size=2"]])
def test_defense_objectives_on_the_diffusion_model_under_zero3(tmp_path, objective):
    # ABL's unlearning adds a second forward per step on every rank: ZeRO-3 gathers must stay in step
    out = tmp_path / "run"
    finetune(out, *TWO_RANKS, *objective, "deepspeed=zero3", "model.family=mdlm")
    logged = terms(out)
    assert [r["step"] for r in logged] == [1, 2, 3]
    if "abl" in objective[0]:
        assert logged[0]["abl_unlearn"] == 0 and logged[2]["abl_unlearn"] < 0 and logged[2]["abl_isolated"] >= 1
