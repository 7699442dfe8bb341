"""The baseline of bench/train_throughput.py: a plain DeepSpeed loop, no recipe around it.

Same model (tiny LoRA), same batches, same resolved DeepSpeed config as the finetune recipe:
``deepspeed.initialize``, then forward / backward / step in a bare loop. Run under torchrun:

    torchrun --nproc_per_node 2 bench/reference_loop.py OUT_JSON STEPS key=value ...
"""
from __future__ import annotations

import json
import sys
import time

import deepspeed
import torch
from torch.utils.data import DataLoader, DistributedSampler

from defend.config import load_config
from defend.data import load_samples
from defend.engine.distributed import init_distributed, rank, world_size
from defend.engine.ds_config import load_ds_config, resolve_auto_values
from defend.models import load_model
from defend.models.lora import apply_lora


def main(out: str, steps: int, overrides: list[str]) -> None:
    cfg = load_config("finetune_tiny_mllm", overrides)
    init_distributed()
    ds = resolve_auto_values(load_ds_config(cfg.deepspeed), cfg, world_size(), None)
    vlm = load_model(cfg)
    model = apply_lora(vlm.model, cfg.lora, quantized=cfg.quant.load_in_4bit)
    samples = load_samples(cfg.dataset)
    sampler = DistributedSampler(samples, num_replicas=world_size(), rank=rank(), seed=cfg.seed)
    loader = DataLoader(samples, batch_size=cfg.train.micro_batch_size, sampler=sampler,
                        collate_fn=vlm.train_collator(), drop_last=True)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                                      config=ds)
    marks = []
    batches = iter(loader)
    for _ in range(steps):
        batch = next(batches)
        inputs = vlm.model_inputs(batch)
        loss = engine(**inputs, labels=batch["labels"]).loss
        engine.backward(loss)
        engine.step()
        loss.item()
        marks.append(time.perf_counter())
    if rank() == 0:
        with open(out, "w") as handle:
            json.dump({"step_marks": marks}, handle)


if __name__ == "__main__":
    torch.manual_seed(0)
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3:])
