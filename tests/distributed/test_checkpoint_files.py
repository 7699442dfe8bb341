"""Checkpoints that are small, durable and safe to load: a LoRA run's holds the trainable state only,
a save goes through a fresh folder, rotation keeps what this run wrote, and random states never
unpickle code."""
import os
import pickle
from pathlib import Path

import pytest
import torch

from defend.config import ConfigError
from defend.engine.checkpoint import STATE_FILE, Checkpointer, complete_checkpoints, load_states


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    from defend.config import load_config
    from recipes.finetune import recipe_main
    from tests.conftest import TINY_TEST_OVERRIDES

    out = tmp_path_factory.mktemp("ckpt") / "run"
    cfg = load_config("finetune_tiny_mllm", [*TINY_TEST_OVERRIDES, "dataset.max_samples=16", "train.micro_batch_size=4",
                                             "train.max_steps=2", "train.save_every=1", "train.keep_checkpoints=5",
                                             "tiny.text_hidden=128", f"output_dir={out}"])
    recipe_main(cfg)
    return out


def test_a_lora_checkpoint_holds_the_adapter_and_its_optimizer_not_the_frozen_base(lora_run):
    adapter = folder_bytes(lora_run / "adapter")
    (checkpoint,) = [c for c in complete_checkpoints(lora_run / "checkpoints") if c.name == "step_000002"]
    size = folder_bytes(checkpoint)
    # adapter weights + two Adam moments + small states: a few adapters (measured 328 KB for a 103 KB
    # adapter); with the frozen base (this 128-wide tiny model: ~2 MB of weights) it would be several times that
    assert size < 8 * adapter + 200_000, (size, adapter)
    assert not list(lora_run.glob("checkpoints/*.partial"))


def test_random_states_load_as_plain_data_and_a_pickle_payload_is_refused(lora_run, tmp_path):
    checkpoint = complete_checkpoints(lora_run / "checkpoints")[-1]
    states = load_states(checkpoint / "rng_rank0.pt")
    assert isinstance(states["torch"], torch.Tensor) and isinstance(states["numpy"][1], torch.Tensor)

    class Payload:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    hostile = tmp_path / "rng_rank0.pt"
    hostile.write_bytes(pickle.dumps({"python": Payload()}))
    with pytest.raises(ConfigError, match="never unpickles code"):
        load_states(hostile)
    assert not (tmp_path / "pwned").exists()


def test_a_killed_save_is_never_resumed_and_rotation_keeps_what_this_run_wrote(tmp_path):
    root = tmp_path / "checkpoints"
    (root / "step_000009.partial").mkdir(parents=True)  # a save killed before its rename
    (root / "step_000009.partial" / STATE_FILE).write_text('{"step": 9}')
    old = root / "step_000050"  # a checkpoint of an earlier run with a higher step
    old.mkdir()
    (old / STATE_FILE).write_text('{"step": 50}')
    new = root / "step_000003"
    new.mkdir()
    (new / STATE_FILE).write_text('{"step": 3}')
    os.utime(old / STATE_FILE, ns=(1, 1))  # written long ago
    found = complete_checkpoints(root)
    assert found == [old, new]  # by time written: this run's step 3 is the newest, the partial is none
    assert Checkpointer(root, 1, 1, 4).find("auto") == new
