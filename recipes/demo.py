"""The README's first command: pre-train, LoRA-fine-tune and evaluate both model families on easy-vqa.

    defend run demo --config demo

For each family in ``demo.families`` (autoregressive ``mllm``, masked-diffusion ``mdlm``):
1. pre-train a tiny random-init base (all weights) through the stages ``demo.pretrain_configs``;
   the result is cached, keyed by the stages' settings, so a second run reuses it;
2. LoRA-fine-tune the base on the easy-vqa train questions (language model only);
3. evaluate base and fine-tuned model on the full easy-vqa test split.
Ends with a table per family, also written to ``results.md`` and ``results.json``.
Each stage is an ordinary recipe run with its own config (``demo.*_config``).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from pathlib import Path

import defend
from defend.atomic import atomic_dir, write_json, write_text
from defend.cli import run_recipe
from defend.config import Config, load_config
from defend.models.tiny import cache_root
from defend.run_dir import start_run

ROWS = ("overall", "yes/no", "color", "shape")


def pretrained_base(cfg: Config, family: str, out: Path, log) -> tuple[Path, float]:
    """The pre-trained base of ``family``: from the cache, or trained now (stage by stage) and cached."""
    names = [name.format(family=family) for name in cfg.demo.pretrain_configs]
    settings: list = [defend.__version__]
    for name in names:
        stage = dataclasses.asdict(load_config(name, [f"seed={cfg.seed}", f"model.family={family}"]))
        stage.pop("output_dir")
        settings.append(stage)
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    cached = cache_root() / "pretrained" / f"{family}-{key}"
    if cfg.demo.reuse_pretrained and (cached / "config.json").is_file():
        log.info("%s: reusing the pre-trained base cached at %s", family, cached)
        return cached, 0.0
    started = time.perf_counter()
    model_path: list[str] = []  # the first stage starts from its own model.path
    for n, name in enumerate(names):
        summary = run_recipe("finetune", name, [f"seed={cfg.seed}", f"model.family={family}",
                                                f"output_dir={out / f'pretrain{n}'}", *model_path])
        model_path = [f"model.path={summary['saved']}"]
    with atomic_dir(cached) as tmp:
        shutil.copytree(summary["saved"], tmp, dirs_exist_ok=True)
    return cached, time.perf_counter() - started


def accuracy_row(metrics: dict) -> dict[str, float]:
    by_type = metrics.get("by_question_type", {})
    return {"overall": metrics["vqa_accuracy"], **{k: by_type[k]["vqa_accuracy"] for k in ROWS[1:] if k in by_type}}


def family_table(family: str, result: dict) -> str:
    lines = [f"### {family}", "", "| vqa_accuracy | base | fine-tuned |", "|---|---|---|"]
    for row in ROWS:
        lines.append(f"| {row} | {result['base'].get(row, float('nan')):.3f} | {result['finetuned'].get(row, float('nan')):.3f} |")
    lines.append(f"| majority-answer baseline | {result['majority_baseline']:.3f} | |")
    timing = ", ".join(f"{k} {v:.0f}s" for k, v in result["seconds"].items())
    return "\n".join(lines + ["", f"n = {result['n']} test questions; {timing}", ""])


def recipe_main(cfg: Config) -> dict:
    log = start_run(cfg, "demo")
    out = Path(cfg.output_dir)
    started = time.perf_counter()
    results = {}
    for family in cfg.demo.families:
        fam_out = out / family
        base, pretrain_s = pretrained_base(cfg, family, fam_out, log)
        t0 = time.perf_counter()
        finetuned = run_recipe("finetune", cfg.demo.finetune_config.format(family=family),
                               [f"seed={cfg.seed}", f"model.family={family}", f"model.path={base}",
                                f"output_dir={fam_out / 'finetune'}"])
        t1 = time.perf_counter()
        evaluate = cfg.demo.evaluate_config.format(family=family)
        common = [f"model.family={family}", f"model.path={base}"]
        base_metrics = run_recipe("evaluate", evaluate, [*common, f"output_dir={fam_out / 'eval_base'}"])
        ft_metrics = run_recipe("evaluate", evaluate, [*common, f"model.adapter={finetuned['saved']}",
                                                      f"output_dir={fam_out / 'eval_finetuned'}"])
        t2 = time.perf_counter()
        results[family] = {
            "base": accuracy_row(base_metrics),
            "finetuned": accuracy_row(ft_metrics),
            "majority_baseline": ft_metrics["majority_baseline"],
            "n": ft_metrics["n"],
            "seconds": {"pretrain": pretrain_s, "finetune": t1 - t0, "evaluate": t2 - t1},
        }
        log.info("%s: base %.3f -> fine-tuned %.3f", family, results[family]["base"]["overall"],
                 results[family]["finetuned"]["overall"])
    total = time.perf_counter() - started
    report = "\n".join(family_table(f, r) for f, r in results.items()) + f"\ntotal {total:.0f}s\n"
    write_text(out / "results.md", report)
    write_json(out / "results.json", {"families": results, "total_seconds": total})
    print("\n" + report)
    return results


if __name__ == "__main__":
    from defend.cli import recipe_entry

    recipe_entry(recipe_main)
