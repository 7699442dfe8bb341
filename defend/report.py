"""Figures of the results recipes."""
from __future__ import annotations

import os
from pathlib import Path


def asr_accuracy_plot(rows: list[dict], path: Path) -> None:
    """Attack success rate against clean accuracy, one panel per family: a colour per attack, a marker
    per defense. Written to a temp file, then renamed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = list(dict.fromkeys(r["family"] for r in rows))
    attacks = list(dict.fromkeys(r["attack"] for r in rows))
    defenses = list(dict.fromkeys(r["defense"] for r in rows))
    markers = dict(zip(defenses, "o^sDvP*X"))
    colours = dict(zip(attacks, plt.get_cmap("tab10").colors))
    fig, axes = plt.subplots(1, len(families), figsize=(5.5 * len(families), 4.5), squeeze=False, sharey=True)
    for ax, family in zip(axes[0], families):
        for r in (r for r in rows if r["family"] == family):
            ax.scatter(r["vqa_accuracy"], r["asr"], marker=markers[r["defense"]], color=colours[r["attack"]], s=60)
        ax.set_title(family)
        ax.set_xlabel("clean vqa_accuracy")
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("attack success rate (triggered inputs)")
    handles = [plt.Line2D([], [], color=c, marker="o", linestyle="", label=a) for a, c in colours.items()]
    handles += [plt.Line2D([], [], color="gray", marker=m, linestyle="", label=d) for d, m in markers.items()]
    fig.legend(handles=handles, loc="center right", frameon=False)
    fig.tight_layout(rect=(0, 0, 0.85, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
