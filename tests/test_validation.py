"""`defend validate` (and `defend run`, before any work) refuses each kind of bad input naming the key or
file and the fix; real tiny models and a real peft adapter, nothing loaded but their headers and configs."""
import json
import os
import shutil

import pytest

from defend import cli
from defend.config import ConfigError, load_config
from defend.validation import deepspeed_top_level_keys, local_resources, validate_config
from tests.conftest import TINY_TEST_OVERRIDES


def tiny_folder(*overrides):
    from defend.models.tiny import tiny_model_path

    return tiny_model_path(load_config(None, [*TINY_TEST_OVERRIDES, *overrides]).tiny, "mllm")


@pytest.fixture(scope="module")
def base():
    return tiny_folder()


@pytest.fixture(scope="module")
def adapter(base, tmp_path_factory):
    """A real LoRA adapter of ``base``, as peft saves it (random-init B: its shapes are what matter)."""
    from defend.models.loading import load_pretrained
    from defend.models.lora import apply_lora

    cfg = load_config(None, [*TINY_TEST_OVERRIDES, f"model.path={base}"])
    model, _ = load_pretrained(cfg)
    out = tmp_path_factory.mktemp("adapter") / "adapter"
    apply_lora(model, cfg.lora, quantized=False).save_pretrained(out)
    return out


def validate(tmp_path, *overrides):
    return validate_config(load_config(None, [*TINY_TEST_OVERRIDES, f"output_dir={tmp_path / 'run'}", *overrides]))


def write_ds(tmp_path, ds):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    return path


def test_a_good_tiny_config_with_its_adapter_passes(base, adapter, tmp_path, capsys):
    assert validate(tmp_path, f"model.path={base}", f"model.adapter={adapter}", "deepspeed=zero3",
                    "launcher=torchrun", "nproc=1") == []
    assert cli.main(["validate", "finetune_tiny_mllm", f"model.path={base}", f"model.adapter={adapter}",
                     f"output_dir={tmp_path / 'run'}"]) == 0
    captured = capsys.readouterr()
    assert "# finetune_tiny_mllm: valid" in captured.out and "warning" not in captured.err


def test_nproc_above_the_machine_names_the_resource_and_how_many_exist(tmp_path):
    cores, gpus = local_resources()
    have = f"{gpus} GPU" if gpus else f"{cores} CPU core"
    with pytest.raises(ConfigError, match=rf"nproc: .*nproc={(gpus or cores) + 1} but this machine has {have}.*"
                                          rf"Set nproc={gpus or cores} or fewer"):
        validate(tmp_path, "launcher=torchrun", f"nproc={(gpus or cores) + 1}")
    with pytest.raises(ConfigError, match=rf"nproc: launcher=ray .*needs {cores + 1} CPU cores, this machine has"
                                          rf" {cores}. Lower nproc or ray.cpus_per_worker"):
        validate(tmp_path, "launcher=ray", f"nproc={cores + 1}")
    validate(tmp_path, "launcher=none", f"nproc={cores + 1}")  # nproc means nothing without a launcher


def test_log_every_below_one_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.log_every: must be at least 1.*got 0; set train\.log_every=1"):
        validate(tmp_path, "train.log_every=0")


def test_bfloat16_on_a_cpu_that_emulates_it_warns_with_the_fix(tmp_path):
    import torch

    emulated = not torch.cuda.is_available() and not torch.ops.mkldnn._is_mkldnn_bf16_supported()
    warnings = validate(tmp_path, "model.dtype=bfloat16")
    assert [w for w in warnings if "set model.dtype=float32" in w and "without bf16 instructions" in w] == (
        warnings if emulated else [])
    assert len(warnings) == emulated
    assert validate(tmp_path, "model.dtype=float32") == []


@pytest.mark.parametrize("overrides, named", [
    (["diffusion.prefix_lm=true"], r"diffusion\.prefix_lm: .*set diffusion\.sampler=dream"),
    (["diffusion.gen_length=12", "diffusion.block_length=8"], r"diffusion\.gen_length \(12\) must be a multiple of"
                                                               r" diffusion\.block_length \(8\)"),
    (["diffusion.sampler=dream", "diffusion.top_k=-1"], r"diffusion\.top_k: .*got -1"),
])
def test_sampler_settings_that_do_not_fit_together_are_refused_for_a_masked_diffusion_model(tmp_path, overrides, named):
    with pytest.raises(ConfigError, match=named):
        validate(tmp_path, "model.family=mdlm", *overrides)
    validate(tmp_path, "model.family=mllm", *overrides)  # the autoregressive family reads none of them


@pytest.mark.parametrize("ds, named", [
    ({"train_micro_batch_size_per_gpu": "auto", "zero_optimisation": {"stage": 2}},
     "'zero_optimisation' (did you mean 'zero_optimization'?)"),
    ({"train_micro_batch_size_per_gpu": "auto", "zero_optimization": {"stage": 3, "offload_parm": {"device": "cpu"}}},
     "'zero_optimization.offload_parm' (did you mean 'zero_optimization.offload_param'?)"),
    ({"train_micro_batch_size_per_gpu": "auto", "zero_optimization": {"stage": 3, "offload_param": {"devce": "cpu"}}},
     "'zero_optimization.offload_param.devce' (did you mean 'zero_optimization.offload_param.device'?)"),
])
def test_deepspeed_keys_deepspeed_does_not_know_are_refused_with_the_closest_one(tmp_path, ds, named):
    path = write_ds(tmp_path, ds)
    with pytest.raises(ConfigError) as err:
        validate(tmp_path, f"deepspeed={path}")
    assert f"deepspeed: {path} has a key DeepSpeed does not know: {named}" in str(err.value)
    assert "fix the spelling or remove it" in str(err.value)


