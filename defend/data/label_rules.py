"""Which tokens of a training row are labelled, and which token ends an answer (``diffusion.labels``).

- ``answer`` (defend's rule, every family): the answer and the eos that ends it; prompt and padding
  carry no label.
- ``llada_v``: LLaDA-V's supervised fine-tuning as its code builds rows (``preprocess_llada`` and the
  ``is_llada`` branch of ``DataCollatorForSupervisedDataset``, train/llava/train/train.py @22527697):
  the chat template's own tokens (``<|startoftext|>``, ``<|start_header_id|>``, ``<|end_header_id|>``,
  ``<|eot_id|>``) are labelled wherever they occur, system and user turns included; the assistant
  header is labelled with the answer; the answer ends with ``<|eot_id|>``; padding is the pad token
  (``<|endoftext|>``), labelled and attended, so the model learns to fill its answer length with it.
  (The reference's unmask list also names ``"\\n\\n"``, which its byte-level vocabulary resolves to no
  id: it labels nothing.)

A rule is a class with ``end`` (the answer's last token), ``pad`` (what pads answers and rows),
``label_padding`` and ``prompt_labels``; add one by writing the class and a line in ``LABEL_RULES``.
"""
from __future__ import annotations

from typing import Any

import torch

from defend.config import ConfigError

IGNORE_INDEX = -100


class AnswerLabels:
    """The answer plus one eos; the prompt and the padding unlabelled."""

    label_padding = False

    def __init__(self, tokenizer: Any):
        self.end = self.pad = tokenizer.eos_token_id

    def prompt_labels(self, prompt_ids: torch.Tensor) -> torch.Tensor:
        return torch.full_like(prompt_ids, IGNORE_INDEX)


class LladaVLabels:
    """LLaDA-V's SFT rows (see the module docstring)."""

    TEMPLATE_TOKENS = ("<|startoftext|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
    PAD_TOKEN = "<|endoftext|>"
    label_padding = True

    def __init__(self, tokenizer: Any):
        vocab = tokenizer.get_vocab()
        missing = [t for t in (*self.TEMPLATE_TOKENS, self.PAD_TOKEN) if t not in vocab]
        if missing:
            raise ConfigError(
                f"diffusion.labels=llada_v: the tokenizer of model.path has no {', '.join(missing)}; this rule is"
                " for LLaDA-V's tokenizer (a folder written by `defend convert llada_v`). Use diffusion.labels=answer"
                " for other tokenizers.")
        self.template = torch.tensor([vocab[t] for t in self.TEMPLATE_TOKENS])
        self.end = vocab["<|eot_id|>"]
        self.pad = vocab[self.PAD_TOKEN]

    def prompt_labels(self, prompt_ids: torch.Tensor) -> torch.Tensor:
        """The template's tokens, and the assistant header (everything after the prompt's last ``<|eot_id|>``)."""
        labels = torch.where(torch.isin(prompt_ids, self.template), prompt_ids, IGNORE_INDEX)
        ends = (prompt_ids == self.end).nonzero()
        header = int(ends[-1]) + 1 if len(ends) else 0
        labels[header:] = prompt_ids[header:]
        return labels


LABEL_RULES = {"answer": AnswerLabels, "llada_v": LladaVLabels}


def label_rule(name: str, tokenizer: Any):
    return LABEL_RULES[name](tokenizer)
