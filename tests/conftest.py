"""Test-wide settings: offline, one thread, a private model cache shared by the session."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def defend_cache(tmp_path_factory):
    """Tiny models are built once per session into a private cache, never into ~/.cache."""
    path = tmp_path_factory.mktemp("defend_cache")
    previous = os.environ.get("DEFEND_CACHE")
    os.environ["DEFEND_CACHE"] = str(path)
    yield path
    if previous is None:
        os.environ.pop("DEFEND_CACHE", None)
    else:
        os.environ["DEFEND_CACHE"] = previous


# A very small model of the shipped tiny architecture: 16 image tokens, one layer each side.
TINY_TEST_OVERRIDES = [
    "model.path=tiny",
    "tiny.vision_hidden=32",
    "tiny.text_hidden=32",
    "tiny.vision_layers=1",
    "tiny.text_layers=1",
    "tiny.heads=2",
    "tiny.patch_size=16",
    "train.max_length=64",
    "diffusion.gen_length=4",
    "diffusion.steps=4",
    "diffusion.block_length=4",
]


@pytest.fixture
def make_cfg(tmp_path):
    """``make_cfg(family, *overrides)``: a test config on the small tiny model, output in tmp."""
    from defend.config import load_config

    def make(family: str = "mllm", *overrides: str):
        return load_config(None, [*TINY_TEST_OVERRIDES, f"model.family={family}",
                                  f"output_dir={tmp_path / 'run'}", *overrides])

    return make
