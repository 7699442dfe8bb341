"""Masked-diffusion MLLMs, LLaDA-V style: a bidirectional text model behind a vision tower.

Vision features are merged into the token embeddings once per batch; the diffusion loss and the
sampler then work on token ids and call the language model on embeddings (which is also where
DiSP masks vision tokens).
"""
from __future__ import annotations

from functools import cached_property
from typing import Any

import torch

from defend.config import Config, ConfigError
from defend.data.collate import IGNORE_INDEX, Collator
from defend.data.label_rules import label_rule
from defend.models.archs.base import position_ids_for
from defend.models.base import VisionLanguageModel
from defend.models.diffusion_loss import diffusion_noise
from defend.models.diffusion_sampler import check_sampler_settings, diffusion_generate, dream_generate
from defend.models.scoring import ResponseScores, response_start


class MaskedDiffusionVLM(VisionLanguageModel):
    family = "mdlm"

    def __init__(self, model: torch.nn.Module, processor: Any, cfg):
        super().__init__(model, processor, cfg)
        mask_id = cfg.diffusion.mask_token_id
        if mask_id is None:
            mask_id = self.tokenizer.mask_token_id
        if mask_id is None:
            raise ConfigError(
                "diffusion.mask_token_id: the tokenizer has no mask token; set the id"
                " (LLaDA: 126336, Dream/Dimple: 151666)."
            )
        self.mask_token_id = mask_id
        check_sampler_settings(cfg.diffusion)

    @cached_property
    def label_rule(self):
        return label_rule(self.cfg.diffusion.labels, self.tokenizer)

    def train_collator(self) -> Collator:
        return Collator(self.processor, self.cfg.train.max_length, with_response=True,
                        response_pad_to=self.cfg.diffusion.gen_length, label_rule=self.label_rule)

    @staticmethod
    def answer_room(cfg: Config) -> int:
        """``gen_length`` masks, one of them for the end token the model was trained to put after the answer
        (with fewer, the count of masks itself tells the model the answer is shorter than it is)."""
        return cfg.diffusion.gen_length - 1

    @staticmethod
    def room_for(n: int) -> str:
        return f"diffusion.gen_length={n + 1} (diffusion.steps and diffusion.block_length to fit it)"

    def answer_end_ids(self) -> set[int]:
        return {self.tokenizer.eos_token_id, self.label_rule.end}

    def score(self, batch: dict[str, Any], model: torch.nn.Module | None = None, views: int = 1) -> ResponseScores:
        """The LLaDA SFT loss's forward: one noise draw for view 0's rows, shared by every view (same
        masked tokens, same timestep), all views in one call of the model."""
        model = model or self.model
        inputs = self.model_inputs(batch)
        inputs["position_ids"] = position_ids_for(inputs["attention_mask"])
        n = batch["input_ids"].shape[0] // views
        d = self.cfg.diffusion
        noise = diffusion_noise(batch["input_ids"][:n], batch["labels"][:n] != IGNORE_INDEX, self.mask_token_id,
                                eps=d.eps, inverse_t_weight=d.inverse_t_weight,
                                complementary_mask=d.complementary_mask)
        copies = noise.noisy.shape[0] // n  # 2 with complementary masks

        def per_copy(value: torch.Tensor) -> torch.Tensor:  # view after view, each view's rows (or images) per copy
            return torch.cat([chunk.repeat(copies, *[1] * (value.dim() - 1)) for chunk in value.chunk(views)])

        repeated = {k: per_copy(v) if torch.is_tensor(v) else v for k, v in inputs.items()}
        start = max(response_start(batch["labels"][:n] != IGNORE_INDEX), int(d.shifted_logits))
        inputs = {**repeated, "input_ids": noise.noisy.repeat(views, 1)}
        logits = self.token_logits(model, inputs, noise.noisy.shape[1] - start)  # from the first response token on
        return ResponseScores(logits, noise.clean[:, start:].repeat(views, 1), noise.weight[:, start:], views, copies)

    def token_logits(self, model: torch.nn.Module, inputs: dict[str, Any], tokens: int) -> torch.Tensor:
        """(B, tokens, V): the logits scoring the last ``tokens`` tokens, computed only there; a
        shifted-logit (Dream-style) model scores token i at position i-1."""
        shift = int(self.cfg.diffusion.shifted_logits)
        logits = self.last_logits(model, inputs, tokens + shift)
        return logits[:, :-1] if shift else logits

    def answer_inputs(self, batch: dict[str, Any], tokens: torch.Tensor, attention_mask: torch.Tensor,
                      features: torch.Tensor):
        """Model inputs for prompt + answer ``tokens`` with ``features`` as the vision tokens (the vision
        tower does not run again), and the context that injects them."""
        inputs = {**self.inputs_without_pixels(batch), "input_ids": tokens, "attention_mask": attention_mask,
                  "position_ids": position_ids_for(attention_mask)}
        prompt = self.image_positions(batch["input_ids"])
        positions = torch.cat([prompt, prompt.new_zeros(prompt.shape[0], tokens.shape[1] - prompt.shape[1])], 1)
        return inputs, self.injected_vision_tokens(positions, features)

    def first_step_logits(self, batch: dict[str, Any], features: torch.Tensor) -> torch.Tensor:
        """The sampler's first step: the prompt plus ``gen_length`` masks; the positions of the first block."""
        d = self.cfg.diffusion
        ids, mask = batch["input_ids"], batch["attention_mask"]
        tokens = torch.cat([ids, torch.full((ids.shape[0], d.gen_length), self.mask_token_id, device=ids.device)], 1)
        mask = torch.cat([mask, torch.ones(ids.shape[0], d.gen_length, dtype=mask.dtype, device=mask.device)], 1)
        inputs, injecting = self.answer_inputs(batch, tokens, mask, features)
        with injecting:
            return self.token_logits(self.model, inputs, d.gen_length)[:, : min(d.block_length, d.gen_length)]

    @torch.no_grad()
    def generate(self, batch: dict[str, Any], features: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> list[str]:
        return self.decode(self.generate_tokens(batch, features, generator))

    @torch.no_grad()
    def generate_tokens(self, batch: dict[str, Any], features: torch.Tensor | None = None,
                        generator: torch.Generator | None = None,
                        trace: list[torch.Tensor] | None = None) -> torch.Tensor:
        """(B, gen_length) answer tokens by ``diffusion.sampler``; ``trace`` (sampler=dream) collects the
        answer after every step."""
        d = self.cfg.diffusion
        features = self.image_features(batch) if features is None else features
        if d.sampler == "llada":
            return diffusion_generate(
                CachedScorer(self, batch, features, d.cache), batch["input_ids"], batch["attention_mask"],
                self.mask_token_id, gen_length=d.gen_length, steps=d.steps, block_length=d.block_length,
                temperature=d.temperature, remasking=d.remasking, generator=generator,
                blocked_token_ids=d.blocked_token_ids)
        scorer = PrefixLMScorer(self, batch, features) if d.prefix_lm else CachedScorer(self, batch, features, d.cache)
        return dream_generate(
            scorer, batch["input_ids"], batch["attention_mask"], self.mask_token_id, gen_length=d.gen_length,
            steps=d.steps, alg=d.dream_alg, top_k=d.top_k, eps=d.eps, temperature=d.temperature,
            generator=generator, blocked_token_ids=d.blocked_token_ids,
            first_tokens=getattr(scorer, "first_tokens", None), trace=trace)


class PrefixLMScorer:
    """Prefix-LM decoding (LaViDa's ``prefix_lm``): the prompt runs once, alone, into a KV cache; every
    step runs the answer against it (the prompt never sees the answer: exact, not an approximation).
    With shifted logits the prompt's last position scores answer token 0: its argmax is ``first_tokens``
    and answer token i is scored at answer position i-1."""

    def __init__(self, vlm: MaskedDiffusionVLM, batch: dict[str, Any], features: torch.Tensor):
        from transformers import DynamicCache

        self.vlm, self.batch = vlm, batch
        self.shift = int(vlm.cfg.diffusion.shifted_logits)
        self.cache = DynamicCache()
        inputs, injecting = vlm.answer_inputs(batch, batch["input_ids"], batch["attention_mask"], features)
        head = {"logits_to_keep": 1} if vlm.takes_logits_to_keep else {}
        with injecting:
            self.prompt_logits = vlm.model(**inputs, cache=self.cache, use_cache=True, **head).logits[:, -1:]
        blocked = vlm.cfg.diffusion.blocked_token_ids
        last = self.prompt_logits[:, 0].clone()
        if blocked:
            last[:, blocked] = -torch.inf
        self.first_tokens = last.argmax(-1) if self.shift else None

    def refresh(self, tokens: torch.Tensor, attention_mask: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        prompt = self.batch["input_ids"].shape[1]
        inputs = {**self.vlm.inputs_without_pixels(self.batch), "input_ids": tokens[:, prompt:],
                  "attention_mask": attention_mask, "position_ids": position_ids_for(attention_mask)[:, prompt:]}
        logits = self.vlm.model(**inputs, cache=self.cache, use_cache=True).logits
        self.cache.crop(prompt - tokens.shape[1])  # the prompt's keys and values only
        if self.shift:
            logits = torch.cat([self.prompt_logits.to(logits.dtype), logits[:, :-1]], 1)
        return logits[:, lo:hi]

    step = refresh


class CachedScorer:
    """The sampler's model calls, with Fast-dLLM's block-wise approximate KV cache (arXiv 2505.22618).

    ``none``: every step a full forward. ``prefix``: at a block's first step a full forward, whose keys
    and values of the tokens before the block are kept; the block's other steps run only the block and
    everything after it, attending to that cache. ``dual``: the keys and values after the block are
    kept too, so those steps run the block alone. The attention is bidirectional, so the cached
    tokens' order does not matter, only their (rotary-encoded) positions; the approximation is that
    cached tokens do not see the block's newly committed tokens until the next block."""

    def __init__(self, vlm: MaskedDiffusionVLM, batch: dict[str, Any], features: torch.Tensor, cache: str):
        self.vlm, self.batch, self.features, self.mode = vlm, batch, features, cache
        self.prompt = batch["input_ids"].shape[1]
        self.shift = int(vlm.cfg.diffusion.shifted_logits)
        self.cache = None

    def window(self, lo: int, hi: int) -> tuple[int, int]:
        """The token positions whose logits score answer positions lo:hi (shifted: one earlier)."""
        return self.prompt + lo - self.shift, self.prompt + hi - self.shift

    def mode_for(self, tokens: torch.Tensor, hi: int) -> str:
        """``dual`` with nothing after the block (the last block, or a one-block answer) is ``prefix``:
        there is no suffix to keep, and splicing it out of the cache would only copy the cache."""
        return "prefix" if self.mode == "dual" and self.prompt + hi >= tokens.shape[1] else self.mode

    def refresh(self, tokens: torch.Tensor, attention_mask: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        from transformers import DynamicCache

        inputs, injecting = self.vlm.answer_inputs(self.batch, tokens, attention_mask, self.features)
        start, end = self.window(lo, hi)
        mode = self.mode_for(tokens, hi)
        if mode == "none":
            with injecting:
                return self.vlm.token_logits(self.vlm.model, inputs, tokens.shape[1] - self.prompt)[:, lo:hi]
        self.cache = DynamicCache()
        keep = tokens.shape[1] - start  # the LM head runs from the block on
        head = {"logits_to_keep": keep} if self.vlm.takes_logits_to_keep else {}
        with injecting:
            logits = self.vlm.model(**inputs, cache=self.cache, use_cache=True, **head).logits[:, -keep:][:, : end - start]
        if mode == "prefix":
            self.cache.crop(start - tokens.shape[1])  # keep the tokens before the block
        else:  # dual: everything but the block's window and its tokens (shifted: one more, its last token)
            after = self.prompt + hi
            for layer in self.cache.layers:
                layer.keys = torch.cat([layer.keys[:, :, :start], layer.keys[:, :, after:]], 2)
                layer.values = torch.cat([layer.values[:, :, :start], layer.values[:, :, after:]], 2)
        return logits

    def step(self, tokens: torch.Tensor, attention_mask: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        if self.mode == "none":
            return self.refresh(tokens, attention_mask, lo, hi)
        start, _ = self.window(lo, hi)
        positions = position_ids_for(attention_mask)
        if self.mode_for(tokens, hi) == "prefix":
            new, order = slice(start, None), attention_mask
        else:  # the cache holds prefix then suffix: the mask follows that order, the block comes last
            after = self.prompt + hi  # the block's tokens are all fed, so a committed one is seen at once
            new = slice(start, after)
            order = torch.cat([attention_mask[:, :start], attention_mask[:, after:], attention_mask[:, start:after]], 1)
        inputs = {**self.vlm.inputs_without_pixels(self.batch), "input_ids": tokens[:, new], "attention_mask": order,
                  "position_ids": positions[:, new]}
        logits = self.vlm.model(**inputs, cache=self.cache, use_cache=True).logits[:, : hi - lo]
        self.cache.crop(-tokens[:, new].shape[1])  # drop what this step appended
        return logits
