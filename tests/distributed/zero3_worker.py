"""Run by torchrun (2 ranks) from test_zero3_model.py: a ZeRO-3 LoRA fine-tune through the finetune
recipe, then steps where one rank's samples have no image at all while the other's have images, then
the adapter save and the trained model's logits on a fixed batch (rank 0 writes them)."""
import sys
from pathlib import Path

import torch

from defend.config import load_config
from defend.data import Sample
from defend.engine.distributed import rank
from recipes.finetune import FinetuneRecipe

out, family = Path(sys.argv[1]), sys.argv[2]
cfg = load_config("finetune_tiny_mllm", [*sys.argv[3:], f"output_dir={out}", f"model.family={family}"])
recipe = FinetuneRecipe(cfg)
recipe.setup()
params = list(recipe.vlm.model.parameters())
assert all(hasattr(p, "ds_id") for p in params), "ZeRO-3 should have partitioned every parameter"
frozen = [p for p in params if not p.requires_grad]
# built sharded: no rank ever held a whole frozen weight (ds_tensor: this rank's part of it)
assert sum(p.ds_tensor.numel() for p in frozen) < sum(p.ds_numel for p in frozen)
recipe.train()

# mixed batches: rank 0 text only (no pixel_values at all), rank 1 with images
image = recipe.samples[0].image
rows = [Sample(id=f"m{i}", image=None if rank() == 0 else image, prompt="what color is the shape?",
               response="red") for i in range(4)]
batch = recipe.vlm.train_collator()(rows)
# rank 0: four text rows plus the collator's label-free blank-image row; rank 1: four image rows
assert batch["input_ids"].shape[0] == (5 if rank() == 0 else 4) and batch["pixel_values"].shape[0] == (1 if rank() == 0 else 4)
for _ in range(2):
    loss = recipe.vlm.loss(batch, model=recipe.engine)
    recipe.engine.backward(loss)
    recipe.engine.step()

adapter = recipe.save()
probe = recipe.vlm.train_collator()(recipe.samples[:4])
recipe.engine.eval()
with torch.no_grad():
    torch.manual_seed(0)
    logits = recipe.engine(**recipe.vlm.model_inputs(probe)).logits
if rank() == 0:
    torch.save({"logits": logits, "probe": probe}, out / "trained_logits.pt")
recipe.cleanup()
