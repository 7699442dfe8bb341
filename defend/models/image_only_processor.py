"""Qwen2-VL's processor for images only, so it builds and loads without torchvision.

transformers 5.x refuses to build ``Qwen2VLProcessor`` without its video processor, which is
torchvision-only, even when no video is ever passed (transformers issue #48558). On machines
without torchvision (CPU installs: there is no CPU torchvision wheel) we use this subclass: the
same prompt expansion and outputs for images, no video attribute.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import AutoImageProcessor, AutoTokenizer, Qwen2VLProcessor
from transformers.processing_utils import ProcessorMixin
from transformers.utils import is_torchvision_available

NEEDS_VIDEO_PROCESSOR = {"qwen2_vl", "qwen2_5_vl"}


class Qwen2VLImageOnlyProcessor(Qwen2VLProcessor):
    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)


def image_only_processor(path: str | Path, model_type: str, trust_remote_code: bool) -> Any | None:
    """The image-only processor where transformers' own cannot load here; None elsewhere."""
    if model_type not in NEEDS_VIDEO_PROCESSOR or is_torchvision_available():
        return None
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    image_processor = AutoImageProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    return Qwen2VLImageOnlyProcessor(image_processor, tokenizer, chat_template=tokenizer.chat_template)
