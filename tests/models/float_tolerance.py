"""How close our logits must come to a reference implementation's recorded ones. The recording was made on
one CPU; another CPU's kernels (ATen's and oneDNN's AVX-512, AVX2 or plain paths) sum in another order,
which on the tiny models' large logits (up to ~60) moves the last digits. Measured against the recording
machine's own path, with ATEN_CPU_CAPABILITY=default and =avx2 (2026-12-03): the text model alone differs
by up to 1.0e-6 of the largest logit (LLaDA-V 3.8e-5 of 61.5, LaViDa-Dream 2.1e-5 of 20.7), end to end
(vision tower and projector too) by up to 3.4e-6 (2.1e-4 of 61.5). The bounds leave ~4x of that."""
from __future__ import annotations

import torch

TEXT_MODEL = 4e-6
END_TO_END = 1.5e-5


def relative_gap(got: torch.Tensor, want: torch.Tensor) -> float:
    """The largest |got - want|, as a fraction of the largest |want|."""
    return ((got - want).abs().max() / want.abs().max()).item()
