"""A new objective is one file: its settings' dataclass and its class, registered by name; a config
names it through ``plugins`` and sets ``objective.<name>.*``, checked like every built-in key."""
import re
import subprocess
import sys
import time

import pytest
import yaml

from defend.config import ConfigError, load_config
from recipes.finetune import recipe_main

PLUGIN = '''"""An objective of our own: the task loss of every row times a constant."""
from dataclasses import dataclass

import torch

from defend.objectives import Objective, register


@dataclass
class ScaledConfig:
    factor: float = 1.0


@register("scaled", config=ScaledConfig)
class Scaled(Objective):
    def loss_scale(self, scores, batch, step):
        return torch.full((len(batch["sample_ids"]), 1), self.ctx.cfg.objective.scaled.factor)
'''
RUN = ["dataset.max_samples=8", "train.micro_batch_size=4", "train.max_steps=2", "train.log_every=1"]


@pytest.fixture
def plugin_dir(tmp_path, monkeypatch):
    folder = tmp_path / "plugins"
    folder.mkdir()
    (folder / "scaled_objective.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(folder))
    return folder


def test_an_objective_in_one_file_trains_with_its_own_settings(make_cfg, plugin_dir, tmp_path):
    plain = recipe_main(make_cfg("mllm", *RUN, f"output_dir={tmp_path / 'plain'}"))
    cfg = make_cfg("mllm", *RUN, "plugins=[scaled_objective]", "objective.name=scaled", "objective.scaled.factor=0.25",
                   f"output_dir={tmp_path / 'scaled'}")
    scaled = recipe_main(cfg)
    # the same model and first batch: the first step's loss is exactly the plugin's factor times the plain one
    assert scaled["first_loss"] == pytest.approx(0.25 * plain["first_loss"], rel=1e-5)
    written = yaml.safe_load((tmp_path / "scaled" / "config.yaml").read_text())
    assert written["objective"] == {"name": "scaled", "scaled": {"factor": 0.25}}  # what the run read, no more


def test_the_plugins_settings_are_checked_at_load(plugin_dir):
    with pytest.raises(ConfigError, match=r"unknown config key 'objective\.scaled\.factr'. Did you mean"
                                          r" 'objective\.scaled\.factor'\?"):
        load_config(None, ["plugins=[scaled_objective]", "objective.name=scaled", "objective.scaled.factr=2"])
    with pytest.raises(ConfigError, match=r"'objective\.scaled\.factor' must be float"):
        load_config(None, ["plugins=[scaled_objective]", "objective.name=scaled", "objective.scaled.factor=big"])
    with pytest.raises(ConfigError, match=r"plugins: cannot import 'no_such_plugin'"):
        load_config(None, ["plugins=[no_such_plugin]"])


@pytest.mark.parametrize("overrides, message", [
    (["objective.name=pcrr"], r"unknown objective 'pcrr'"),
    (["objective.name=pcr", "objective.pcr.fractoin=0.3"], r"Did you mean 'objective\.pcr\.fraction'\?"),
    (["attack.name=blended", "attack.blended.alpah=0.3"], r"Did you mean 'attack\.blended\.alpha'\?"),
])
def test_defend_validate_refuses_a_typo_in_under_two_seconds_without_loading_a_model(overrides, message):
    # model.path names no folder: had validate gone past the config (to the model checks) it would say so too
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "defend.cli", "validate", "finetune_tiny_mllm",
                           "model.path=/nonexistent/model", *overrides], capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - started
    assert done.returncode == 2
    assert re.search(message, done.stderr), done.stderr
    assert "/nonexistent/model" not in done.stderr
    assert elapsed < 2.0, f"{elapsed:.2f} s"


def test_a_plugin_that_takes_a_name_already_registered_is_refused_naming_both(plugin_dir):
    (plugin_dir / "my_pcr.py").write_text(PLUGIN.replace('"scaled"', '"pcr"'))  # a built-in's name
    (plugin_dir / "scaled_again.py").write_text(PLUGIN)  # another plugin's name (scaled_objective's)
    with pytest.raises(ConfigError, match=r"my_pcr registers the objective 'pcr', which defend\.objectives\.pcr"
                                          r" already names; give yours another name"):
        load_config(None, ["plugins=[my_pcr]", "objective.name=pcr"])
    load_config(None, ["plugins=[scaled_objective]", "objective.name=scaled"])
    with pytest.raises(ConfigError, match="scaled_again registers the objective 'scaled', which scaled_objective"):
        load_config(None, ["plugins=[scaled_again]", "objective.name=scaled"])


def test_a_builtins_settings_are_read_without_importing_it_and_must_be_the_class_it_registers():
    from defend.objectives.settings import AblConfig, PcrConfig
    from defend.registry import Registry

    done = subprocess.run([sys.executable, "-c", "import sys; from defend.objectives import OBJECTIVES;"
                           " c = OBJECTIVES.config('pcr'); print(c.__name__, 'torch' in sys.modules,"
                           " 'defend.objectives.pcr' in sys.modules)"], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["PcrConfig", "False", "False"]
    registry = Registry("objective", "objective", {"x": __name__}, settings={"x": "defend.objectives.settings:PcrConfig"})
    assert registry.config("x") is PcrConfig

    class Impl:  # registered from this module, as the table says
        pass

    with pytest.raises(ConfigError, match=r"registers the objective 'x' with settings AblConfig, but its registry's"
                                          r" table names defend.objectives.settings:PcrConfig"):
        registry.register("x", config=AblConfig)(Impl)
    registry.register("x", config=PcrConfig)(Impl)
    assert registry.config("x") is PcrConfig
