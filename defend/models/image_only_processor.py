"""Image-only variants of the processors that insist on a video processor, so they build and load
without torchvision.

transformers 5.x refuses to build ``Qwen2VLProcessor`` (and Qwen2.5-VL's, LLaVA-OneVision's) without
its video processor, which is torchvision-only, even when no video is ever passed (transformers issue
#48558). On machines without torchvision (CPU installs: there is no CPU torchvision wheel) we use
these subclasses: the same prompt expansion and outputs for images, no video attribute.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import AutoImageProcessor, AutoTokenizer, LlavaOnevisionProcessor, Qwen2VLProcessor
from transformers.processing_utils import ProcessorMixin
from transformers.utils import is_torchvision_available


class Qwen2VLImageOnlyProcessor(Qwen2VLProcessor):
    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)


class LlavaOnevisionImageOnlyProcessor(LlavaOnevisionProcessor):
    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, num_image_tokens=None,
                 vision_feature_select_strategy=None, vision_aspect_ratio="anyres_max_9", **kwargs):
        self.num_image_tokens = num_image_tokens
        self.vision_feature_select_strategy = vision_feature_select_strategy
        self.vision_aspect_ratio = vision_aspect_ratio
        self.image_token = getattr(tokenizer, "image_token", None) or "<image>"
        self.video_token = getattr(tokenizer, "video_token", None) or "<video>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)


IMAGE_ONLY = {
    "qwen2_vl": (Qwen2VLImageOnlyProcessor, ()),
    "qwen2_5_vl": (Qwen2VLImageOnlyProcessor, ()),
    "llava_onevision": (LlavaOnevisionImageOnlyProcessor,
                        ("num_image_tokens", "vision_feature_select_strategy", "vision_aspect_ratio")),
}
IMAGE_ONLY["lavida"] = IMAGE_ONLY["llava_onevision"]  # LLaVA-OneVision's processor (defend convert lavida_dream)


def image_only_processor(path: str | Path, model_type: str, trust_remote_code: bool) -> Any | None:
    """The image-only processor where transformers' own cannot load here; None elsewhere."""
    if model_type not in IMAGE_ONLY or is_torchvision_available():
        return None
    cls, saved_keys = IMAGE_ONLY[model_type]
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    image_processor = AutoImageProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    settings = {}
    for name in ("processor_config.json", "preprocessor_config.json"):
        if (Path(path) / name).is_file():
            saved = json.loads((Path(path) / name).read_text())
            settings.update({k: saved[k] for k in saved_keys if k in saved and k not in settings})
    return cls(image_processor, tokenizer, chat_template=tokenizer.chat_template, **settings)
