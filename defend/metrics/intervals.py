"""95% intervals for the proportions we report (Wilson score intervals: sound at 0 and 1 and for small n,
where the normal approximation gives [0, 0] for an ASR of 0).

``vqa_accuracy`` is treated as a proportion of its ``n`` answers: exact for easy-vqa's one reference
answer per question (every score is 0 or 1), an approximation for VQA's soft multi-annotator scores.
"""
from __future__ import annotations

import math

Z95 = 1.959963984540054
# each reported proportion and the count it is a share of, in evaluate's metrics
PROPORTIONS = {"asr": "n_triggered", "asr_clean": "n_clean", "vqa_accuracy": "n"}


def wilson(share: float, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion ``share`` of ``n`` trials; (0, 1) without trials."""
    if n <= 0:
        return 0.0, 1.0
    centre = (share + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(share * (1 - share) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def intervals(metrics: dict) -> dict[str, float]:
    """``<metric>_low`` and ``<metric>_high`` for every proportion in ``metrics`` whose count is there too."""
    out = {}
    for name, count in PROPORTIONS.items():
        if name in metrics and count in metrics:
            out[f"{name}_low"], out[f"{name}_high"] = (round(x, 4) for x in wilson(metrics[name], metrics[count]))
    return out


def with_interval(metrics: dict, name: str, digits: int = 3) -> str:
    """``0.020 [0.012, 0.031]`` (the bare value where the interval is not known)."""
    value = f"{metrics[name]:.{digits}f}"
    if f"{name}_low" not in metrics:
        return value
    return f"{value} [{metrics[f'{name}_low']:.{digits}f}, {metrics[f'{name}_high']:.{digits}f}]"
