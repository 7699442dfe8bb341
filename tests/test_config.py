import pytest

from defend import cli
from defend.config import ConfigError, load_config, recipes_config_dir
from defend.engine.ds_config import load_ds_config

SHIPPED = sorted(p.stem for p in recipes_config_dir().glob("*.yaml"))


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_config_validates(name, capsys):
    assert cli.main(["validate", name]) == 0
    assert f"# {name}: valid" in capsys.readouterr().out


def test_shipped_configs_exist_for_both_recipes():
    assert {"finetune_tiny_mllm", "finetune_tiny_mdlm", "evaluate_tiny_mllm", "evaluate_tiny_mdlm"} <= set(SHIPPED)


def test_overrides_are_typed_by_the_schema():
    cfg = load_config("finetune_tiny_mllm", ["train.lr=1e-4", "model.path=007", "lora.target_modules=[q_proj,v_proj]",
                                             "train.max_steps=null", "train.epochs=2"])
    assert cfg.train.lr == 1e-4 and isinstance(cfg.train.lr, float)
    assert cfg.model.path == "007"
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.train.max_steps is None
    assert cfg.train.epochs == 2.0 and isinstance(cfg.train.epochs, float)


def test_unknown_override_key_names_the_closest_valid_key():
    with pytest.raises(ConfigError, match=r"unknown config key 'train\.lrr'.*Did you mean 'train\.lr'"):
        load_config("finetune_tiny_mllm", ["train.lrr=1e-4"])


def test_unknown_key_in_a_yaml_file_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  famly: mllm\n")
    with pytest.raises(ConfigError, match=rf"{path}.*'model\.famly'.*Did you mean 'model\.family'"):
        load_config(str(path))


def test_wrong_type_names_key_and_expected_type():
    with pytest.raises(ConfigError, match=r"'train\.micro_batch_size' must be int, got str 'abc'"):
        load_config("finetune_tiny_mllm", ["train.micro_batch_size=abc"])


def test_wrong_type_in_a_yaml_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("lora:\n  enabled: maybe\n")
    with pytest.raises(ConfigError, match=rf"{path}: 'lora\.enabled' must be bool"):
        load_config(str(path))


def test_choice_outside_the_allowed_values_lists_them():
    with pytest.raises(ConfigError, match=r"'model\.family' must be one of 'mllm', 'mdlm', got 'gpt'"):
        load_config(None, ["model.family=gpt"])


def test_unknown_config_name_suggests_a_shipped_one():
    with pytest.raises(ConfigError, match="Did you mean 'finetune_tiny_mllm'"):
        load_config("finetune_tiny_mlm")


def test_validate_command_fails_with_exit_2_and_the_key(capsys):
    assert cli.main(["validate", "finetune_tiny_mllm", "train.lr=fast"]) == 2
    assert "'train.lr' must be float" in capsys.readouterr().err


def test_cp_copies_a_recipe_and_a_config(tmp_path, capsys):
    assert cli.main(["cp", "finetune", str(tmp_path / "my_finetune.py")]) == 0
    assert "class FinetuneRecipe" in (tmp_path / "my_finetune.py").read_text()
    assert cli.main(["cp", "finetune_tiny_mdlm", str(tmp_path)]) == 0
    assert load_config(str(tmp_path / "finetune_tiny_mdlm.yaml")).model.family == "mdlm"
    assert cli.main(["cp", "finetune", str(tmp_path / "my_finetune.py")]) == 2  # never overwrites


def test_ls_lists_recipes_and_configs(capsys):
    assert cli.main(["ls"]) == 0
    out = capsys.readouterr().out
    assert "finetune" in out and "evaluate" in out and "finetune_tiny_mdlm" in out


def test_unknown_deepspeed_config_is_a_clear_error():
    with pytest.raises(ConfigError, match="did you mean 'zero2'"):
        load_ds_config("zero22")
