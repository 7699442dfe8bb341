from defend.models import load_model
from defend.models.lora import apply_lora, language_model_linear_names


def adapted(model) -> set[str]:
    return {n.removesuffix(".lora_A") for n, _ in model.named_modules() if n.endswith(".lora_A")}


def test_language_model_alias_targets_only_the_text_model(make_cfg):
    cfg = make_cfg("mllm")
    vlm = load_model(cfg)
    names = language_model_linear_names(vlm.model)
    lora = apply_lora(vlm.model, cfg.lora, quantized=False)
    assert {n.removeprefix("base_model.model.") for n in adapted(lora)} == set(names)
    assert not any("vision_tower" in n or "projector" in n for n in adapted(lora))


def test_a_target_list_may_add_modules_to_the_language_model_alias(make_cfg):
    cfg = make_cfg("mllm", "lora.target_modules=[language_model,multi_modal_projector.linear_1,multi_modal_projector.linear_2]")
    vlm = load_model(cfg)
    names = language_model_linear_names(vlm.model)
    lora = apply_lora(vlm.model, cfg.lora, quantized=False)
    got = {n.removeprefix("base_model.model.") for n in adapted(lora)}
    assert got == set(names) | {"model.multi_modal_projector.linear_1", "model.multi_modal_projector.linear_2"}


def test_a_container_name_targets_every_linear_layer_inside_it(make_cfg):
    import torch

    cfg = make_cfg("mllm", "lora.target_modules=[language_model,vision_tower]")
    vlm = load_model(cfg)
    tower = [n for n, m in vlm.model.named_modules() if "vision_tower." in n and isinstance(m, torch.nn.Linear)]
    names = language_model_linear_names(vlm.model)
    lora = apply_lora(vlm.model, cfg.lora, quantized=False)
    got = {n.removeprefix("base_model.model.") for n in adapted(lora)}
    assert tower and got == set(names) | set(tower)


def test_projector_alias_names_the_architectures_own_projector(make_cfg):
    from defend.models.archs import TINY_ARCHS, architecture

    expected = {"llava": {"model.multi_modal_projector.linear_1", "model.multi_modal_projector.linear_2"},
                "blip2": {"language_projection"},
                "qwen2_vl": {"model.visual.merger.mlp.0", "model.visual.merger.mlp.2"},
                "paligemma": {"model.multi_modal_projector.linear"}}
    for arch in TINY_ARCHS:
        cfg = make_cfg("mllm", f"tiny.arch={arch}", "lora.target_modules=[language_model,projector]")
        model = load_model(cfg).model
        names = set(language_model_linear_names(model))
        lora = apply_lora(model, cfg.lora, quantized=False)
        got = {n.removeprefix("base_model.model.") for n in adapted(lora)}
        projector = got - names
        if arch == "gemma3":  # a bare weight matrix, no linear layer: peft trains the projector in full
            trained = [n for n, p in lora.named_parameters() if p.requires_grad and "multi_modal_projector" in n]
            assert not projector and trained and all("modules_to_save" in n for n in trained)
            continue
        assert projector, arch
        assert projector == expected.get(arch, projector), (arch, projector)
        own = architecture(model.config).projector
        assert all(any(p in n.split(".") for p in own) for n in projector), (arch, projector)
