"""``defense_results``' rows -> goals checked and the Markdown tables of RESULTS.md.

A row is one cell: task, family, attack, seed, defense, and its metrics with their 95% intervals. The
reference rows ``base`` (the pre-trained base) and ``clean`` (fine-tuned on unpoisoned data) give each
defense's ``gain_kept``: the share of the clean fine-tune's quality gain over the base that it keeps
(1: all of it; 0: it learned nothing; a defense that keeps ASR at 0 by not learning shows up here)."""
from __future__ import annotations

import statistics
from datetime import date

from defend.config import Config
from defend.metrics.intervals import with_interval

REFERENCES = ("base", "clean")
QUALITY = {"vqa": "vqa_accuracy", "caption": "cider"}


def quality_metric(task: str) -> str:
    return QUALITY.get(task, "vqa_accuracy")


def victim_key(row: dict) -> tuple:
    """The victim a row belongs to: task, family, attack (the references are run for its first seed)."""
    return row["task"], row["family"], row["attack"]


def references(rows: list[dict]) -> dict[tuple, dict[str, dict]]:
    """victim_key -> {"base": row, "clean": row} (those present)."""
    found: dict[tuple, dict[str, dict]] = {}
    for r in rows:
        if r["defense"] in REFERENCES:
            found.setdefault(victim_key(r), {})[r["defense"]] = r
    return found


def add_gains(rows: list[dict], min_gain: float = 0.0) -> None:
    """``gain_kept`` on every fine-tuned row of a (task, family, attack) that has both references; None
    where the clean fine-tune gained less than ``min_gain`` over the base (a share of a gain within the
    noise says nothing: on VQA the clean fine-tune gains -0.001, and a defense "kept 2.50" of it)."""
    refs = references(rows)
    for r in rows:
        q, mine = quality_metric(r["task"]), refs.get(victim_key(r), {})
        if r["defense"] in REFERENCES or not set(REFERENCES) <= set(mine):
            continue
        base, gain = mine["base"][q], mine["clean"][q] - mine["base"][q]
        r["gain_kept"] = round((r[q] - base) / gain, 4) if gain > 0 and gain >= min_gain else None


def implanted(undefended: dict, min_asr: float) -> bool:
    """Whether the attack worked on the undefended victim (otherwise a defense has nothing to remove)."""
    return undefended["asr"] >= min_asr


def goal_checks(rows: list[dict], cfg: Config) -> list[tuple[str, bool]]:
    """Every goal of ``results.victim_goals`` (per victim) and ``results.goals`` (per defense row)."""
    vg = cfg.results.victim_goals
    undefended = {(*victim_key(r), r["seed"]): r for r in rows if r["defense"] == "none"}
    refs = references(rows)
    checks = []
    for r in rows:
        q = quality_metric(r["task"])
        where = f"{r['task']} {r['family']} {r['attack']} seed {r['seed']} {r['defense']}"
        if r["defense"] == "none":
            checks.append((f"{where}: asr {r['asr']:.3f} >= {vg.min_asr} (the attack implants)", r["asr"] >= vg.min_asr))
            checks.append((f"{where}: asr_clean {r['asr_clean']:.3f} <= {vg.max_asr_clean}", r["asr_clean"] <= vg.max_asr_clean))
        if r["defense"] == "clean":
            base = refs[victim_key(r)].get("base")
            if base is not None:
                gain = r[q] - base[q]
                checks.append((f"{where}: {q} {gain:+.3f} over the base's {base[q]:.3f} (at least {vg.min_clean_gain})",
                               gain >= vg.min_clean_gain))
        goals = cfg.results.goals.get(r["defense"])
        victim = undefended.get((*victim_key(r), r["seed"]))
        if goals is None or victim is None:
            continue
        vacuous = "" if implanted(victim, vg.min_asr) else f" (vacuous: the attack did not implant, undefended asr {victim['asr']:.3f})"
        checks.append((f"{where}: asr {r['asr']:.3f} <= {goals.max_asr}{vacuous}", r["asr"] <= goals.max_asr))
        if goals.max_accuracy_drop is not None:
            drop = victim[q] - r[q]
            checks.append((f"{where}: {q} {-drop:+.3f} vs undefended, within {goals.max_accuracy_drop}",
                           drop <= goals.max_accuracy_drop))
        if goals.min_accuracy_ratio is not None:
            ratio = r[q] / victim[q] if victim[q] else 0.0
            checks.append((f"{where}: {q} {ratio:.3f} of undefended, at least {goals.min_accuracy_ratio}",
                           ratio >= goals.min_accuracy_ratio))
    return checks


