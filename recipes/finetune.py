"""Fine-tune a vision-language model of either family: full, LoRA or QLoRA, on a DeepSpeed engine.

    defend run finetune --config finetune_tiny_mllm train.max_steps=50

Reads (image, prompt, response) samples, trains, and writes into ``output_dir``:
``config.yaml``, ``finetune.log``, ``train_log.jsonl`` (loss per logged step), and the result:
``adapter/`` (peft format) for LoRA/QLoRA or ``model/`` (save_pretrained) for full training.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from defend.atomic import atomic_dir, write_json
from defend.config import Config
from defend.data import load_samples
from defend.engine.distributed import rank
from defend.engine.engine import build_engine
from defend.models import load_model
from defend.models.lora import apply_lora
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
        cfg, engine = self.cfg, self.engine
        engine.train()
        step, losses, started = 0, [], time.perf_counter()
        log_path = self.out / "train_log.jsonl"
        log_path.unlink(missing_ok=True)
        progress = tqdm(total=self.total_steps, desc="finetune", disable=rank() != 0)
        batches = self._batches()
        while step < self.total_steps:
            window = []
            for _ in range(cfg.train.grad_accum):
                loss = self.vlm.loss(next(batches), model=engine)
                engine.backward(loss)
                engine.step()
                window.append(loss.item())
            step += 1
            losses.append(sum(window) / len(window))
            progress.update(1)
            progress.set_postfix(loss=f"{losses[-1]:.4f}")
            if step % cfg.train.log_every == 0 or step == self.total_steps:
                recent = losses[-cfg.train.log_every:]
                record = {"step": step, "loss": sum(recent) / len(recent), "lr": engine.get_lr()[0],
                          "elapsed_s": round(time.perf_counter() - started, 2)}
                with log_path.open("a") as handle:
                    handle.write(json.dumps(record) + "\n")
                self.log.info("step %d/%d loss %.4f lr %.2e", step, self.total_steps, record["loss"], record["lr"])
        progress.close()
        return {"steps": step, "losses": losses, "train_seconds": round(time.perf_counter() - started, 2)}

    def _batches(self):
        while True:
            yield from self.loader

    def save(self) -> Path:
        model = self.vlm.model
        target = self.out / ("adapter" if self.cfg.lora.enabled else "model")
        if rank() == 0:
            with atomic_dir(target) as tmp:
                model.save_pretrained(tmp)
                if not self.cfg.lora.enabled:
                    self.vlm.processor.save_pretrained(tmp)
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
    summary = {"steps": result["steps"], "first_loss": result["losses"][0], "final_loss": result["losses"][-1],
               "train_seconds": result["train_seconds"], "saved": str(saved)}
    write_json(Path(cfg.output_dir) / "train_summary.json", summary)
    return summary


if __name__ == "__main__":
    from defend.cli import recipe_entry

    recipe_entry(recipe_main)
