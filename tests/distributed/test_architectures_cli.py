"""Every architecture through the CLI as a user runs it: PCR fine-tuning under ZeRO-3 on 2 ranks, DiSP's
masked evaluation of the adapter it saved, and purification of a training set with it on a real
local Ray. The slowest cells of the architecture matrix (tests/models/test_architectures.py has the rest)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from defend.models.archs import TINY_ARCHS
from tests.conftest import TINY_TEST_OVERRIDES
from tests.distributed.runs import defend, finetune, write_rows


@pytest.fixture(scope="module")
def rows(tmp_path_factory) -> tuple[Path, list[str]]:
    path = tmp_path_factory.mktemp("rows") / "train.jsonl"
    return path, write_rows(path, 6)


@pytest.mark.parametrize("arch", list(TINY_ARCHS))
def test_pcr_under_zero3_then_masked_evaluate_then_purify_on_ray(arch, tmp_path, rows):
    tiny = f"tiny.arch={arch}"
    train = tmp_path / "finetune"
    finetune(train, "launcher=torchrun", "nproc=2", "deepspeed=zero3", "objective.name=pcr", "train.max_steps=2",
             "dataset.max_samples=16", tiny)
    logged = [json.loads(line) for line in (train / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [1, 2] and all(torch.isfinite(torch.tensor(r["loss"])) for r in logged)
    assert all("pcr_discrepancy" in r for r in logged)
    from safetensors.torch import load_file

    saved = load_file(train / "adapter" / "adapter_model.safetensors")  # gathered whole from the 2 ranks
    assert any(w.abs().sum() > 0 for name, w in saved.items() if "lora_B" in name)

    adapter = f"model.adapter={train / 'adapter'}"
    evaluated = tmp_path / "evaluate"
    defend("run", "evaluate", "--config", "evaluate_tiny_mllm", *TINY_TEST_OVERRIDES, tiny, adapter,
           "purify.mask_ratio=0.45", "dataset.max_samples=4", "eval.max_samples=4", "eval.max_new_tokens=3",
           f"output_dir={evaluated}")
    predictions = (evaluated / "predictions.jsonl").read_text().splitlines()
    assert len(predictions) == 4 and "vqa_accuracy" in json.loads((evaluated / "metrics.json").read_text())

    source, ids = rows
    purified = tmp_path / "purify"
    defend("run", "purify", "--config", "purify_tiny_mllm", *TINY_TEST_OVERRIDES, tiny, adapter,
           f"dataset.path={source}", "purify.batch_size=4", "eval.max_new_tokens=3", f"output_dir={purified}")
    out = [json.loads(line) for line in (purified / "data" / "train.jsonl").read_text().splitlines()]
    assert [r["id"] for r in out] == ids and all(isinstance(r["response"], str) for r in out)