def cell_text(group: list[dict], name: str) -> str:
    """One seed: ``value [low, high]``; several: ``mean ± sd (v1 / v2 / v3)``; missing: blank."""
    values = [r[name] for r in group if r.get(name) is not None]
    if not values:
        return ""
    if len(group) == 1:
        return with_interval(group[0], name)
    shown = " / ".join(f"{v:.3f}" for v in values)
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f} ({shown})"


def results_markdown(rows: list[dict], checks: list[tuple[str, bool]], cfg: Config) -> str:
    lines = ["# Defense results", "",
             f"Generated by the `defense_results` recipe (`make results`) on {date.today()}; do not edit by"
             " hand (rerun the recipe: finished cells are reused).", "",
             f"Victims: the demo's pre-trained tiny bases, LoRA-fine-tuned with `{cfg.demo.finetune_config}` on the"
             " task's training set with part of it poisoned (`poison_ratio`); pcr and abl change the fine-tune's"
             " objective, disp fine-tunes the base on the set purified by the victim (disp+pcr: with PCR as the"
             " objective); defenses of `results.from_victim` tune the victim further on clean rows. `base` is the"
             " pre-trained base, `clean` the fine-tune on the unpoisoned set; `gain_kept` is the share of the clean"
             " fine-tune's quality gain over the base that a row keeps (blank where that gain is under"
             f" {cfg.results.victim_goals.min_clean_gain:g}: a share of noise). One seed: the value and its 95% Wilson"
             " interval (n in `results.json`); several seeds: mean ± sd and each seed's value.", "",
             "![ASR against clean quality](results_asr_vs_accuracy.png)", ""]
    for task in dict.fromkeys(r["task"] for r in rows):
        q = quality_metric(task)
        extra = ["bleu4"] if task == "caption" else []
        for family in dict.fromkeys(r["family"] for r in rows if r["task"] == task):
            part = [r for r in rows if (r["task"], r["family"]) == (task, family)]
            lines += [f"## {task}, {family}", "",
                      "| attack | poison | defense | seeds | asr | asr_clean | " + " | ".join([q, *extra]) + " | gain_kept |",
                      "|---" * (7 + len(extra)) + "|"]
            groups: dict[tuple, list[dict]] = {}
            for r in part:
                groups.setdefault((r["attack"], r["defense"]), []).append(r)
            for (attack, defense), group in groups.items():
                cells = [cell_text(group, m) for m in ("asr", "asr_clean", q, *extra)]
                gains = [r["gain_kept"] for r in group if r.get("gain_kept") is not None]
                gain = f"{statistics.mean(gains):.2f}" if gains else ""
                poison = "" if defense in REFERENCES else f"{group[0]['poison_ratio']:.0%}"
                lines.append(f"| {attack} | {poison} | {defense} | {len(group)} | "
                             + " | ".join(cells) + f" | {gain} |")
            lines.append("")
            if text := sorted({r["attack"] for r in part if r.get("trigger") == "text"}):
                lines += [f"{', '.join(text)}: a text trigger, not a vision-side one. DiSP masks vision tokens and PCR"
                          " perturbs image patches; neither touches the prompt, so their rows show what they do to a"
                          " trigger they were not built for (they do not apply).", ""]
    lines += ["## Goals", "", *(f"- [{'x' if ok else ' '}] {name}" for name, ok in checks), ""]
    return "\n".join(lines)
