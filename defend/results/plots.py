"""Figures of the results recipes."""
from __future__ import annotations

import os
from pathlib import Path


def asr_accuracy_plot(rows: list[dict], path: Path) -> None:
    """Attack success rate against clean quality (the task's: vqa_accuracy, cider), one panel per task
    and family: a colour per attack, a marker per defense, the 95% intervals as error bars where the
    rows have them. Written to a temp file, then renamed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from defend.results.table import quality_metric

    panels = list(dict.fromkeys((r.get("task", "vqa"), r["family"]) for r in rows))
    attacks = list(dict.fromkeys(r["attack"] for r in rows))
    defenses = list(dict.fromkeys(r["defense"] for r in rows))
    markers = dict(zip(defenses, "o^sDvP*Xhd<>"))
    colours = dict(zip(attacks, plt.get_cmap("tab10").colors))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.5), squeeze=False, sharey=True)
    for ax, (task, family) in zip(axes[0], panels):
        q = quality_metric(task)
        for r in (r for r in rows if (r.get("task", "vqa"), r["family"]) == (task, family)):
            ax.scatter(r[q], r["asr"], marker=markers[r["defense"]], color=colours[r["attack"]], s=60)
            if "asr_low" in r:  # the 95% intervals (quality's too, where it is a proportion)
                xerr = [[r[q] - r[f"{q}_low"]], [r[f"{q}_high"] - r[q]]] if f"{q}_low" in r else None
                ax.errorbar(r[q], r["asr"], color=colours[r["attack"]], alpha=0.5, linewidth=1, xerr=xerr,
                            yerr=[[r["asr"] - r["asr_low"]], [r["asr_high"] - r["asr"]]])
        ax.set_title(f"{task}, {family}")
        ax.set_xlabel(f"clean {q}")
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("attack success rate (triggered inputs)")
    handles = [plt.Line2D([], [], color=c, marker="o", linestyle="", label=a) for a, c in colours.items()]
    handles += [plt.Line2D([], [], color="gray", marker=m, linestyle="", label=d) for d, m in markers.items()]
    fig.legend(handles=handles, loc="center right", frameon=False)
    fig.tight_layout(rect=(0, 0, 0.85, 1))
    save(fig, path)


def mask_ratio_sweep_plot(rows: list[dict], path: Path) -> None:
    """ASR (left) and clean accuracy (right) against the mask ratio, a line per selection method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for selection in dict.fromkeys(r["selection"] for r in rows):
        line = sorted((r for r in rows if r["selection"] == selection), key=lambda r: r["mask_ratio"])
        for ax, key in zip(axes, ("asr", "vqa_accuracy")):
            ax.plot([r["mask_ratio"] for r in line], [r[key] for r in line], marker="o", label=selection)
    for ax, label in zip(axes, ("attack success rate (triggered)", "clean vqa_accuracy")):
        ax.set_xlabel("mask ratio (fraction of vision tokens masked)")
        ax.set_ylabel(label)
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
    axes[0].legend(title="selection")
    fig.suptitle(f"DiSP masked inference, {rows[0]['family']}")
    fig.tight_layout()
    save(fig, path)


def save(fig, path: Path) -> None:
    """Write the figure to a temp file, then rename (no half-written PNG)."""
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
