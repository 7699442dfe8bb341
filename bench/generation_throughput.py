"""Generation throughput of both families on the tiny models, batch sizes 1 and 32.

    python bench/generation_throughput.py [--samples 64] [--out bench/generation.json]

Reports samples/s per (family, batch size) and, for the masked-diffusion sampler, the language
model forward passes per batch (it must equal diffusion.steps) and the vision tower passes.
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from defend.config import load_config
from defend.data import load_samples
from defend.models import load_model

BATCH_SIZES = (1, 32)


def measure(family: str, batch_size: int, samples: list, overrides: list[str]) -> dict:
    cfg = load_config(f"evaluate_tiny_{family}", overrides)
    vlm = load_model(cfg)
    vlm.model.eval()
    collate = vlm.generate_collator()
    batches = [collate(samples[i:i + batch_size]) for i in range(0, len(samples), batch_size)]
    lm_calls, vision_calls = [], []
    lm = vlm.model.model.language_model
    hooks = [lm.register_forward_hook(lambda *a: lm_calls.append(1)),
             vlm.model.model.vision_tower.register_forward_hook(lambda *a: vision_calls.append(1))]
    vlm.generate(batches[0])  # warm-up
    lm_calls.clear()
    vision_calls.clear()
    started = time.perf_counter()
    for batch in batches:
        vlm.generate(batch)
    seconds = time.perf_counter() - started
    for hook in hooks:
        hook.remove()
    return {
        "family": family,
        "batch_size": batch_size,
        "samples": len(samples),
        "samples_per_s": round(len(samples) / seconds, 2),
        "lm_forwards_per_batch": round(len(lm_calls) / len(batches), 2),
        "vision_forwards_per_batch": round(len(vision_calls) / len(batches), 2),
        "max_new_tokens_or_steps": cfg.diffusion.steps if family == "mdlm" else cfg.eval.max_new_tokens,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--out", default="bench/generation.json")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    samples = load_samples(load_config("evaluate_tiny_mllm").dataset)[: args.samples]
    rows = [measure(f, b, samples, args.overrides) for f in ("mllm", "mdlm") for b in BATCH_SIZES]
    meta = {"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__}
    for row in rows:
        print(json.dumps(row))
    with open(args.out, "w") as handle:
        json.dump({"meta": meta, "rows": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
