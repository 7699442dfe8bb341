"""A batch that cannot fit fails with a message naming the knobs, not a bare allocator error: a real
out-of-memory, the process's address space capped 20 MB above what it holds."""
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = """
import resource, sys
from defend.config import load_config
from defend.data import load_samples
from tests.conftest import TINY_TEST_OVERRIDES

big = [*TINY_TEST_OVERRIDES, "tiny.patch_size=4", "tiny.text_hidden=512", "train.max_length=512",
       "dataset.max_samples=64", "output_dir=" + sys.argv[2]]

def cap():
    used = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
    resource.setrlimit(resource.RLIMIT_AS, (used + 20 * 2**20, resource.RLIM_INFINITY))

if sys.argv[1] == "evaluate":
    from defend.models import load_model
    from recipes.evaluate import generate_all
    cfg = load_config(None, [*big, "dataset.split=test", "eval.max_new_tokens=2"])
    vlm = load_model(cfg)
    samples = load_samples(cfg.dataset)
    generate_all(vlm, samples[:2], 2, "warm-up")
    cap()
    generate_all(vlm, samples, 64, "clean")
elif sys.argv[1] == "purify":  # the block an actor purifies (defend/purify/ray_pool.py calls purify_block)
    import json
    from pathlib import Path
    from defend.models import load_model
    from defend.purify.blocks import plan_blocks, purify_block
    from defend.purify.masking import MaskedGenerator
    out = Path(sys.argv[2])
    source = out / "train.jsonl"
    out.mkdir(parents=True)
    rows = load_samples(load_config(None, ["dataset.split=test", "dataset.max_samples=64"]).dataset)
    source.write_text("".join(json.dumps({"id": s.id, "image": str(s.image), "prompt": s.prompt,
                                          "response": s.response}) + "\\n" for s in rows))
    cfg = load_config("purify_tiny_mllm", [*big, f"dataset.path={source}", "purify.batch_size=64",
                                           "eval.max_new_tokens=2"])
    vlm = load_model(cfg)
    vlm.model.eval()
    generate = MaskedGenerator(vlm, cfg.purify)
    warm = plan_blocks(source, 2, max_rows=2)[0]
    purify_block(cfg, source, warm, vlm, generate, out)
    block = plan_blocks(source, 64)[0]
    cap()
    purify_block(cfg, source, block, vlm, generate, out)
else:
    from recipes.finetune import FinetuneRecipe
    recipe = FinetuneRecipe(load_config("finetune_tiny_mllm", [*big, "train.micro_batch_size=64", "train.max_steps=1",
                                                               "deepspeed=zero0"]))
    recipe.setup()
    cap()
    recipe.train()
"""


@pytest.mark.parametrize("stage, knob", [("evaluate", "eval.batch_size (now 64)"),
                                         ("finetune", "train.micro_batch_size (now 64)"),
                                         ("purify", "purify.batch_size (now 64)")])
def test_a_batch_that_does_not_fit_names_the_knobs(stage, knob, tmp_path):
    done = subprocess.run([sys.executable, "-c", SCRIPT, stage, str(tmp_path / "run")], capture_output=True,
                          text=True, timeout=300, cwd=Path(__file__).parents[2])
    assert done.returncode != 0
    last = done.stderr.strip().splitlines()[-1]
    assert "defend.engine.memory.OutOfMemory:" in last and "ran out of memory (a batch of 64 rows x" in last
    assert knob in last and "train.max_length" in last
