"""``easy_vqa_scenes``: a several-word caption per easy-vqa image (to be written: see issue 20)."""
from __future__ import annotations

from defend.data.samples import Sample


def load_easy_vqa_scenes(split: str) -> list[Sample]:
    raise NotImplementedError("easy_vqa_scenes is being written")
