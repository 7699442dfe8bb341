"""DiSP purification as a Ray Data actor pool: throughput with 2 actors against 1, and the peak memory
of the driver and of each actor as the dataset grows 10x. Each run is the `purify` recipe in a fresh
process (embedded local Ray), one thread per actor, the same random-init tiny model of the demo's
shape, 45% of the vision tokens masked by saliency (K=1), 2-token answers (easy-vqa).

    python bench/purify_scaling.py [--rows 3000] [--small 300] [--out bench/purify_scaling.json]

Throughput is the steady state: rows after the first finished block over the time after it (actor
start and model load excluded; they are reported apart). Bars (issue 6): 2 actors >= 1.6x one
actor's rows/s on 2 cores; peak RSS of the driver and of an actor flat (within 10%) from --small to
10x --small rows.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def write_rows(path: Path, n: int) -> None:
    """n easy-vqa training questions as a jsonl file purify reads (images cycle past the split's end)."""
    from defend.config import load_config
    from defend.data import load_samples

    samples = load_samples(load_config(None, ["dataset.split=train", f"dataset.max_samples={min(n, 38575)}"]).dataset)
    with path.open("w") as out:
        for i in range(n):
            s = samples[i % len(samples)]
            out.write(json.dumps({"id": f"row{i}", "image": str(s.image), "prompt": s.prompt, "response": s.response}) + "\n")


def purify(source: Path, out: Path, actors: int) -> dict:
    command = [sys.executable, "-m", "defend.cli", "run", "purify", "--config", "purify_tiny_mllm",
               "model.path=tiny", f"dataset.path={source}",
               f"output_dir={out}", f"purify.actors={actors}", "purify.cpus_per_actor=1", "purify.mask_ratio=0.45",
               "purify.block_size=100", "purify.batch_size=50", "eval.max_new_tokens=2", "train.max_length=96"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    subprocess.run(command, check=True, capture_output=True, env=env, cwd=ROOT, timeout=1800)
    summary = json.loads((out / "purify_summary.json").read_text())
    steady_rows = summary["rows"] + summary["quarantined"] - 100  # after the first block
    steady = steady_rows / (summary["purify_seconds"] - summary["seconds_to_first_block"])
    return {"actors": actors, "rows": summary["rows"], "seconds": summary["purify_seconds"],
            "startup_seconds": summary["seconds_to_first_block"], "steady_rows_per_s": round(steady, 1),
            "peak_rss_mb": summary["peak_rss_mb"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=3000)
    parser.add_argument("--small", type=int, default=300)
    parser.add_argument("--out", default=str(ROOT / "bench" / "purify_scaling.json"))
    args = parser.parse_args()
    from defend.engine.ray_env import ensure_local_ray_config

    ensure_local_ray_config()
    results = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        big, small = tmp / "big.jsonl", tmp / "small.jsonl"
        write_rows(big, args.rows)
        write_rows(small, args.small)
        one, two = purify(big, tmp / "one", 1), purify(big, tmp / "two", 2)
        results["scaling"] = {"one_actor": one, "two_actors": two,
                              "speedup": round(two["steady_rows_per_s"] / one["steady_rows_per_s"], 2),
                              "speedup_wall": round(one["seconds"] / two["seconds"], 2)}
        print(json.dumps(results["scaling"]), flush=True)
        small_run = purify(small, tmp / "small", 2)
        results["memory"] = {"rows": [args.small, args.rows],
                             "driver_peak_rss_mb": [small_run["peak_rss_mb"]["driver"], two["peak_rss_mb"]["driver"]],
                             "actor_peak_rss_mb": [max(small_run["peak_rss_mb"]["actors"]),
                                                   max(two["peak_rss_mb"]["actors"])]}
        print(json.dumps(results["memory"]), flush=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
