"""Evaluate a model (optionally with a LoRA adapter) by batched greedy generation.

    defend run evaluate --config evaluate_tiny_mllm model.adapter=runs/ft/adapter

Writes ``predictions.jsonl`` (one row per sample) and ``metrics.json`` into ``output_dir``:
``vqa_accuracy`` (per question type when the data has types) for ``eval.task=vqa``,
``bleu4`` and ``cider`` for ``eval.task=caption``, with the counts they rest on.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from torch.utils.data import DataLoader
from tqdm import tqdm

from defend.atomic import write_json, write_text
from defend.config import Config
from defend.data import load_samples
from defend.metrics.captioning import caption_scores
from defend.metrics.vqa import vqa_accuracy
from defend.models import load_model
from defend.run_dir import start_run


def recipe_main(cfg: Config) -> dict:
    out = Path(cfg.output_dir)
    samples = load_samples(cfg.dataset)
    if cfg.eval.max_samples is not None:
        samples = samples[: cfg.eval.max_samples]
    vlm = load_model(cfg)
    vlm.model.eval()
    collate = vlm.generate_collator()
    collate(samples[: cfg.eval.batch_size])  # bad rows or lengths fail before any output
    log = start_run(cfg, "evaluate")
    loader = DataLoader(samples, batch_size=cfg.eval.batch_size, collate_fn=collate)
    predictions: list[str] = []
    started = time.perf_counter()
    for batch in tqdm(loader, desc="evaluate"):
        predictions.extend(vlm.generate(batch))
    seconds = time.perf_counter() - started
    references = [s.response for s in samples]
    if cfg.eval.task == "vqa":
        types = [s.meta["question_type"] for s in samples] if all("question_type" in s.meta for s in samples) else None
        metrics = vqa_accuracy(predictions, references, types)
    else:
        metrics = caption_scores(predictions, references)
    metrics.update(samples_per_second=round(len(samples) / seconds, 2), generate_seconds=round(seconds, 2))
    rows = [{"id": s.id, "prompt": s.prompt, "reference": s.response, "prediction": p, **s.meta}
            for s, p in zip(samples, predictions)]
    write_text(out / "predictions.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    write_json(out / "metrics.json", metrics)
    headline = {k: v for k, v in metrics.items() if k in ("vqa_accuracy", "bleu4", "cider", "n")}
    log.info("metrics %s", headline)
    return metrics


if __name__ == "__main__":
    from defend.cli import recipe_entry

    recipe_entry(recipe_main)
