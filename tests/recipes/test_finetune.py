import json

import pytest
import torch

from defend.config import load_config
from defend.data import load_samples
from defend.models import load_model
from recipes.finetune import FinetuneRecipe, recipe_main


@pytest.mark.parametrize("family", ["mllm", "mdlm"])
@pytest.mark.parametrize("lora", ["true", "false"])
def test_a_short_finetune_lowers_the_loss(make_cfg, family, lora):
    # 64 samples seen repeatedly; the loss is measured on all of them before and after training with
    # the same noise (the diffusion loss draws masks), so the numbers compare. A random-init model's
    # frozen lm_head caps what LoRA alone can reach (logits are bounded by |row| * |normed h|), so
    # LoRA's bar is lower than full training's.
    cfg = make_cfg(family, "dataset.max_samples=64", "train.max_steps=60", "train.micro_batch_size=16",
                   "train.lr=5e-3", "train.log_every=10", "lora.r=16", "tiny.text_hidden=64", f"lora.enabled={lora}")
    recipe = FinetuneRecipe(cfg)
    recipe.setup()
    batch = recipe.vlm.train_collator()(recipe.samples)

    def fixed_noise_loss() -> float:
        torch.manual_seed(0)
        with torch.no_grad():
            return recipe.vlm.loss(batch, model=recipe.engine).item()

    before = fixed_noise_loss()
    result = recipe.train()
    after = fixed_noise_loss()
    recipe.cleanup()
    log = [json.loads(line) for line in open(f"{cfg.output_dir}/train_log.jsonl")]
    assert [r["step"] for r in log] == [10, 20, 30, 40, 50, 60]
    assert result["steps"] == 60
    if lora == "true":
        assert after < before - 0.5, (before, after)
    else:
        assert after < 0.3 * before, (before, after)


def test_lora_adapter_reloads_with_peft_and_gives_identical_logits(make_cfg):
    cfg = make_cfg("mdlm", "dataset.max_samples=16", "train.max_steps=4", "train.lr=1e-2", "train.micro_batch_size=4")
    recipe = FinetuneRecipe(cfg)
    recipe.setup()
    recipe.train()
    adapter = recipe.save()
    recipe.cleanup()
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in adapter.iterdir()}

    batch = recipe.vlm.train_collator()(load_samples(cfg.dataset)[:4])
    inputs = recipe.vlm.model_inputs(batch)
    trained = recipe.vlm.model.eval()
    with torch.no_grad():
        expected = trained(**inputs).logits
        reloaded = load_model(load_config(str(adapter.parent / "config.yaml"), [f"model.adapter={adapter}"]))
        from peft import PeftModel

        assert isinstance(reloaded.model, PeftModel)
        got = reloaded.model.eval()(**inputs).logits
        base = load_model(load_config(str(adapter.parent / "config.yaml"))).model.eval()(**inputs).logits
    assert torch.allclose(got, expected, atol=1e-6)
    assert not torch.allclose(base, expected, atol=1e-3)  # the adapter really changed the model


def test_full_finetune_saves_a_loadable_model_folder(make_cfg):
    cfg = make_cfg("mllm", "lora.enabled=false", "dataset.max_samples=8", "train.max_steps=2", "train.micro_batch_size=4")
    summary = recipe_main(cfg)
    saved = summary["saved"]
    assert saved.endswith("/model")
    again = load_model(load_config(None, [f"model.path={saved}", "train.max_length=64"]))
    assert sum(p.numel() for p in again.model.parameters()) > 0


def test_a_finetune_from_an_adapter_trains_that_adapter_further(make_cfg, tmp_path):
    """model.adapter + LoRA: the saved adapter starts from the given one (same modules, one LoRA layer
    deep, not a new adapter on top) and its weights move; the given folder is left as it was."""
    from safetensors.torch import load_file

    first = recipe_main(make_cfg("mllm", "dataset.max_samples=16", "train.max_steps=3", "train.lr=1e-2",
                                 "train.micro_batch_size=4", f"output_dir={tmp_path / 'first'}"))
    given = load_file(tmp_path / "first" / "adapter" / "adapter_model.safetensors")
    recipe_main(make_cfg("mllm", "dataset.max_samples=16", "train.max_steps=3", "train.lr=1e-2",
                         "train.micro_batch_size=4", f"model.adapter={tmp_path / 'first' / 'adapter'}",
                         f"output_dir={tmp_path / 'second'}"))
    assert load_file(tmp_path / "first" / "adapter" / "adapter_model.safetensors").keys() == given.keys()
    further = load_file(tmp_path / "second" / "adapter" / "adapter_model.safetensors")
    assert further.keys() == given.keys()  # the same adapter's tensors: no second LoRA wrapped around it
    moved = [k for k in given if not torch.equal(given[k], further[k])]
    assert len(moved) == len(given), f"{len(given) - len(moved)} of {len(given)} tensors did not train"
    assert first["steps"] == 3
