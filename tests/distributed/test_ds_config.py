import json

import pytest

from defend.config import ConfigError, load_config
from defend.engine.ds_config import DS_CONFIG_DIR, check_combination, load_ds_config, resolve_auto_values, zero_stage


def leaves(node):
    if isinstance(node, dict):
        for value in node.values():
            yield from leaves(value)
    else:
        yield node


@pytest.mark.parametrize("name", ["zero0", "zero2", "zero3", "zero3_offload"])
def test_every_shipped_config_resolves_with_no_auto_left(name):
    cfg = load_config(None, ["train.micro_batch_size=3", "train.grad_accum=2", "train.lr=5e-4", "model.dtype=bfloat16"])
    ds = resolve_auto_values(load_ds_config(name), cfg, world_size=4, hidden_size=64)
    assert "auto" not in list(leaves(ds))
    assert ds["train_batch_size"] == 3 * 2 * 4
    assert ds["optimizer"]["params"]["lr"] == 5e-4 and ds["optimizer"]["params"]["torch_adam"] is True
    assert ds["bf16"]["enabled"] is True


def test_zero3_buckets_come_from_the_text_models_hidden_size(make_cfg):
    from defend.engine.engine import text_hidden_size

    cfg = make_cfg("mllm", "tiny.text_hidden=48", "tiny.vision_hidden=32", "deepspeed=zero3")
    hidden = text_hidden_size(cfg)  # nested under text_config in the LLaVA config, not the vision size
    assert hidden == 48
    ds = resolve_auto_values(load_ds_config("zero3"), cfg, 2, hidden)
    zero = ds["zero_optimization"]
    assert (zero["reduce_bucket_size"], zero["stage3_prefetch_bucket_size"],
            zero["stage3_param_persistence_threshold"]) == (48 * 48, int(0.9 * 48 * 48), 480)
    assert zero_stage(ds) == 3 and zero["stage3_gather_16bit_weights_on_model_save"] is True


def test_an_auto_we_cannot_resolve_names_its_key(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3, "sub_group_size": "auto"}}))
    with pytest.raises(ConfigError, match="'zero_optimization.sub_group_size'"):
        resolve_auto_values(load_ds_config(str(path)), load_config(None), 1)


@pytest.mark.parametrize("overrides, message", [
    (["deepspeed=zero3", "quant.load_in_8bit=true"], "ZeRO-3 cannot shard int8"),
    (["deepspeed=zero3", "model.device_map=auto"], "remove model.device_map"),
    (["deepspeed=zero2", "model.device_map=auto", "launcher=torchrun"], "each rank holds the model"),
    (["quant.load_in_4bit=true", "lora.enabled=false"], "set lora.enabled=true"),
    (["quant.load_in_4bit=true", "quant.load_in_8bit=true"], "keep one"),
])
def test_combinations_that_cannot_work_fail_at_config_time(overrides, message):
    cfg = load_config(None, overrides)
    with pytest.raises(ConfigError, match=message):
        check_combination(cfg, load_ds_config(cfg.deepspeed))


def test_parameter_offload_needs_stage_3(tmp_path):
    ds = load_ds_config("zero2")
    ds["zero_optimization"]["offload_param"] = {"device": "cpu"}
    with pytest.raises(ConfigError, match="offload_param needs ZeRO stage 3"):
        check_combination(load_config(None), ds)


def test_shipped_configs_are_the_documented_ones():
    assert {p.stem for p in DS_CONFIG_DIR.glob("*.json")} == {"zero0", "zero2", "zero3", "zero3_offload"}