def test_the_known_deepspeed_keys_are_the_ones_deepspeed_reads(tmp_path):
    # top level: what DeepSpeed's own config parser looks up; ZeRO: its config model's fields and aliases
    assert {"zero_optimization", "optimizer", "bf16", "activation_checkpointing"} <= deepspeed_top_level_keys()
    good = {"train_micro_batch_size_per_gpu": "auto", "wall_clock_breakdown": False,
            "zero_optimization": {"stage": 3, "stage3_max_live_parameters": 1, "offload_param": {"device": "cpu"}}}
    assert validate(tmp_path, f"deepspeed={write_ds(tmp_path, good)}") == []
    removed = write_ds(tmp_path, {**good, "nebula": {"enabled": True}})  # read by DeepSpeed only to refuse it
    with pytest.raises(ConfigError, match=rf"deepspeed: {removed}: Nebula checkpointing has been removed.*Remove that"):
        validate(tmp_path, f"deepspeed={removed}")


@pytest.mark.parametrize("ds, overrides, named", [
    ({"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": "auto"}, ["train.micro_batch_size=8"],
     "'train_micro_batch_size_per_gpu' is 4 but train.micro_batch_size = 8"),
    ({"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": 4}, ["train.grad_accum=1"],
     "'gradient_accumulation_steps' is 4 but train.grad_accum = 1"),
    ({"train_batch_size": 16}, ["train.micro_batch_size=8", "train.grad_accum=2"],  # DeepSpeed would take 16 x 1
     "'train_micro_batch_size_per_gpu' is 16 (DeepSpeed derives it) but train.micro_batch_size = 8"),
])
def test_deepspeed_batch_values_that_contradict_train_are_refused(tmp_path, ds, overrides, named):
    path = write_ds(tmp_path, ds)
    with pytest.raises(ConfigError) as err:
        validate(tmp_path, f"deepspeed={path}", *overrides)
    assert f"deepspeed: {path}: " in str(err.value) and named in str(err.value)
    assert 'Set those keys to "auto" (filled from train.*)' in str(err.value)


def test_an_adapter_of_another_base_is_refused_by_shape_and_a_renamed_base_only_warns(base, adapter, tmp_path, capsys):
    other = tiny_folder("tiny.text_hidden=48")
    with pytest.raises(ConfigError) as err:
        validate(tmp_path, f"model.path={other}", f"model.adapter={adapter}")
    message = str(err.value)
    assert f"model.adapter: '{adapter}' does not fit model.path '{other}'" in message
    assert "lora_A.weight' is [8, 32], the base's model.language_model.layers.0" in message and "needs [8, 48]" in message
    assert f"names '{base}'" in message and "point model.path at that base" in message
    renamed = tmp_path / "renamed"
    shutil.copytree(adapter, renamed)
    settings = json.loads((renamed / "adapter_config.json").read_text())
    (renamed / "adapter_config.json").write_text(json.dumps({**settings, "base_model_name_or_path": "org/other-vlm"}))
    (warning,) = validate(tmp_path, f"model.path={base}", f"model.adapter={renamed}")
    assert "was trained on 'org/other-vlm'" in warning and "Its shapes fit" in warning
    moved = tmp_path / "moved" / base.name  # the base copied elsewhere under its own name: nothing to say
    shutil.copytree(base, moved)
    assert validate(tmp_path, f"model.path={moved}", f"model.adapter={adapter}") == []


def test_a_tokenizer_larger_than_the_embedding_table_is_refused(base, tmp_path):
    from transformers import AutoTokenizer

    folder = tmp_path / "grown"
    shutil.copytree(base, folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    rows = len(tokenizer)
    tokenizer.add_tokens(["<new_a>", "<new_b>"])  # added without resizing the embeddings
    tokenizer.save_pretrained(folder)
    with pytest.raises(ConfigError, match=rf"model\.path: the tokenizer in '{folder}' has {rows + 2} tokens but the"
                                          rf" model's embedding table has {rows} rows.*resize_token_embeddings"):
        validate(tmp_path, f"model.path={folder}")


@pytest.mark.parametrize("kind", ["under_a_file", "read_only"])
def test_an_output_dir_that_cannot_be_written_is_refused(tmp_path, kind):
    if kind == "under_a_file":
        (tmp_path / "file").write_text("x")
        target, expected = tmp_path / "file" / "run", rf"cannot be created: '{tmp_path / 'file'}' is a file"
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders")
        (tmp_path / "ro").mkdir(mode=0o500)
        target, expected = tmp_path / "ro" / "run", rf"nearest existing folder '{tmp_path / 'ro'}' is not writable"
    with pytest.raises(ConfigError, match=rf"output_dir: '{target}' {expected}.*"):
        validate_config(load_config(None, [*TINY_TEST_OVERRIDES, f"output_dir={target}"]))
    assert not target.exists() and sorted(p.name for p in tmp_path.rglob(".defend_write_probe_*")) == []


def test_every_problem_is_reported_at_once(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match=r"^2 problems:\n  - train\.log_every: .*\n  - output_dir: "):
        validate_config(load_config(None, [*TINY_TEST_OVERRIDES, "train.log_every=0",
                                           f"output_dir={tmp_path / 'file' / 'run'}"]))


def test_defend_run_refuses_before_any_work(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["run", "finetune", "--config", "finetune_tiny_mllm", *TINY_TEST_OVERRIDES, "train.log_every=0",
                     f"output_dir={out}"]) == 2
    assert "train.log_every" in capsys.readouterr().err and not out.exists()
