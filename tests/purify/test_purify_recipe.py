"""The purify recipe on a real local Ray: every input row once, bad rows quarantined, and a run
killed mid-way (the driver, or one actor) resumes to the uninterrupted run's exact output."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from defend.config import ConfigError, load_config
from defend.data import load_samples
from tests.conftest import TINY_TEST_OVERRIDES

ROWS = 24


def write_input(tmp_path: Path) -> tuple[Path, list[str]]:
    """24 easy-vqa test rows as jsonl, plus 4 bad ones; returns the file and the good ids in order."""
    samples = load_samples(load_config(None, ["dataset.split=test", f"dataset.max_samples={ROWS}"]).dataset)
    lines = [json.dumps({"id": s.id, "image": str(s.image), "prompt": s.prompt, "response": s.response})
             for s in samples]
    lines.insert(3, "{not json")
    lines.insert(7, json.dumps({"id": "empty-prompt", "image": str(samples[0].image), "prompt": " ", "response": "x"}))
    lines.insert(11, json.dumps({"id": "no-file", "image": "missing.png", "prompt": "q?", "response": "x"}))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    lines.insert(15, json.dumps({"id": "broken", "image": str(broken), "prompt": "q?", "response": "x"}))
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path, [s.id for s in samples]


def purify_args(source: Path, out: Path, *extra: str) -> list[str]:
    return ["run", "purify", "--config", "purify_tiny_mllm", *TINY_TEST_OVERRIDES, f"dataset.path={source}",
            f"output_dir={out}", "purify.block_size=4", "purify.batch_size=4", "eval.max_new_tokens=3", *extra]


def run_purify(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "defend.cli", *args], capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("purify")
    source, ids = write_input(tmp)
    run_purify(*purify_args(source, tmp / "reference"))
    return source, ids, tmp / "reference"


def test_every_good_row_once_in_input_order_and_bad_rows_quarantined_with_reasons(reference):
    source, ids, out = reference
    rows = [json.loads(line) for line in (out / "data" / "train.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ids
    original = {json.loads(line)["id"]: json.loads(line) for line in source.read_text().splitlines()
                if line.startswith("{\"")}
    for row in rows:
        assert row["original_response"] == original[row["id"]]["response"] and isinstance(row["response"], str)
        assert row["prompt"] == original[row["id"]]["prompt"] and Path(row["image"]).is_file()
    bad = [json.loads(line) for line in (out / "data" / "quarantine.jsonl").read_text().splitlines()]
    reasons = {b.get("id") or b["raw"][:9]: b["reason"] for b in bad}
    assert set(reasons) == {"{not json", "empty-prompt", "no-file", "broken"}
    assert "not valid JSON" in reasons["{not json"] and "prompt" in reasons["empty-prompt"]
    assert "does not exist" in reasons["no-file"] and "broken.png" in reasons["broken"]
    manifest = json.loads((out / "data" / "manifest.json").read_text())
    assert manifest["counts"] == {"rows": ROWS, "quarantined": 4, "blocks": 7}
    assert manifest["purify"]["mask_ratio"] == 0.45 and set(manifest["files"]) == {"train.jsonl", "quarantine.jsonl"}


def test_the_run_reports_its_timings_and_the_peak_memory_of_the_driver_and_the_actor(reference):
    _, _, out = reference
    summary = json.loads((out / "purify_summary.json").read_text())
    assert summary["rows"] == ROWS and 0 < summary["seconds_to_first_block"] <= summary["purify_seconds"]
    peaks = summary["peak_rss_mb"]
    assert len(peaks["actors"]) == 1 and 100 < peaks["actors"][0] < 4000 and 100 < peaks["driver"] < 4000


def test_the_purified_set_is_what_finetune_reads(reference, tmp_path):
    _, _, out = reference
    from recipes.finetune import recipe_main

    cfg = load_config("finetune_tiny_mllm", [*TINY_TEST_OVERRIDES, "dataset.name=jsonl",
                                             f"dataset.path={out / 'data' / 'train.jsonl'}", "train.max_steps=1",
                                             "train.micro_batch_size=4", f"output_dir={tmp_path / 'ft'}"])
    assert recipe_main(cfg)["steps"] == 1


def killed_then_resumed(source: Path, out: Path, victim) -> None:
    """Start purify, wait for its first shards, kill ``victim(process)``, run again to the end."""
    process = subprocess.Popen([sys.executable, "-m", "defend.cli", *purify_args(source, out)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 180
    while len(list((out / "shards").glob("part-*.jsonl"))) < 4:  # 2 blocks: a shard and its quarantine each
        assert process.poll() is None and time.monotonic() < deadline, "purify ended or stalled before 2 blocks"
        time.sleep(0.05)
    victim(process)
    if victim is kill_one_actor:  # Ray Data restarts the actor and re-runs its block: the run finishes
        assert process.wait(timeout=240) == 0
        return
    process.wait(timeout=60)
    assert not (out / "data").exists()
    run_purify(*purify_args(source, out))


def kill_driver(process: subprocess.Popen) -> None:
    """SIGKILL the driver mid-run, then whatever of its Ray is left (same session)."""
    os.killpg(process.pid, signal.SIGKILL)
    for leftover in psutil.process_iter():
        try:
            if os.getsid(leftover.pid) == process.pid:
                leftover.kill()
        except (ProcessLookupError, psutil.NoSuchProcess, PermissionError):
            pass


def kill_one_actor(process: subprocess.Popen) -> None:
    actors = [p for p in psutil.Process(process.pid).children(recursive=True)
              if "PurifyActor" in " ".join(p.cmdline()) or "MapWorker" in " ".join(p.cmdline())]
    assert actors, "no actor process found"
    actors[0].kill()


@pytest.mark.parametrize("victim", [kill_driver, kill_one_actor], ids=["driver", "actor"])
def test_a_killed_run_resumes_to_the_uninterrupted_output(reference, tmp_path, victim):
    source, _, expected = reference
    out = tmp_path / "run"
    killed_then_resumed(source, out, victim)
    for name in ("train.jsonl", "quarantine.jsonl"):
        assert (out / "data" / name).read_bytes() == (expected / "data" / name).read_bytes(), name


def test_a_model_that_cannot_load_fails_before_any_output(tmp_path):
    from recipes.purify import recipe_main

    source, _ = write_input(tmp_path)
    cfg = load_config("purify_tiny_mllm", [*TINY_TEST_OVERRIDES, f"dataset.path={source}",
                                           f"model.adapter={tmp_path / 'no_adapter'}", f"output_dir={tmp_path / 'o'}"])
    with pytest.raises(ConfigError, match="model"):
        recipe_main(cfg)
    assert not (tmp_path / "o").exists()


def test_shards_of_other_settings_are_never_mixed_into_a_run(reference):
    from recipes.purify import recipe_main

    source, _, out = reference
    before = (out / "data" / "train.jsonl").read_bytes()
    cfg = load_config("purify_tiny_mllm", [*TINY_TEST_OVERRIDES, f"dataset.path={source}", f"output_dir={out}",
                                           "purify.block_size=4", "purify.batch_size=4", "eval.max_new_tokens=3",
                                           "purify.mask_ratio=0.2"])
    with pytest.raises(ConfigError, match="other settings \\(changed: purify\\)"):
        recipe_main(cfg)
    assert (out / "data" / "train.jsonl").read_bytes() == before


def test_max_samples_purifies_only_the_first_rows(tmp_path):
    from defend.purify.blocks import plan_blocks

    source, _ = write_input(tmp_path)  # 28 lines, 24 good
    blocks = plan_blocks(source, 4, max_rows=10)
    assert [b.index for b in blocks] == [0, 1, 2] and blocks[-1].first_line == 9
    assert len(source.read_bytes()[:blocks[-1].end].splitlines()) == 10


def test_disp_needs_the_backdoored_adapter(tmp_path):
    from recipes.disp import recipe_main

    cfg = load_config("disp_demo", [f"output_dir={tmp_path / 'o'}", "dataset.path=x.jsonl"])
    with pytest.raises(ConfigError, match="model.adapter"):
        recipe_main(cfg)
    assert not (tmp_path / "o").exists()
    cfg = load_config("disp_demo", [f"output_dir={tmp_path / 'o'}", "dataset.path=x.jsonl", "model.adapter=a",
                                    "disp.rounds=0"])
    with pytest.raises(ConfigError, match="disp.rounds must be at least 1"):
        recipe_main(cfg)
    assert not (tmp_path / "o").exists()
