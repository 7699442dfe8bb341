"""bench/gpu_check.py --smoke: the device check's code path, on CPU with a shrunk LLaVA-1.5 config,
writes every figure the GPU run reports (positive and finite)."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FIGURES = {
    "model": ["total_params", "lm_params", "lm_matmul_params", "lm_head_params", "vision_params", "build_s"],
    "generate": ["tokens_per_s", "samples_per_s", "batch_s", "new_tokens_per_row", "peak_memory_gb"],
    "purify": ["batches_per_s", "samples_per_s", "batch_s", "peak_memory_gb"],
    "train": ["tokens_per_s", "samples_per_s", "step_s", "tflops", "mfu", "mfu_6n", "flops_per_step",
              "lora_params", "loss", "peak_memory_gb"],
}


def positive_finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


@pytest.mark.parametrize("model", ["llava_1_5", "llada_v"])
def test_gpu_check_smoke(tmp_path, model):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "RAY_USAGE_STATS_ENABLED": "0",
           "TOKENIZERS_PARALLELISM": "false"}
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--smoke", "--model", model, "--out", str(out)],
                         check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(out.read_text())

    assert result["errors"] == {}
    assert result["smoke"] is True
    assert result["device"].startswith("cpu")
    for name in ("torch", "transformers", "peft", "deepspeed"):
        assert result["versions"][name] and not result["versions"][name].startswith("missing"), name
    assert positive_finite(result["peak_tflops"]) and positive_finite(result["elapsed_s"])
    for stage, keys in FIGURES.items():
        for key in keys:
            assert positive_finite(result[stage].get(key)), f"{stage}.{key} = {result[stage].get(key)!r}"

    train = result["train"]
    assert train["engine"] == "deepspeed" and train["zero_stage"] == 2
    assert train["lora_r"] == 16
    assert train["lora_targets"] == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                            "down_proj"])
    assert train["seq_len"] == result["args"]["seq_len"]  # rows filled to the asked length
    assert train["losses_finite"]
    assert train["flops_parts"]["total"] == train["flops_per_step"]
    assert result["generate"]["new_tokens_per_row"] <= result["args"]["new_tokens"]
    assert result["model"]["attn_implementation"] == "sdpa"
    if model == "llada_v":  # the masked-diffusion family at LLaDA-V's layout: 1485 vision tokens, every answer slot
        assert result["model"]["family"] == "mdlm" and result["model"]["text"]["vocab_size"] == 126464
        assert result["generate"]["prompt_tokens"] > 1485 and result["train"]["crops"] == 2 * train["batch"]
        assert result["generate"]["new_tokens_per_row"] == result["args"]["new_tokens"]
    else:
        assert result["model"]["text"]["vocab_size"] == 32064
    assert "smoke=True" in run.stdout and "MFU" in run.stdout
