"""The README's first command: clean vs backdoored models of both families on easy-vqa.

    defend run demo --config demo

For each family in ``demo.families`` (autoregressive ``mllm``, masked-diffusion ``mdlm``):
1. pre-train a tiny random-init base: one vision encoder for all families on the words of the
   images' captions (``demo.vision_config``), then each family's language model and projector on
   the questions over that frozen encoder (``demo.pretrain_configs``); results are cached, keyed by
   the stages' settings, so a second run reuses them;
2. LoRA-fine-tune the base on the easy-vqa train questions (``demo.finetune_config``: the
   victim's recipe, adapters on language model, projector and lm_head), and, when
   ``demo.poison_config`` is set, a second time on the same questions with a poisoned share
   (the ``poison`` recipe with ``demo.poison_overrides``, run once for all families: BadNets at 10%
   in the shipped demo);
3. evaluate the base on the full easy-vqa test split, and both fine-tuned models on it and on its
   triggered copy (``vqa_accuracy``, ``asr``, ``asr_clean``).
Ends with a table per family and the demo's goals checked (``demo.goals``), also written to
``results.md`` and ``results.json``.
Each stage is an ordinary recipe run with its own config (``demo.*_config``).
"""
from __future__ import annotations

import time
from pathlib import Path

from defend.atomic import write_json, write_text
from defend.config import Config, ConfigError
from defend.pretrained import pretrained_bases
from defend.run_dir import start_run
from defend.runner import run_recipe

ROWS = ("overall", "yes/no", "color", "shape")


def accuracy_row(metrics: dict) -> dict[str, float]:
    by_type = metrics.get("by_question_type", {})
    row = {"overall": metrics["vqa_accuracy"], **{k: by_type[k]["vqa_accuracy"] for k in ROWS[1:] if k in by_type}}
    return row | {k: metrics[k] for k in ("asr", "asr_clean") if k in metrics}


def goal_checks(result: dict, goals) -> dict[str, bool]:
    """The demo's expectations (``demo.goals``), each true or false."""
    checks = {f"fine-tuned vqa_accuracy >= {goals.min_vqa_accuracy}": result["finetuned"]["overall"] >= goals.min_vqa_accuracy}
    if "backdoored" in result:
        clean, bad = result["finetuned"], result["backdoored"]
        checks.update({
            f"backdoored asr >= {goals.min_asr}": bad["asr"] >= goals.min_asr,
            f"backdoored asr_clean <= {goals.max_asr_clean}": bad["asr_clean"] <= goals.max_asr_clean,
            f"backdoored vqa_accuracy within {goals.max_accuracy_drop} of clean":
                clean["overall"] - bad["overall"] <= goals.max_accuracy_drop,
            f"clean asr <= {goals.max_asr_clean}": clean["asr"] <= goals.max_asr_clean,
        })
    return checks


def family_table(family: str, result: dict) -> str:
    models = [m for m in ("base", "finetuned", "backdoored") if m in result]
    titles = {"base": "base", "finetuned": "clean fine-tune", "backdoored": "backdoored fine-tune"}
    lines = [f"### {family}", "", "| metric | " + " | ".join(titles[m] for m in models) + " |",
             "|---|" + "---|" * len(models)]
    for key in (*ROWS, "asr", "asr_clean"):
        if any(key in result[m] for m in models):
            label = f"vqa_accuracy {key}" if key in ROWS else key
            cells = [f"{result[m][key]:.3f}" if key in result[m] else "-" for m in models]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append(f"| majority-answer baseline | {result['majority_baseline']:.3f} |" + " |" * (len(models) - 1))
    timing = ", ".join(f"{k} {v:.0f}s" for k, v in result["seconds"].items())
    checks = [f"- [{'x' if ok else ' '}] {name}" for name, ok in result["checks"].items()]
    return "\n".join(lines + ["", f"n = {result['n']} test questions; {timing}", "", *checks, ""])


def recipe_main(cfg: Config) -> dict:
    unknown = set(cfg.demo.finetune_overrides) - set(cfg.demo.families)
    if unknown:
        raise ConfigError(f"demo.finetune_overrides: {sorted(unknown)} not in demo.families {cfg.demo.families}.")
    log = start_run(cfg, "demo")
    out = Path(cfg.output_dir)
    started = time.perf_counter()
    poison_dir = None
    if cfg.demo.poison_config:
        poisoned = run_recipe("poison", cfg.demo.poison_config, [*cfg.demo.poison_overrides, f"output_dir={out / 'poison'}"])
        poison_dir = poisoned["data_dir"]
    bases, pretrain_s = pretrained_bases(cfg, out / "pretrain", log)
    results = {}
    for family in cfg.demo.families:
        fam_out = out / family
        base = bases[family]
        common = [f"seed={cfg.seed}", f"model.family={family}", f"model.path={base}"]

        def finetune(name: str, *extra: str) -> str:
            summary = run_recipe("finetune", cfg.demo.finetune_config.format(family=family),
                                 [*common, *cfg.demo.finetune_overrides.get(family, []),
                                  f"output_dir={fam_out / name}", *extra])
            return summary["saved"]

        def evaluate(name: str, *extra: str) -> dict:
            return run_recipe("evaluate", cfg.demo.evaluate_config.format(family=family),
                              [*common, f"output_dir={fam_out / name}", *extra])

        t0 = time.perf_counter()
        adapters = {"finetuned": finetune("finetune")}
        if poison_dir:
            adapters["backdoored"] = finetune("finetune_backdoored", "dataset.name=jsonl",
                                              f"dataset.path={poison_dir}/train.jsonl")
        t1 = time.perf_counter()
        metrics = {"base": evaluate("eval_base")}
        for name, adapter in adapters.items():
            with_poison = [f"eval.poison_dir={poison_dir}"] if poison_dir else []
            metrics[name] = evaluate(f"eval_{name}", f"model.adapter={adapter}", *with_poison)
        t2 = time.perf_counter()
        result = {name: accuracy_row(m) for name, m in metrics.items()}
        result.update(majority_baseline=metrics["finetuned"]["majority_baseline"], n=metrics["finetuned"]["n"],
                      seconds={"pretrain": pretrain_s[family], "finetune": t1 - t0, "evaluate": t2 - t1})
        result["checks"] = goal_checks(result, cfg.demo.goals)
        results[family] = result
        log.info("%s: %s", family, {m: {k: round(v, 3) for k, v in result[m].items()} for m in metrics})
    total = time.perf_counter() - started
    report = "\n".join(family_table(f, r) for f, r in results.items()) + f"\ntotal {total:.0f}s\n"
    write_text(out / "results.md", report)
    write_json(out / "results.json", {"families": results, "total_seconds": total,
                                      "vision_pretrain_seconds": pretrain_s.get("vision", 0.0)})
    print("\n" + report)
    return results


if __name__ == "__main__":
    from defend.runner import recipe_entry

    recipe_entry(recipe_main)
