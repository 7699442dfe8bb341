"""Build a poisoned training set and the test sets that measure the backdoor.

    defend run poison --config poison_badnets_easy_vqa attack.poison_ratio=0.05

Writes ``output_dir/data/`` in one piece (temp folder, then rename):
- ``train.jsonl``: the training set, exactly ``round(poison_ratio * n)`` rows poisoned (trigger on the
  image/prompt, target in the response; ``poisoned`` and ``clean_response`` columns kept);
- ``test_clean.jsonl`` and ``test_triggered.jsonl``: the test split as is, and with the trigger
  (references stay the clean answers; ASR is measured against ``attack.target``);
- ``images/``: every image the attack changed, as PNG;
- ``manifest.json``: attack parameters, counts, poisoned ids, sha256 of every file written.
The same config gives byte-identical output.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from defend.atomic import atomic_dir, write_json
from defend.config import Config
from defend.data import load_samples
from defend.data.attacks import build_trigger, plan_poison, poison_sample, trigger_sample
from defend.data.attacks.poisoning import sample_rng
from defend.data.manifest import file_sizes
from defend.data.samples import Sample
from defend.data.writing import check_file_ids, sha256_file, write_jsonl_set
from defend.progress import track
from defend.run_dir import start_run


# what decides its output (defend/stage_cache.py: a stage reruns when one of these changes)
READS = ("plugins", "dataset", "attack")


def triggered_copy(sample: Sample, trigger, cfg: Config, index: int) -> Sample:
    image, prompt = trigger_sample(sample, trigger, sample_rng(cfg.attack, index))
    return dataclasses.replace(sample, image=image, prompt=prompt, meta={**sample.meta, "triggered": True})


def recipe_main(cfg: Config) -> dict:
    trigger = build_trigger(cfg.attack)
    train = load_samples(cfg.dataset)
    test = load_samples(cfg.dataset, split="test")
    check_file_ids(train, "images/train")  # before any output: the ids name the image files
    check_file_ids(test, "images/test_triggered")
    plan = plan_poison(train, cfg.attack)
    log = start_run(cfg, "poison")
    chosen = set(plan.poisoned)
    poisoned = [
        poison_sample(s, trigger, cfg.attack, sample_rng(cfg.attack, i)) if i in chosen else s
        for i, s in enumerate(track(train, "poison train", unit="rows", every_s=cfg.heartbeat_s, log=log))
    ]
    triggered = [triggered_copy(s, trigger, cfg, i)
                 for i, s in enumerate(track(test, "trigger test", unit="rows", every_s=cfg.heartbeat_s, log=log))]
    target = Path(cfg.output_dir) / "data"
    with atomic_dir(target) as tmp:
        write_jsonl_set(poisoned, tmp, "train.jsonl", "images/train")
        write_jsonl_set(test, tmp, "test_clean.jsonl", "images/test_clean")
        write_jsonl_set(triggered, tmp, "test_triggered.jsonl", "images/test_triggered")
        files = {str(p.relative_to(tmp)): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        manifest = {
            "attack": dataclasses.asdict(cfg.attack),
            "dataset": dataclasses.asdict(cfg.dataset),
            "counts": {"train": plan.n_rows, "poisoned": len(plan.poisoned), "eligible": plan.n_eligible,
                       "test_clean": len(test), "test_triggered": len(triggered)},
            "poisoned_ids": [train[i].id for i in plan.poisoned],
            "files": files,
            "sizes": file_sizes(tmp, files),  # what readers check (defend/data/manifest.py)
        }
        write_json(tmp / "manifest.json", manifest)
    log.info("poisoned %d of %d rows with %s -> %s", len(plan.poisoned), plan.n_rows, cfg.attack.name, target)
    return {"data_dir": str(target), **manifest["counts"]}


if __name__ == "__main__":
    from defend.runner import recipe_entry

    recipe_entry(recipe_main)
