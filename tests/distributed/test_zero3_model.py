"""ZeRO-3 on 2 ranks: the model is built sharded, text-only batches on one rank do not hang the
other, and the saved adapter reproduces the trained model's logits on one process."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from defend.config import load_config
from defend.models import load_model
from tests.distributed.runs import SMALL_RUN

WORKER = Path(__file__).with_name("zero3_worker.py")


@pytest.mark.parametrize("family", ["mllm", "mdlm"])
def test_zero3_adapter_roundtrip_with_mixed_batches(tmp_path, family):
    out = tmp_path / "run"
    out.mkdir()
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", str(WORKER), str(out), family,
               *SMALL_RUN, "deepspeed=zero3", "train.max_steps=2"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    # a hang (a rank waiting in the vision tower for the other) ends in the timeout, as a failure
    done = subprocess.run(command, capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stderr[-4000:]

    saved = torch.load(out / "trained_logits.pt", weights_only=False)
    cfg = load_config(str(out / "config.yaml"), ["deepspeed=zero0", f"model.adapter={out / 'adapter'}"])
    vlm = load_model(cfg)
    vlm.model.eval()
    with torch.no_grad():
        logits = vlm.model(**vlm.model_inputs(saved["probe"])).logits
    torch.testing.assert_close(logits, saved["logits"], rtol=1e-4, atol=1e-4)
