"""LoRA and QLoRA under ZeRO-2, ZeRO-3 and ZeRO-3 with CPU offload, 2 ranks over gloo, as users start them."""
import json

import pytest
import torch

from defend.config import load_config
from defend.models import load_model
from tests.distributed.runs import finetune, losses

TWO_RANKS = ["launcher=torchrun", "nproc=2", "train.max_steps=3"]


@pytest.fixture(scope="module")
def stage_runs(tmp_path_factory):
    """The same 3-step LoRA run under each stage (same seed, same data, same 2 ranks)."""
    root = tmp_path_factory.mktemp("stages")
    runs = {}
    for stage in ("zero2", "zero3", "zero3_offload"):
        finetune(root / stage, *TWO_RANKS, f"deepspeed={stage}")
        runs[stage] = root / stage
    return runs


def test_losses_of_zero2_zero3_and_offload_agree(stage_runs):
    per_stage = {stage: losses(out) for stage, out in stage_runs.items()}
    assert list(per_stage["zero2"]) == [1, 2, 3]
    for stage in ("zero3", "zero3_offload"):
        for step, loss in per_stage["zero2"].items():
            assert per_stage[stage][step] == pytest.approx(loss, rel=1e-4, abs=1e-5), (stage, step)
    assert per_stage["zero2"][3] != per_stage["zero2"][1]  # it trained


def test_adapter_saved_under_zero3_is_whole_and_loads_with_peft(stage_runs):
    out = stage_runs["zero3"]
    adapter = out / "adapter"
    from safetensors.torch import load_file

    weights = load_file(adapter / "adapter_model.safetensors")
    assert weights and all(t.numel() > 0 for t in weights.values())  # gathered, not empty shards
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["r"] == 4
    model = load_model(load_config(str(out / "config.yaml"), ["launcher=none", "deepspeed=zero0",
                                                              f"model.adapter={adapter}"])).model
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # B starts at zero: nonzero means trained weights


@pytest.mark.parametrize("family, stage, quant", [
    ("mdlm", "zero2", "false"),
    ("mdlm", "zero3", "false"),
    ("mllm", "zero2", "true"),
    ("mllm", "zero3", "true"),
    ("mdlm", "zero3", "true"),
])
def test_lora_and_qlora_train_under_zero_for_both_families(tmp_path, family, stage, quant):
    out = tmp_path / "run"
    finetune(out, *TWO_RANKS, f"deepspeed={stage}", f"model.family={family}", f"quant.load_in_4bit={quant}")
    logged = losses(out)
    assert list(logged) == [1, 2, 3] and all(torch.isfinite(torch.tensor(v)) for v in logged.values())
    from safetensors.torch import load_file

    saved = load_file(out / "adapter" / "adapter_model.safetensors")
    lora_b = [w for name, w in saved.items() if "lora_B" in name]
    assert lora_b and any(w.abs().sum() > 0 for w in lora_b)  # B starts at zero: it was trained and saved whole


def test_the_deepspeed_launcher_runs_the_same_recipe(tmp_path):
    out = tmp_path / "run"
    finetune(out, "launcher=deepspeed", "nproc=2", "train.max_steps=2", "deepspeed=zero2")
    assert list(losses(out)) == [1, 2]
    assert (out / "adapter" / "adapter_config.json").is_file()
