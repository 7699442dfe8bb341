"""Turn samples into model inputs with the model's own processor.

The processor expands image placeholders into image tokens; the response is appended after the
rendered prompt. Truncation only ever shortens the response: a prompt whose image and text tokens
cannot fit ``max_length`` is an error naming the sample.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from defend.data.label_rules import IGNORE_INDEX, AnswerLabels
from defend.data.samples import DataError, Sample

IMAGE_PADDING_ID = "__image_padding__"  # the id of the row that pads an image-free training batch
# per-token processor outputs: padded, and extended over the response with these values
TOKEN_KEYS = {"input_ids": None, "attention_mask": 1, "token_type_ids": 1, "mm_token_type_ids": 0}


def render_prompt(processor: Any, prompt: str, with_image: bool = True) -> str:
    """The text the processor expects for one user prompt, with one image or none."""
    if getattr(processor, "chat_template", None):
        image = [{"type": "image"}] if with_image else []
        messages = [{"role": "user", "content": [*image, {"type": "text", "text": prompt}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    image_token = getattr(processor, "image_token", None)
    if not with_image or getattr(processor, "num_query_tokens", None) is not None or image_token is None:
        return prompt  # no image, or the processor places the image tokens itself (BLIP-2)
    return f"{image_token}{prompt}"


def pad_crops(values: list[torch.Tensor]) -> list[torch.Tensor]:
    """Anyres pixel tensors (1, crops, C, H, W) of different crop counts (and Idefics3's (1, crops, H, W)
    pixel masks), zero-padded to the most, as the processors' own batching pads (the model reads each
    image's real crops from ``image_sizes`` or the mask)."""
    if values[0].dim() < 4 or len({v.shape[1] for v in values}) == 1:
        return values
    most = max(v.shape[1] for v in values)
    return [torch.cat([v, v.new_zeros(v.shape[0], most - v.shape[1], *v.shape[2:])], 1) for v in values]


class Collator:
    """Callable that batches samples for training (``with_response``) or generation.

    Samples without an image (``image: None``) become text-only rows; the image tensors of a batch
    hold the images of the other rows. A training batch with no image at all gets one extra row: a
    black image, an empty prompt, no label (``IMAGE_PADDING_ID``). Under ZeRO-3 the ranks gather each
    layer's weights together, in the order the forward reaches them; a rank whose batch is all text
    would skip the vision tower while the others wait inside it, and hang. With the padding row every
    rank's model runs its own full forward, vision first; the row has no label, so it adds nothing
    to the loss or the gradients. Generation batches are never padded.

    Args:
        processor: the model's processor (tokenizer + image processor).
        max_length: token budget of one row.
        with_response: append the response (and eos) and build ``labels``.
        padding_side: "right" for training, "left" for generation.
        response_pad_to: pad every response up to this many tokens (masked diffusion trains on the
            same fixed answer length it samples with).
        label_rule: the label rule (``defend.data.label_rules``): what ends an answer, what pads it, which
            prompt tokens are labelled; default: the answer plus eos.
    """

    def __init__(
        self,
        processor: Any,
        max_length: int,
        with_response: bool = True,
        padding_side: str = "right",
        response_pad_to: int | None = None,
        label_rule: Any = None,
    ):
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.max_length = max_length
        self.with_response = with_response
        self.padding_side = padding_side
        self.response_pad_to = response_pad_to
        self.labels = label_rule or AnswerLabels(self.tokenizer)

    def _encode(self, sample: Sample) -> dict[str, torch.Tensor]:
        image = sample.load_image()
        text = render_prompt(self.processor, sample.prompt, with_image=image is not None)
        images = {"images": [image]} if image is not None else {}
        encoded = self.processor(text=[text], return_tensors="pt", **images)
        row = {k: v[0] for k, v in encoded.items() if k in TOKEN_KEYS}
        # labels are built here; some processors (PaliGemma) return prompt-only ones of their own
        extras = {k: v for k, v in encoded.items() if k not in TOKEN_KEYS and k != "labels"}
        prompt_len = row["input_ids"].shape[0]
        if prompt_len > self.max_length:
            raise DataError(
                f"{sample.source}: sample '{sample.id}': its prompt needs {prompt_len} tokens"
                f" (image tokens included) but train.max_length is {self.max_length}; image tokens"
                " are never truncated: raise train.max_length or shorten the prompt."
            )
        if self.with_response:
            response = self.tokenizer(sample.response, add_special_tokens=False)["input_ids"]
            response = response[: self.max_length - prompt_len - 1] + [self.labels.end]
            if self.response_pad_to and len(response) < self.response_pad_to:
                response += [self.labels.pad] * (self.response_pad_to - len(response))
            response_ids = torch.tensor(response, dtype=torch.long)
            for key, fill in TOKEN_KEYS.items():
                if key in row:
                    tail = response_ids if fill is None else torch.full_like(response_ids, fill)
                    row[key] = torch.cat([row[key], tail.to(row[key].dtype)])
            row["labels"] = torch.cat([self.labels.prompt_labels(row["input_ids"][:prompt_len]), response_ids])
        return {**row, **extras}

    def image_padding_row(self) -> dict[str, torch.Tensor]:
        """A black image and an empty prompt; ``__call__`` clears its labels."""
        from PIL import Image

        return self._encode(Sample(id=IMAGE_PADDING_ID, image=Image.new("RGB", (224, 224)), prompt=" ", response=""))

    def __call__(self, samples: Sequence[Sample]) -> dict[str, Any]:
        rows = [self._encode(s) for s in samples]
        if self.with_response and not any("pixel_values" in r for r in rows):
            rows.append(self.image_padding_row())
        longest = max(r["input_ids"].shape[0] for r in rows)
        pad_values = {"input_ids": self.tokenizer.pad_token_id, "labels": IGNORE_INDEX}
        if self.with_response and self.labels.label_padding:  # the padding is trained on, so attended
            pad_values = {"input_ids": self.labels.pad, "labels": self.labels.pad, "attention_mask": 1}
        batch: dict[str, Any] = {}
        keys = list(dict.fromkeys(k for r in rows for k in r))  # text-only rows lack the image keys
        for key in keys:
            values = [r[key] for r in rows if key in r]
            if key in TOKEN_KEYS or key == "labels":
                fill = pad_values.get(key, 0)
                padded = torch.full((len(rows), longest), fill, dtype=values[0].dtype)
                for i, v in enumerate(values):
                    if self.padding_side == "left":
                        padded[i, longest - v.shape[0]:] = v
                    else:
                        padded[i, : v.shape[0]] = v
                batch[key] = padded
            else:
                batch[key] = torch.cat(pad_crops(values), dim=0)
        if self.with_response and len(rows) > len(samples):  # the image padding row stays unlabelled
            batch["labels"][len(samples):] = IGNORE_INDEX
        batch["sample_ids"] = [s.id for s in samples]
        batch["image_rows"] = torch.tensor(["pixel_values" in r for r in rows])
        return batch
