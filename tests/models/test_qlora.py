import bitsandbytes as bnb
import torch

from defend.data import load_samples
from defend.models import load_model
from defend.models.lora import apply_lora, language_model_linear_names


def test_qlora_quantizes_the_language_model_to_nf4_and_trains_lora(make_cfg):
    # bitsandbytes quantizes in blocks of 64 along the input dim: the text model needs >= 64 wide
    cfg = make_cfg("mllm", "quant.load_in_4bit=true", "dataset.max_samples=2", "tiny.text_hidden=64")
    vlm = load_model(cfg)
    modules = dict(vlm.model.named_modules())
    lm_linears = language_model_linear_names(vlm.model)
    assert lm_linears and all(isinstance(modules[n], bnb.nn.Linear4bit) for n in lm_linears)
    assert all(modules[n].weight.quant_state.quant_type == "nf4" for n in lm_linears)
    assert all(modules[n].weight.dtype == torch.float32 for n in lm_linears)  # quant storage = compute dtype
    vision = [m for n, m in modules.items() if "vision_tower" in n and isinstance(m, torch.nn.Linear)]
    assert vision and not any(isinstance(m, bnb.nn.Linear4bit) for m in vision)

    vlm.model = apply_lora(vlm.model, cfg.lora, quantized=True)
    loss = vlm.loss(vlm.train_collator()(load_samples(cfg.dataset)))
    loss.backward()
    lora_grads = [p.grad for n, p in vlm.model.named_parameters() if "lora_" in n]
    assert lora_grads and all(g is not None for g in lora_grads)
    assert any(g.abs().sum() > 0 for g in lora_grads)
    assert not any(p.requires_grad for n, p in vlm.model.named_parameters() if "lora_" not in n)
