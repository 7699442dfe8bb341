"""Fine-tune a vision-language model of either family: full, LoRA or QLoRA, on a DeepSpeed engine.

    defend run finetune --config finetune_tiny_mllm train.max_steps=50

Reads (image, prompt, response) samples, trains, and writes into ``output_dir``:
``config.yaml``, ``finetune.log``, ``train_log.jsonl`` (loss per logged step), and the result:
``adapter/`` (peft format) for LoRA/QLoRA or ``model/`` (save_pretrained) for full training.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from defend.atomic import write_json
from defend.config import Config
from defend.data import load_samples
from defend.engine.engine import build_engine
from defend.engine.loop import endless, train_loop, train_summary
from defend.models import load_model
from defend.models.lora import apply_lora
from defend.models.saving import save_model_folder
from defend.models.vision import find_vision_tower
from defend.run_dir import start_run


class FinetuneRecipe:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.out = Path(cfg.output_dir)

    def setup(self) -> None:
        cfg = self.cfg
        self.samples = load_samples(cfg.dataset)
        self.vlm = load_model(cfg)
        collate = self.vlm.train_collator()
        collate(self.samples[: cfg.train.micro_batch_size])  # bad rows or lengths fail before any output
        self.log = start_run(cfg, "finetune")
        if cfg.train.freeze_vision_tower:
            find_vision_tower(self.vlm.model).requires_grad_(False)
        if cfg.lora.enabled:
            self.vlm.model = apply_lora(self.vlm.model, cfg.lora, quantized=cfg.quant.load_in_4bit)
        trainable = sum(p.numel() for p in self.vlm.model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.vlm.model.parameters())
        self.log.info("%d samples; trainable params %d of %d", len(self.samples), trainable, total)
        generator = torch.Generator().manual_seed(cfg.seed)
        self.loader = DataLoader(self.samples, batch_size=cfg.train.micro_batch_size, shuffle=True,
                                 collate_fn=collate, generator=generator, drop_last=True)
        steps_per_epoch = len(self.loader) // cfg.train.grad_accum
        self.total_steps = cfg.train.max_steps or max(1, math.ceil(cfg.train.epochs * steps_per_epoch))
        self.engine = build_engine(self.vlm.model, cfg, self.total_steps)

    def train(self) -> dict:
        return train_loop(self.engine, endless(self.loader), lambda batch: self.vlm.loss(batch, model=self.engine),
                          self.total_steps, self.cfg.train, self.log, self.out / "train_log.jsonl", desc="finetune")

    def save(self) -> Path:
        lora = self.cfg.lora.enabled
        target = save_model_folder(self.vlm.model, self.out / ("adapter" if lora else "model"),
                                   None if lora else self.vlm.processor)
        self.log.info("saved %s", target)
        return target

    def cleanup(self) -> None:
        self.engine.destroy()


def recipe_main(cfg: Config) -> dict:
    recipe = FinetuneRecipe(cfg)
    recipe.setup()
    result = recipe.train()
    saved = recipe.save()
    recipe.cleanup()
    summary = train_summary(result, saved)
    write_json(Path(cfg.output_dir) / "train_summary.json", summary)
    return summary


if __name__ == "__main__":
    from defend.cli import recipe_entry

    recipe_entry(recipe_main)
