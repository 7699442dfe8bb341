"""DiSP's cost at inference: masked generation (saliency with K sampled labels, top 45% of the
vision tokens masked) against plain generation, same model, same batches, measured in one run.
Bar: K=1 keeps >= 0.5 of plain generation's samples/s. Three answer lengths (2, 8, 32 tokens): the
saliency pass costs about one forward and one backward whatever the length, so its share falls as
answers grow; ``ms_per_batch`` splits a masked batch into image features, saliency and generation.

    python bench/purify_throughput.py [--samples 256] [--batch 32] [--repeats 3] [--out bench/purify.json]

Times are interleaved (plain, masked, plain, masked, ...); the ratio is the median of the pairs.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from defend.config import load_config  # noqa: E402
from defend.data import load_samples  # noqa: E402
from defend.models import load_model  # noqa: E402
from defend.purify.masking import MaskedGenerator, replacement_rows, top_fraction  # noqa: E402
from defend.purify.saliency import vision_token_scores  # noqa: E402


def samples_per_second(generate, batches, n: int) -> float:
    started = time.perf_counter()
    for batch in batches:
        generate(batch)
    return n / (time.perf_counter() - started)


def part_milliseconds(vlm, purify, batches) -> dict[str, float]:
    """Where a masked batch's time goes (ms per batch, K=1): image features, the saliency pass, and
    generation from the masked features; and plain generation of the same batch."""
    totals = dict.fromkeys(("plain_generate", "image_features", "saliency", "masked_generate"), 0.0)
    generator = torch.Generator().manual_seed(0)
    for batch in batches:
        marks = [time.perf_counter()]
        vlm.generate(batch)
        marks.append(time.perf_counter())
        with torch.no_grad():
            tokens = vlm.vision_tokens(batch)
        marks.append(time.perf_counter())
        scores = vision_token_scores(vlm, batch, "saliency", 1, generator, tokens)
        marks.append(time.perf_counter())
        with torch.no_grad():
            fill = replacement_rows(vlm, tokens, "mean")
            chosen = top_fraction(scores, tokens.counts, purify.mask_ratio)
            masked = torch.where(chosen.unsqueeze(1), fill, tokens.features)
        vlm.generate(batch, features=masked)
        marks.append(time.perf_counter())
        for name, begin, finish in zip(totals, marks, marks[1:]):
            totals[name] += finish - begin
    return {k: round(1000 * v / len(batches), 2) for k, v in totals.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="bench/purify.json")
    args = parser.parse_args()
    results = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
               "threads": torch.get_num_threads(), "samples": args.samples, "batch": args.batch, "families": {}}
    lengths = {"2 tokens (easy-vqa answers, 1 denoising step)": [],
               **{f"{n} tokens ({n} denoising steps)": [f"eval.max_new_tokens={n}", f"diffusion.gen_length={n}",
                                                        f"diffusion.steps={n}", f"diffusion.block_length={n}"]
                  for n in (8, 32)}}
    for family, (length, extra) in [(f, item) for f in ("mllm", "mdlm") for item in lengths.items()]:
        # the demo's evaluation settings on a random-init tiny model of the demo's shape
        cfg = load_config("demo_evaluate", [f"model.family={family}", "model.path=tiny", "purify.mask_ratio=0.45",
                                            *extra])
        vlm = load_model(cfg)
        vlm.model.eval()
        samples = load_samples(cfg.dataset)[: args.samples]
        collate = vlm.generate_collator()
        batches = [collate(samples[i:i + args.batch]) for i in range(0, len(samples), args.batch)]
        row = {}
        for k in (1, 4):
            cfg.purify.saliency_samples = k
            masked = MaskedGenerator(vlm, cfg.purify)
            masked(batches[0]), vlm.generate(batches[0])  # warm-up
            pairs = [(samples_per_second(vlm.generate, batches, len(samples)),
                      samples_per_second(masked, batches, len(samples))) for _ in range(args.repeats)]
            row[f"K={k}"] = {"plain_samples_per_s": round(statistics.median(p for p, _ in pairs), 1),
                             "masked_samples_per_s": round(statistics.median(m for _, m in pairs), 1),
                             "ratio": round(statistics.median(m / p for p, m in pairs), 3)}
        cfg.purify.saliency_samples = 1
        row["ms_per_batch"] = part_milliseconds(vlm, cfg.purify, batches)
        results["families"].setdefault(family, {})[length] = row
        print(family, length, json.dumps(row))
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
