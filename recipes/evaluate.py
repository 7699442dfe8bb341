"""Evaluate a model (optionally with a LoRA adapter) by batched greedy generation.

    defend run evaluate --config evaluate_tiny_mllm model.adapter=runs/ft/adapter
    defend run evaluate --config evaluate_tiny_mllm eval.poison_dir=runs/poison/data

Writes ``predictions.jsonl`` (one row per sample) and ``metrics.json`` into ``output_dir``:
``vqa_accuracy`` (per question type when the data has types) for ``eval.task=vqa``,
``bleu4`` and ``cider`` for ``eval.task=caption``, with the counts they rest on. With
``eval.poison_dir`` (a ``poison`` recipe's output) it evaluates that folder's clean and triggered
test sets and adds ``asr`` (target shown on triggered inputs), ``asr_clean`` (on clean inputs),
``n_triggered`` and ``n_clean``; the target rule is the manifest's ``attack.target``. With
``purify.mask_ratio`` > 0 it generates with DiSP's masked inference (the top vision tokens of each
image by ``purify.selection`` replaced), the inference-time defense alone.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

from torch.utils.data import DataLoader

from defend.atomic import write_json, write_text
from defend.config import Config, TargetConfig
from defend.data import load_samples
from defend.data.manifest import verify_data_folder, verify_dataset_file
from defend.data.samples import Sample
from defend.engine.memory import explain_out_of_memory
from defend.metrics.asr import attack_success
from defend.metrics.captioning import caption_scores
from defend.metrics.intervals import intervals
from defend.metrics.vqa import vqa_accuracy
from defend.models import VisionLanguageModel, load_model
from defend.models.answer_room import check_target_room
from defend.progress import Progress
from defend.purify.masking import MaskedGenerator
from defend.run_dir import start_run

# what decides its output (defend/stage_cache.py: a stage reruns when one of these changes)
READS = ("seed", "plugins", "model", "tiny", "dataset", "quant", "diffusion", "eval", "purify", "train.max_length")
IGNORES = ("purify.actors", "purify.cpus_per_actor", "purify.gpus_per_actor", "purify.retries",
           "diffusion.eps", "diffusion.inverse_t_weight", "diffusion.complementary_mask", "diffusion.labels")


def load_eval_sets(cfg: Config) -> tuple[dict[str, list[Sample]], TargetConfig | None]:
    """``{"clean": [...]}`` from ``dataset``, or the clean and triggered sets of ``eval.poison_dir``."""
    limit = cfg.eval.max_samples
    if cfg.eval.poison_dir is None:
        if cfg.dataset.name == "jsonl":
            verify_dataset_file(cfg.dataset.path)  # a poison/purify run's file: its folder as written
        return {"clean": load_samples(cfg.dataset)[:limit]}, None
    folder = Path(cfg.eval.poison_dir)
    manifest = verify_data_folder(folder, "eval.poison_dir", uses=["test_clean.jsonl", "test_triggered.jsonl"])
    target = TargetConfig(**manifest["attack"]["target"])
    sets = {}
    for name in ("clean", "triggered"):
        dataset = dataclasses.replace(cfg.dataset, name="jsonl", path=str(folder / f"test_{name}.jsonl"),
                                      image_root=None, max_samples=None)
        sets[name] = load_samples(dataset)[:limit]
    sets["triggered"] = sets["triggered"][: cfg.eval.max_triggered_samples]
    return sets, target


def generate_all(vlm: VisionLanguageModel, samples: list[Sample], batch_size: int, desc: str, generate=None,
                 log: logging.Logger | None = None) -> list[str]:
    """Predictions for ``samples``; progress as a bar on a terminal, else a line every ``heartbeat_s``."""
    loader = DataLoader(samples, batch_size=batch_size, collate_fn=vlm.generate_collator())
    predictions: list[str] = []
    knobs = {"eval.batch_size": batch_size, "train.max_length (the prompt budget)": vlm.cfg.train.max_length}
    with Progress(len(samples), desc, unit="rows", every_s=vlm.cfg.heartbeat_s, log=log) as progress:
        for batch in loader:
            with explain_out_of_memory(f"evaluate ({desc})", knobs, batch):
                answers = (generate or vlm.generate)(batch)
            predictions.extend(answers)
            progress.update(len(answers))
    return predictions


def task_metrics(cfg: Config, samples: list[Sample], predictions: list[str]) -> dict:
    references = [s.response for s in samples]
    if cfg.eval.task == "caption":
        return caption_scores(predictions, references)
    types = [s.meta.get("question_type") for s in samples]
    return vqa_accuracy(predictions, references, types if all(types) else None)


def recipe_main(cfg: Config) -> dict:
    out = Path(cfg.output_dir)
    sets, target = load_eval_sets(cfg)
    vlm = load_model(cfg)
    vlm.model.eval()
    for samples in sets.values():
        vlm.generate_collator()(samples[: cfg.eval.batch_size])  # bad rows or lengths fail before any output
    if target is not None:
        check_target_room(cfg, vlm.tokenizer, [(s.id, s.response) for s in sets["triggered"]], target)
    log = start_run(cfg, "evaluate")
    started = time.perf_counter()
    generate = MaskedGenerator(vlm, cfg.purify) if cfg.purify.mask_ratio > 0 else None  # DiSP's masked inference
    predictions = {name: generate_all(vlm, samples, cfg.eval.batch_size, f"evaluate {name}", generate, log)
                   for name, samples in sets.items()}
    seconds = time.perf_counter() - started
    metrics = task_metrics(cfg, sets["clean"], predictions["clean"])
    if target is not None:
        clean = attack_success(predictions["clean"], [s.response for s in sets["clean"]], target)
        triggered = attack_success(predictions["triggered"], [s.response for s in sets["triggered"]], target)
        metrics.update(asr=triggered["asr"], asr_clean=clean["asr"], n_triggered=triggered["n"], n_clean=clean["n"],
                       n_excluded_triggered=triggered["n_excluded"], n_excluded_clean=clean["n_excluded"])
    metrics.update(intervals(metrics))  # 95% Wilson intervals of every proportion (defend/metrics/intervals.py)
    n_total = sum(len(s) for s in sets.values())
    metrics.update(samples_per_second=round(n_total / seconds, 2), generate_seconds=round(seconds, 2))
    rows = [{"set": name, "id": s.id, "prompt": s.prompt, "reference": s.response, "prediction": p,
             **{k: v for k, v in s.meta.items() if k != "clean_response"}}
            for name, samples in sets.items() for s, p in zip(samples, predictions[name])]
    write_text(out / "predictions.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    write_json(out / "metrics.json", metrics)
    log.info("metrics %s", {k: v for k, v in metrics.items() if k in ("vqa_accuracy", "bleu4", "cider", "asr", "asr_clean")})
    return metrics


if __name__ == "__main__":
    from defend.runner import recipe_entry

    recipe_entry(recipe_main)
