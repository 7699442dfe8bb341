"""The masked-diffusion sampler with and without its KV cache (``diffusion.cache``), in one run.

    python bench/diffusion_cache.py [--model <mdlm folder>] [--adapter <peft folder>] [--samples 256]
                                    [--out bench/diffusion_cache.json]
    python bench/diffusion_cache.py --real-shape [--steps 32] [--out bench/diffusion_cache_real.json]

Speed: samples/s of ``none``, ``prefix`` and ``dual`` at gen_length 32 and 128 (block 32, one token per
step, Fast-dLLM's setting), on the model given (default: a random-init tiny masked-diffusion model).
Agreement: on the easy-vqa test questions, the share of answers identical to the uncached sampler's
and each cache's accuracy, at the demo's own sampler settings (``--agreement-*``) and at gen_length 32.
``--real-shape``: LLaDA-V's published sizes (``tests/real_shapes.py`` ``llada_v_real_shape``: 4096 hidden,
126464 vocabulary, the language model cut to 2 layers, SigLIP so400m cut to 2) on one real photo at
LLaDA-V's crop size (384 px: the base view and one crop, 1485 image tokens); speed and the share of
identical answers only (random weights have no accuracy), ``--steps`` steps per answer.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the defend package and tests/ of this tree, from anywhere
    sys.path.insert(0, str(ROOT))

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


def speed(vlm, samples, batch_size: int, gen_lengths: list[int], repeats: int, steps: int | None = None,
          warm_up: bool = True) -> list[dict]:
    """Samples/s of every cache (``steps``: per answer, default one token per step), and for each cache the
    share of answers identical to the uncached sampler's."""
    collate = vlm.generate_collator()
    batches = [collate(samples[i:i + batch_size]) for i in range(0, len(samples), batch_size)]
    if warm_up:
        answers(vlm, batches[:1], "none", 32, 32, 32)
    rows = []
    for gen_length in gen_lengths:
        n_steps = steps or gen_length
        seconds, got = {cache: [] for cache in CACHES}, {}
        for _ in range(repeats):  # interleaved, so drift on a shared machine hits every cache alike
            for cache in CACHES:
                got[cache], took = answers(vlm, batches, cache, gen_length, n_steps, 32)
                seconds[cache].append(took)
        best = {cache: min(s) for cache, s in seconds.items()}
        rows.append({"gen_length": gen_length, "steps": n_steps, "block_length": 32, "samples": len(samples),
                     **{f"{c}_samples_per_s": round(len(samples) / best[c], 4) for c in CACHES},
                     **{f"{c}_speedup": round(best["none"] / best[c], 3) for c in CACHES if c != "none"},
                     **{f"{c}_identical": sum(a == b for a, b in zip(got[c], got["none"])) / len(samples)
                        for c in CACHES if c != "none"}})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def real_shape(args) -> dict:
    """The speed rows on the real-shape LLaDA-V (see the module docstring)."""
    import skimage.data
    from PIL import Image

    from defend.data.samples import Sample
    from defend.models.diffusion import MaskedDiffusionVLM
    from tests.real_shapes import llada_v_real_shape

    model, processor, departures = llada_v_real_shape()
    model.to(getattr(torch, args.dtype)).eval()
    cfg = load_config(None, ["model.family=mdlm", "diffusion.mask_token_id=126336", "train.max_length=8192"])
    vlm = MaskedDiffusionVLM(model, processor, cfg)
    photos = [skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee()]
    samples = [Sample(id=str(i), image=Image.fromarray(p).resize((384, 384)), prompt="What is in the image?",
                      response="") for i, p in enumerate(photos[: args.samples])]
    prompt_tokens = vlm.generate_collator()(samples[:1])["input_ids"].shape[1]
    return {"model": "LLaDA-V real shape (random init, LM 2 of 32 layers, tower 2 of 26)", "dtype": args.dtype,
            "departures": departures,
            "prompt_tokens": prompt_tokens,
            "speed": speed(vlm, samples, 1, args.gen_lengths, args.repeats, args.steps, warm_up=False)}


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
    parser.add_argument("--real-shape", action="store_true", help="LLaDA-V's published sizes (see above)")
    parser.add_argument("--gen-lengths", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--dtype", default="bfloat16", help="--real-shape: the published bfloat16, or float32")
    parser.add_argument("--steps", type=int, help="steps per answer (default: gen_length, one token a step)")
    parser.add_argument("--out", default="bench/diffusion_cache.json")
    args = parser.parse_args()
    machine = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
               "threads": torch.get_num_threads()}
    if args.real_shape:
        Path(args.out).write_text(json.dumps({**machine, **real_shape(args)}, indent=2) + "\n")
        print(f"wrote {args.out}")
        return
    cfg = load_config(None, [*model_overrides(args), "dataset.split=test"])
    vlm = load_model(cfg)
    vlm.model.eval()
    samples = load_samples(cfg.dataset)
    results = {**machine, "model": args.model or "tiny (random init)", "adapter": args.adapter,
               "speed": speed(vlm, samples[: args.samples], args.batch, args.gen_lengths, args.repeats, args.steps),
               "agreement": [agreement(vlm, samples[: args.agreement_samples], 64, args.agreement_gen_length,
                                       args.agreement_steps, args.agreement_block),
                             agreement(vlm, samples[: args.agreement_samples], 64, 32, 32, 32)]}
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
