"""DiSP's masked inference on one backdoored model at every mask ratio x vision-token selection.

How far attack success falls and what clean accuracy costs, per ratio and selection method.

    defend run disp_sweep --config disp_sweep model.path=<base> model.adapter=<backdoored adapter> \\
        eval.poison_dir=<poison recipe's data folder>

Each point is an ``evaluate`` run (``sweep.evaluate_config`` + ``sweep.evaluate_overrides``) with
``purify.mask_ratio`` and ``purify.selection`` set; the unmasked model (ratio 0) is run once and
starts every line. The other ``purify`` keys (replacement, saliency, saliency_top_k, saliency_samples, seed) apply to all.
Writes ``sweep.json`` (a row per point), ``sweep.md`` and ``sweep.png`` (ASR and clean accuracy
against the mask ratio, a line per selection) into ``output_dir``; a rerun reuses finished points.
"""
from __future__ import annotations

from pathlib import Path

from defend.atomic import write_json, write_text
from defend.config import Config, ConfigError
from defend.models.tiny import TINY_PATH
from defend.results.plots import mask_ratio_sweep_plot
from defend.run_dir import start_run
from defend.runner import run_recipe
from defend.stage_cache import run_once, stage_settings

METRICS = ("asr", "asr_clean", "vqa_accuracy")


def check(cfg: Config) -> None:
    if not cfg.eval.poison_dir:
        raise ConfigError("eval.poison_dir: the sweep measures attack success; give the poison recipe's data folder.")
    bad = [r for r in cfg.sweep.mask_ratios if not 0 <= r < 1]
    if bad or not cfg.sweep.mask_ratios or not cfg.sweep.selections:
        raise ConfigError(f"sweep.mask_ratios: ratios in [0, 1) and at least one selection, got {cfg.sweep.mask_ratios}"
                          f" and {cfg.sweep.selections}.")


def point(cfg: Config, folder: Path, selection: str, ratio: float, log) -> dict:
    """One evaluate run, a stage: reused when the folder holds a finished run of the same settings (those
    the evaluate recipe reads, from the evaluate config's file as it is now and the overrides)."""
    p = cfg.purify
    overrides = [f"seed={cfg.seed}", f"model.family={cfg.model.family}", f"model.path={cfg.model.path}",
                 f"model.adapter={cfg.model.adapter or 'null'}", f"eval.poison_dir={cfg.eval.poison_dir}",
                 f"purify.mask_ratio={ratio}", f"purify.selection={selection}", f"purify.replacement={p.replacement}",
                 f"purify.saliency={p.saliency}", f"purify.saliency_top_k={p.saliency_top_k}",
                 f"purify.saliency_samples={p.saliency_samples}", f"purify.seed={p.seed}", *cfg.sweep.evaluate_overrides]
    if cfg.model.path == TINY_PATH:  # a random-init tiny model (tests): of the architecture asked for
        overrides.append(f"tiny.arch={cfg.tiny.arch}")

    def work(folder: Path) -> dict:
        metrics = run_recipe("evaluate", cfg.sweep.evaluate_config, [*overrides, f"output_dir={folder}"])
        return {k: metrics[k] for k in (*METRICS, "samples_per_second")}

    return run_once(folder, stage_settings("evaluate", cfg.sweep.evaluate_config, overrides), work, log)


def sweep_markdown(rows: list[dict], cfg: Config) -> str:
    lines = [f"# DiSP mask-ratio sweep ({cfg.model.family}, adapter {cfg.model.adapter})", "",
             "| selection | mask_ratio | asr | asr_clean | vqa_accuracy | samples/s |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['selection']} | {r['mask_ratio']:g} | {r['asr']:.3f} | {r['asr_clean']:.3f} | {r['vqa_accuracy']:.3f}"
              f" | {r['samples_per_second']:.0f} |" for r in rows]
    return "\n".join(lines) + "\n"


def recipe_main(cfg: Config) -> list[dict]:
    check(cfg)
    log = start_run(cfg, "disp_sweep")
    out = Path(cfg.output_dir)
    unmasked = point(cfg, out / "unmasked", cfg.sweep.selections[0], 0.0, log) if 0 in cfg.sweep.mask_ratios else None
    rows = []
    for selection in cfg.sweep.selections:
        for ratio in cfg.sweep.mask_ratios:
            metrics = unmasked if ratio == 0 else point(cfg, out / f"{selection}_{ratio:g}", selection, ratio, log)
            rows.append({"family": cfg.model.family, "selection": selection, "mask_ratio": ratio, **metrics})
            log.info("%s %.2f: %s", selection, ratio, {k: round(metrics[k], 3) for k in METRICS})
    write_json(out / "sweep.json", rows)
    write_text(out / "sweep.md", sweep_markdown(rows, cfg))
    mask_ratio_sweep_plot(rows, out / "sweep.png")
    print("\n" + sweep_markdown(rows, cfg))
    return rows


if __name__ == "__main__":
    from defend.runner import recipe_entry

    recipe_entry(recipe_main)
