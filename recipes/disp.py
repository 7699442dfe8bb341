"""DiSP end to end: purify a poisoned set with its backdoored model, fine-tune on the result, evaluate.

    defend run disp --config disp_tiny_mllm model.path=BASE model.adapter=BACKDOORED/adapter \\
        dataset.path=runs/poison/data/train.jsonl eval.poison_dir=runs/poison/data
    # DiSP + PCR: the recovery fine-tune trains with PCR
    defend run disp --config disp_tiny_mllm ... objective.name=pcr

1. ``purify`` with this config: the backdoored model (``model.path`` + ``model.adapter``)
   re-answers every row of ``dataset.path`` with its most salient vision tokens masked
   (``purify.*``), as a resumable Ray Data job, into ``disp.purify_dir`` (default
   ``output_dir/purify``);
2. ``finetune`` (config ``disp.finetune_config``) of the base ``model.path``, without the backdoored
   adapter, on the purified set, with this config's ``objective`` (PCR, ABL, ... or none);
3. ``evaluate`` (config ``disp.evaluate_config``) of the recovered model on the clean test set and,
   with ``eval.poison_dir`` (a ``poison`` run's data folder), on its triggered copy (``asr``).

``disp.rounds`` > 1 repeats 1-2: round r purifies the same poisoned set again, with the model
recovered in round r-1 in place of the backdoored one (its output in ``output_dir/round<r>/``). A
trigger that survives masking in part (a whole-image one, as SIG) leaves fewer poisoned answers each
round (docs/disp.md, "Rounds").

Each stage is an ordinary recipe run (its output in ``output_dir/<stage>``) and continues where it
stopped when the chain is run again. ``disp.finetune_overrides`` and ``disp.evaluate_overrides``
adjust the later stages. Returns and writes ``output_dir/disp.json``: the last round's purify and
finetune summaries, every round's (``rounds``), and the evaluation's metrics.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from defend.atomic import write_json
from defend.config import Config, ConfigError
from defend.run_dir import start_run
from defend.runner import run_recipe


def check_inputs(cfg: Config) -> None:
    if not cfg.model.adapter:
        raise ConfigError("model.adapter: DiSP purifies with the backdoored model; set it to the victim's adapter"
                          " folder (a finetune run's <output_dir>/adapter).")
    if cfg.eval.poison_dir and not (Path(cfg.eval.poison_dir) / "manifest.json").is_file():
        raise ConfigError(f"eval.poison_dir: '{cfg.eval.poison_dir}' is not a poison run's data folder (no manifest.json).")
    if cfg.disp.rounds < 1:
        raise ConfigError(f"disp.rounds must be at least 1 (purify, then fine-tune), got {cfg.disp.rounds}.")


def section(name: str, value) -> str:
    """An override that sets a whole config section (JSON is YAML)."""
    return f"{name}={json.dumps(dataclasses.asdict(value))}"


def recipe_main(cfg: Config) -> dict:
    check_inputs(cfg)
    log = start_run(cfg, "disp")
    out = Path(cfg.output_dir)
    chain_config = out / "config.yaml"  # written by start_run: the purify stage runs on exactly these settings
    base = [f"seed={cfg.seed}", f"model.family={cfg.model.family}", f"model.path={cfg.model.path}"]

    purifier, rounds = cfg.model.adapter, []
    for r in range(1, cfg.disp.rounds + 1):
        stage = out if r == 1 else out / f"round{r}"
        purify_dir = Path(cfg.disp.purify_dir or out / "purify") if r == 1 else stage / "purify"
        by = "the backdoored model" if r == 1 else f"round {r - 1}'s recovered model"
        log.info("1/3 (round %d of %d) purify %s with %s -> %s", r, cfg.disp.rounds, cfg.dataset.path, by, purify_dir)
        purified = run_recipe("purify", str(chain_config), [f"model.adapter={purifier}", f"output_dir={purify_dir}"])

        log.info("2/3 (round %d of %d) fine-tune the base on the purified set (objective %s)", r, cfg.disp.rounds,
                 cfg.objective.name)
        trained = run_recipe("finetune", cfg.disp.finetune_config, [
            *base, "model.adapter=null", "dataset.name=jsonl", f"dataset.path={purified['data_dir']}/train.jsonl",
            "dataset.max_samples=null", section("objective", cfg.objective), *cfg.disp.finetune_overrides,
            f"output_dir={stage / 'finetune'}"])
        rounds.append({"purify": purified, "finetune": trained})
        purifier = trained["saved"]

    log.info("3/3 evaluate the recovered model")
    poison = [f"eval.poison_dir={cfg.eval.poison_dir}"] if cfg.eval.poison_dir else []
    metrics = run_recipe("evaluate", cfg.disp.evaluate_config, [
        *base, f"model.adapter={trained['saved']}", *poison, *cfg.disp.evaluate_overrides,
        f"output_dir={out / 'evaluate'}"])

    summary = {**rounds[-1], "rounds": rounds, "evaluate": metrics}
    write_json(out / "disp.json", summary)
    shown = {k: round(metrics[k], 3) for k in ("vqa_accuracy", "asr", "asr_clean") if k in metrics}
    log.info("recovered model: %s", shown)
    return summary


if __name__ == "__main__":
    from defend.runner import recipe_entry

    recipe_entry(recipe_main)
