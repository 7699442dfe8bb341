"""Training throughput and peak memory per rank of the finetune recipe under ZeRO-2, ZeRO-3 and
QLoRA on the tiny model, 1 and 2 processes, and the ratio of our step time to a plain DeepSpeed
loop (bench/reference_loop.py) with the same model, batches and config, measured in the same run.

    python bench/train_throughput.py [--steps 60] [--repeats 3] [--out bench/train.json]

Times cover the steps after the first 10 (warm-up), from the recipe's own loss log.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


MODEL = ["model.path=tiny", "dataset.name=easy_vqa", "dataset.max_samples=4000", "train.micro_batch_size=16",
         "train.max_length=128", "train.log_every=10", "seed=0"]
CASES = [  # name, nproc, overrides
    ("zero2", 1, ["deepspeed=zero2"]),
    ("zero2", 2, ["deepspeed=zero2"]),
    ("zero3", 1, ["deepspeed=zero3"]),
    ("zero3", 2, ["deepspeed=zero3"]),
    ("zero3_offload", 2, ["deepspeed=zero3_offload"]),
    ("qlora_zero2", 1, ["deepspeed=zero2", "quant.load_in_4bit=true"]),
    ("qlora_zero2", 2, ["deepspeed=zero2", "quant.load_in_4bit=true"]),
    ("qlora_zero3", 2, ["deepspeed=zero3", "quant.load_in_4bit=true"]),
]
WARMUP = 10


def torchrun(nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]


def ours(nproc: int, overrides: list[str], steps: int, work: Path) -> dict:
    out = work / f"ours-{nproc}-{'-'.join(o.split('=')[1] for o in overrides)}"
    command = [*torchrun(nproc), "-m", "defend.cli", "run", "finetune", "--config", "finetune_tiny_mllm", *MODEL,
               *overrides, f"train.max_steps={steps}", f"output_dir={out}"]
    subprocess.run(command, check=True, capture_output=True)
    log = {r["step"]: r["elapsed_s"] for r in map(json.loads, (out / "train_log.jsonl").read_text().splitlines())}
    summary = json.loads((out / "train_summary.json").read_text())
    return {"step_seconds": (log[steps] - log[WARMUP]) / (steps - WARMUP),
            "peak_memory_mb_per_rank": summary["peak_memory_mb_per_rank"]}


def reference(nproc: int, overrides: list[str], steps: int, work: Path) -> float:
    out = work / f"reference-{nproc}.json"
    command = [*torchrun(nproc), str(Path(__file__).with_name("reference_loop.py")), str(out), str(steps),
               *MODEL, *overrides]
    subprocess.run(command, check=True, capture_output=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    marks = json.loads(out.read_text())["step_marks"]
    return (marks[steps - 1] - marks[WARMUP - 1]) / (steps - WARMUP)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--out", default="bench/train.json")
    parser.add_argument("--repeats", type=int, default=3, help="ours/reference pairs per zero2 case (median)")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name, nproc, overrides in CASES:
            result = ours(nproc, overrides, args.steps, work)
            samples = 16 * nproc / result["step_seconds"]
            row = {"case": name, "nproc": nproc, "samples_per_second": round(samples, 1),
                   "step_seconds": round(result["step_seconds"], 4),
                   "peak_memory_mb_per_rank": result["peak_memory_mb_per_rank"]}
            if name == "zero2":  # the plain DeepSpeed loop, same model/batches/config, same run, interleaved
                pairs = [(ours(nproc, overrides, args.steps, work)["step_seconds"],
                          reference(nproc, overrides, args.steps, work)) for _ in range(args.repeats)]
                ratios = sorted(a / b for a, b in pairs)
                row.update(reference_step_seconds=round(statistics.median(b for _, b in pairs), 4),
                           ratio_to_reference=round(statistics.median(ratios), 3),
                           ratios=[round(r, 3) for r in ratios])
            rows.append(row)
            print(json.dumps(row), flush=True)
    report = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "threads": os.environ.get("OMP_NUM_THREADS"), "steps": args.steps, "rows": rows}
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
