"""The masked-diffusion sampler with and without its KV cache (``diffusion.cache``), in one run.

    python bench/diffusion_cache.py [--model <mdlm folder>] [--adapter <peft folder>] [--samples 256]
                                    [--out bench/diffusion_cache.json]

Speed: samples/s of ``none``, ``prefix`` and ``dual`` at gen_length 32 and 128 (block 32, one token per
step, Fast-dLLM's setting), on the model given (default: a random-init tiny masked-diffusion model).
Agreement: on the easy-vqa test questions, the share of answers identical to the uncached sampler's
and each cache's accuracy, at the demo's own sampler settings (``--agreement-*``) and at gen_length 32.
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from defend.config import load_config
from defend.data import load_samples
from defend.metrics.vqa import vqa_accuracy
from defend.models import load_model

CACHES = ("none", "prefix", "dual")
TINY = ["model.path=tiny", "model.family=mdlm", "tiny.vision_hidden=64", "tiny.text_hidden=128", "tiny.text_layers=4",
        "tiny.vision_layers=1", "tiny.heads=4", "tiny.patch_size=8", "train.max_length=512"]


def model_overrides(args) -> list[str]:
    if not args.model:
        return TINY
    return [f"model.path={args.model}", "model.family=mdlm", "train.max_length=512",
            *([f"model.adapter={args.adapter}"] if args.adapter else [])]


def answers(vlm, batches, cache: str, gen_length: int, steps: int, block: int) -> tuple[list[str], float]:
    d = vlm.cfg.diffusion
    d.cache, d.gen_length, d.steps, d.block_length = cache, gen_length, steps, block
    out, started = [], time.perf_counter()
    for batch in batches:
        out.extend(vlm.generate(batch))
    return out, time.perf_counter() - started


def speed(vlm, samples, batch_size: int, gen_lengths: list[int], repeats: int) -> list[dict]:
    collate = vlm.generate_collator()
    batches = [collate(samples[i:i + batch_size]) for i in range(0, len(samples), batch_size)]
    answers(vlm, batches[:1], "none", 32, 32, 32)  # warm-up
    rows = []
    for gen_length in gen_lengths:
        seconds = {cache: [] for cache in CACHES}
        for _ in range(repeats):  # interleaved, so drift on a shared machine hits every cache alike
            for cache in CACHES:
                seconds[cache].append(answers(vlm, batches, cache, gen_length, gen_length, 32)[1])
        best = {cache: min(s) for cache, s in seconds.items()}
        rows.append({"gen_length": gen_length, "steps": gen_length, "block_length": 32, "samples": len(samples),
                     **{f"{c}_samples_per_s": round(len(samples) / best[c], 3) for c in CACHES},
                     **{f"{c}_speedup": round(best["none"] / best[c], 3) for c in CACHES if c != "none"}})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def agreement(vlm, samples, batch_size: int, gen_length: int, steps: int, block: int) -> dict:
    collate = vlm.generate_collator()
    batches = [collate(samples[i:i + batch_size]) for i in range(0, len(samples), batch_size)]
    got = {cache: answers(vlm, batches, cache, gen_length, steps, block)[0] for cache in CACHES}
    truth = [s.response for s in samples]
    row = {"gen_length": gen_length, "steps": steps, "block_length": block, "samples": len(samples)}
    for cache in CACHES:
        row[f"{cache}_accuracy"] = round(vqa_accuracy(got[cache], truth)["vqa_accuracy"], 4)
        if cache != "none":
            row[f"{cache}_identical"] = round(sum(a == b for a, b in zip(got[cache], got["none"])) / len(samples), 4)
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model")
    parser.add_argument("--adapter")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--agreement-samples", type=int, default=1000)
    parser.add_argument("--agreement-gen-length", type=int, default=8)
    parser.add_argument("--agreement-steps", type=int, default=8)
    parser.add_argument("--agreement-block", type=int, default=8)
    parser.add_argument("--out", default="bench/diffusion_cache.json")
    args = parser.parse_args()
    cfg = load_config(None, [*model_overrides(args), "dataset.split=test"])
    vlm = load_model(cfg)
    vlm.model.eval()
    samples = load_samples(cfg.dataset)
    results = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
               "threads": torch.get_num_threads(), "model": args.model or "tiny (random init)",
               "adapter": args.adapter,
               "speed": speed(vlm, samples[: args.samples], args.batch, [32, 128], args.repeats),
               "agreement": [agreement(vlm, samples[: args.agreement_samples], 64, args.agreement_gen_length,
                                       args.agreement_steps, args.agreement_block),
                             agreement(vlm, samples[: args.agreement_samples], 64, 32, 32, 32)]}
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
