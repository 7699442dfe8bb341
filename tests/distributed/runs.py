"""Run `defend` as users do, in a subprocess, on the small tiny model; read what runs leave behind."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import TINY_TEST_OVERRIDES

# a few easy-vqa questions, 2 ranks x 4 per step, every line of the loss log
SMALL_RUN = [*TINY_TEST_OVERRIDES, "dataset.name=easy_vqa", "dataset.max_samples=48", "train.micro_batch_size=4",
             "train.lr=1e-2", "train.log_every=1", "lora.r=4", "lora.alpha=8", "seed=0"]


def defend(*args: str, timeout: float = 300, check: bool = True, cwd: Path | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "defend.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)
    if check and done.returncode != 0:
        raise AssertionError(f"defend {' '.join(args)} exited {done.returncode}:\n{done.stderr[-4000:]}")
    return done


def finetune(out: Path, *overrides: str, **kwargs) -> subprocess.CompletedProcess:
    return defend("run", "finetune", "--config", "finetune_tiny_mllm", *SMALL_RUN, f"output_dir={out}", *overrides,
                  **kwargs)


def losses(out: Path) -> dict[int, float]:
    """Per-step losses of a run logged with train.log_every=1."""
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "train_log.jsonl").read_text().splitlines())}


def write_rows(path: Path, n: int) -> list[str]:
    """``n`` easy-vqa test questions as a jsonl training set (id, image path, prompt, response); their ids."""
    from defend.config import load_config
    from defend.data import load_samples

    samples = load_samples(load_config(None, ["dataset.split=test", f"dataset.max_samples={n}"]).dataset)
    path.write_text("".join(json.dumps({"id": s.id, "image": str(s.image), "prompt": s.prompt,
                                        "response": s.response}) + "\n" for s in samples))
    return [s.id for s in samples]
