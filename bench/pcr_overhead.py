"""PCR's cost against plain fine-tuning on the same batch, measured in one run: optimizer-step time
and memory, for both families. PCR puts the original and the perturbed images through the model in
one forward, twice the rows, so the bar is <= 2.05x.

    python bench/pcr_overhead.py [--steps 50] [--repeats 5] [--batch 8] [--out bench/pcr.json]

Memory is measured two ways: the bytes autograd saves for the backward during one step (the
activations, which PCR doubles; device-independent), and, on a GPU, torch.cuda.max_memory_allocated.
Step times are interleaved (plain, pcr, plain, pcr, ...) and the ratio is the median of the pairs.
A third run, plain fine-tuning with twice the rows per batch, separates what doubling the rows costs
on this hardware from what PCR adds on top (augmentation, the terms, the gate).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from defend.config import load_config  # noqa: E402
from recipes.finetune import FinetuneRecipe  # noqa: E402

# the demo's victim fine-tune (demo_finetune) on random-init tiny models of the demo's shape
SETTINGS = ["model.path=tiny", "dataset.name=easy_vqa", "dataset.max_samples=512", "seed=0", "train.log_every=1000"]


def build(family: str, objective: str, batch: int, out: Path) -> tuple[FinetuneRecipe, dict]:
    cfg = load_config("demo_finetune", [*SETTINGS, f"model.family={family}", f"objective.name={objective}",
                                        f"train.micro_batch_size={batch}", "train.max_steps=100000",
                                        f"output_dir={out / f'{family}-{objective}'}"])
    recipe = FinetuneRecipe(cfg)
    recipe.setup()
    return recipe, next(iter(recipe.loader))


def step(recipe: FinetuneRecipe, batch: dict) -> None:
    loss, _ = recipe.objective(batch, recipe.engine)
    recipe.engine.backward(loss)
    recipe.engine.step()


def timed(recipe: FinetuneRecipe, batch: dict, steps: int) -> float:
    started = time.perf_counter()
    for _ in range(steps):
        step(recipe, batch)
    return (time.perf_counter() - started) / steps


def saved_activation_bytes(recipe: FinetuneRecipe, batch: dict) -> int:
    seen: dict[int, int] = {}

    def pack(tensor):
        seen[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = recipe.objective(batch, recipe.engine)
    recipe.engine.backward(loss)
    recipe.engine.step()
    return sum(seen.values())


def gpu_peak(recipe: FinetuneRecipe, batch: dict) -> float | None:
    if not torch.cuda.is_available():
        return None
    torch.cuda.reset_peak_memory_stats()
    step(recipe, batch)
    return torch.cuda.max_memory_allocated() / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)  # train.micro_batch_size's default
    parser.add_argument("--out", default="bench/pcr.json")
    args = parser.parse_args()
    results = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
               "threads": torch.get_num_threads(), "batch": args.batch, "families": {}}
    with tempfile.TemporaryDirectory() as work:
        for family in ("mllm", "mdlm"):
            runs = {name: build(family, name, args.batch, Path(work)) for name in ("none", "pcr")}
            # plain fine-tuning of twice the rows: what PCR's doubled forward costs without PCR
            runs["none_2x_rows"] = build(family, "none", 2 * args.batch, Path(work) / "2x")
            for recipe, batch in runs.values():  # warm-up
                timed(recipe, batch, 3)
            pairs = []
            for _ in range(args.repeats):
                times = {name: timed(recipe, batch, args.steps) for name, (recipe, batch) in runs.items()}
                pairs.append(times)
            activations = {name: saved_activation_bytes(*run) for name, run in runs.items()}
            peaks = {name: gpu_peak(*run) for name, run in runs.items()}
            ratio = statistics.median(p["pcr"] / p["none"] for p in pairs)
            results["families"][family] = {
                "step_seconds": {name: statistics.median(p[name] for p in pairs) for name in runs},
                "step_time_ratio": round(ratio, 3), "pairs": [round(p["pcr"] / p["none"], 3) for p in pairs],
                "ratio_to_plain_with_2x_rows": round(statistics.median(p["pcr"] / p["none_2x_rows"] for p in pairs), 3),
                "saved_activation_mb": {k: round(v / 2**20, 1) for k, v in activations.items()},
                "activation_ratio": round(activations["pcr"] / activations["none"], 3),
                "activation_ratio_to_2x_rows": round(activations["pcr"] / activations["none_2x_rows"], 3),
                "gpu_peak_mb": peaks}
            for recipe, _ in runs.values():
                recipe.cleanup()
            print(family, json.dumps(results["families"][family]))
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
