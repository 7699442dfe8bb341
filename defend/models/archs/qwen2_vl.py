"""Qwen2-VL and Qwen2.5-VL (``qwen2_vl``, ``qwen2_5_vl``): dynamic resolution, images as flattened
patches with their ``image_grid_thw``, 2x2 patch merging, M-RoPE positions from the token grid."""
from __future__ import annotations

from typing import Any

import torch

from defend.errors import ConfigError
from defend.models.archs.base import Architecture, ImagePerturbation
from defend.models.image_only_processor import Qwen2VLImageOnlyProcessor
from defend.models.tiny_components import special_token_ids, text_dims, tiny_tokenizer

MERGE = 2  # spatial merge: each 2x2 block of patches becomes one image token
TOKENS = {
    "image_token": "<|image_pad|>",
    "video_token": "<|video_pad|>",
    "vision_start_token": "<|vision_start|>",
    "vision_end_token": "<|vision_end|>",
}
# Qwen2-VL's ChatML turn, with the vision block the processor expands.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ item['text'] }}{% endif %}{% endfor %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def unflatten_patches(rows: torch.Tensor, grid_h: int, grid_w: int, channels: int, temporal: int,
                      patch: int, merge: int) -> torch.Tensor:
    """One image's flattened patch rows (the processor's layout: merge blocks row-major, each row
    C x T x p x p) back to (T, C, H, W)."""
    x = rows.reshape(grid_h // merge, grid_w // merge, merge, merge, channels, temporal, patch, patch)
    return x.permute(5, 4, 0, 2, 6, 1, 3, 7).reshape(temporal, channels, grid_h * patch, grid_w * patch)


def flatten_patches(frames: torch.Tensor, patch: int, merge: int) -> torch.Tensor:
    """The inverse of ``unflatten_patches``: (T, C, H, W) -> (grid_h * grid_w, C * T * p * p)."""
    t, c, h, w = frames.shape
    gh, gw = h // patch, w // patch
    x = frames.reshape(t, c, gh // merge, merge, patch, gw // merge, merge, patch)
    return x.permute(2, 5, 3, 6, 1, 0, 4, 7).reshape(gh * gw, c * t * patch * patch)


class Qwen2VL(Architecture):
    model_type = "qwen2_vl"
    tiny_arch = "qwen2_vl"
    vision_tower = "visual"
    projector = ("merger",)  # the patch merger (inside `visual`) projects into the language model
    pixel_inputs = ("pixel_values",)  # image_grid_thw stays: M-RoPE positions are computed from it

    def position_ids(self, attention_mask: torch.Tensor) -> torch.Tensor | None:
        return None  # M-RoPE: the model computes 3-D positions from input_ids and image_grid_thw

    def perturb_pixels(self, batch: dict[str, Any], perturb: ImagePerturbation) -> torch.Tensor:
        """Each image un-flattened to pixels, perturbed once (its temporal copies alike), flattened back."""
        return self.per_image(batch["pixel_values"], batch["image_grid_thw"], [True] * len(batch["image_grid_thw"]),
                              perturb)

    def per_image(self, pixels: torch.Tensor, grids: torch.Tensor, which: list[bool],
                  change: ImagePerturbation) -> torch.Tensor:
        """The flattened patches of every image, those of the images in ``which`` replaced by
        ``change`` of the image as (1, C, H, W) pixels."""
        vision = self.config.vision_config
        temporal, patch, merge = vision.temporal_patch_size, vision.patch_size, vision.spatial_merge_size
        channels = pixels.shape[1] // (temporal * patch * patch)
        out, start = [], 0
        for (t, gh, gw), chosen in zip(grids.tolist(), which):
            if t != 1:
                raise ValueError("a video (grid_t > 1) among the images; only still images are supported here")
            rows = pixels[start: start + gh * gw]
            if chosen:
                frames = unflatten_patches(rows, gh, gw, channels, temporal, patch, merge)
                rows = flatten_patches(change(frames[:1]).expand_as(frames), patch, merge)
            out.append(rows)
            start += gh * gw
        return torch.cat(out).to(pixels.dtype)

    def pooled_size(self) -> int:
        return self.config.vision_config.hidden_size  # Qwen2-VL: the merger's output width

    def pooled_image_features(self, tower: torch.nn.Module, pixels: dict[str, torch.Tensor]) -> torch.Tensor:
        grids = pixels["image_grid_thw"]
        merged = tower(pixels["pixel_values"], grid_thw=grids).pooler_output  # the merged tokens of all images
        counts = (grids.prod(-1) // self.config.vision_config.spatial_merge_size**2).tolist()
        return torch.stack([tokens.mean(0) for tokens in merged.split(counts)])

    def patch_tokens(self, tower: torch.nn.Module, pixels: dict[str, torch.Tensor]) -> torch.Tensor:
        raise ConfigError(f"pretrain_vision.reconstruct_weight: {self.model_type}'s encoder merges 2x2 patches"
                          " into one token, so no token is one patch to reconstruct; set it to 0.")

    def whole_images(self, pixels: dict[str, torch.Tensor]) -> torch.Tensor:
        raise ConfigError(f"pretrain_vision.texture_prob and reconstruct_weight: {self.model_type} hands the encoder"
                          " flattened patches, not images; set both to 0.")

    def hflip(self, pixels: dict[str, torch.Tensor], flip: torch.Tensor) -> dict[str, torch.Tensor]:
        flipped = self.per_image(pixels["pixel_values"], pixels["image_grid_thw"], flip.tolist(),
                                 lambda image: image.flip(-1))
        return {**pixels, "pixel_values": flipped}

    def build_tiny(self, tiny: Any, family: str):
        from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

        tokenizer = tiny_tokenizer(tiny, extra_special_tokens=TOKENS, chat_template=CHAT_TEMPLATE)
        vision = dict(depth=tiny.vision_layers, embed_dim=tiny.vision_hidden, hidden_size=tiny.text_hidden,
                      num_heads=tiny.heads, patch_size=tiny.patch_size, spatial_merge_size=MERGE,
                      temporal_patch_size=2)
        config = Qwen2VLConfig(vision_config=vision, text_config=self.tiny_text(tiny, tokenizer),
                               **self.token_ids(tokenizer))
        return Qwen2VLForConditionalGeneration(config), self.tiny_processor(tiny, tokenizer)

    @staticmethod
    def tiny_text(tiny: Any, tokenizer: Any) -> dict[str, Any]:
        half_head = tiny.text_hidden // tiny.heads // 2
        spatial = half_head * 3 // 8  # Qwen2-VL's 16/24/24 split of the rotary half, scaled down
        return dict(**text_dims(tiny), vocab_size=len(tokenizer), max_position_embeddings=1024,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                     "mrope_section": [half_head - 2 * spatial, spatial, spatial]},
                    **special_token_ids(tokenizer))

    @staticmethod
    def token_ids(tokenizer: Any) -> dict[str, int]:
        return {f"{name}_id": tokenizer.convert_tokens_to_ids(token) for name, token in TOKENS.items()}

    @staticmethod
    def tiny_processor(tiny: Any, tokenizer: Any, processor_class: Any = None) -> Any:
        from transformers import Qwen2VLImageProcessorPil, Qwen2VLProcessor
        from transformers.utils import is_torchvision_available

        pixels = tiny.image_size**2  # min = max: every image is resized to image_size x image_size
        sizes = dict(size={"shortest_edge": pixels, "longest_edge": pixels}, patch_size=tiny.patch_size,
                     temporal_patch_size=2, merge_size=MERGE)
        image_processor = Qwen2VLImageProcessorPil(**sizes)
        if is_torchvision_available():
            from transformers import Qwen2VLVideoProcessor

            return (processor_class or Qwen2VLProcessor)(image_processor, tokenizer, Qwen2VLVideoProcessor(**sizes),
                                                         chat_template=CHAT_TEMPLATE)
        return Qwen2VLImageOnlyProcessor(image_processor, tokenizer, chat_template=CHAT_TEMPLATE)


class Qwen2_5VL(Qwen2VL):
    model_type = "qwen2_5_vl"
    tiny_arch = "qwen2_5_vl"

    def pooled_size(self) -> int:
        return self.config.vision_config.out_hidden_size

    def build_tiny(self, tiny: Any, family: str):
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

        tokenizer = tiny_tokenizer(tiny, extra_special_tokens=TOKENS, chat_template=CHAT_TEMPLATE)
        # window attention in every block but the last (the published models: full attention every 8th)
        vision = dict(depth=tiny.vision_layers, hidden_size=tiny.vision_hidden, out_hidden_size=tiny.text_hidden,
                      intermediate_size=4 * tiny.vision_hidden, num_heads=tiny.heads, patch_size=tiny.patch_size,
                      spatial_merge_size=MERGE, temporal_patch_size=2, window_size=2 * MERGE * tiny.patch_size,
                      fullatt_block_indexes=[tiny.vision_layers - 1])
        config = Qwen2_5_VLConfig(vision_config=vision, text_config=self.tiny_text(tiny, tokenizer),
                                  **self.token_ids(tokenizer))
        return Qwen2_5_VLForConditionalGeneration(config), self.tiny_processor(tiny, tokenizer, Qwen2_5_VLProcessor)
