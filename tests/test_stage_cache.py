"""The stage cache keys a stage on the settings its recipe reads: changes elsewhere keep it, a change of
what it reads (in an override or in the YAML file), or of the content of a folder it reads, reruns it."""
import json

from defend.config import load_config
from defend.stage_cache import fingerprint, read_settings, stage_settings


def test_a_finetune_stage_ignores_where_and_how_it_runs_and_what_other_recipes_read():
    base = stage_settings("finetune", "finetune_tiny_mllm", [])
    same = stage_settings("finetune", "finetune_tiny_mllm", [
        "slurm.time=09:00:00", "output_dir=/elsewhere", "launcher=torchrun", "nproc=2", "attack.name=sig",
        "eval.max_samples=3", "train.log_every=1", "results.quick=true", "heartbeat_s=5"])
    assert same == base
    for changed in ("train.lr=5e-4", "objective.name=pcr", "lora.r=4", "seed=1", "dataset.max_samples=9"):
        assert stage_settings("finetune", "finetune_tiny_mllm", [changed]) != base, changed


def test_a_poison_stage_reads_its_attack_and_data_only():
    base = stage_settings("poison", "poison_badnets_easy_vqa", [])
    assert stage_settings("poison", "poison_badnets_easy_vqa", ["train.lr=1", "seed=3", "model.family=mdlm"]) == base
    assert stage_settings("poison", "poison_badnets_easy_vqa", ["attack.badnets.size=4"]) != base
    assert stage_settings("poison", "poison_badnets_easy_vqa", ["dataset.max_samples=10"]) != base


def test_an_edited_yaml_changes_the_stage_it_feeds(tmp_path):
    config = tmp_path / "ft.yaml"
    config.write_text("train:\n  lr: 0.001\n")
    before = stage_settings("finetune", str(config), [])
    config.write_text("train:\n  lr: 0.002\n")
    assert stage_settings("finetune", str(config), []) != before
    config.write_text("train:\n  lr: 0.002\nslurm:\n  time: '02:00:00'\n")
    assert stage_settings("finetune", str(config), []) == stage_settings("finetune", None, ["train.lr=0.002"])


def test_folders_of_ours_are_keyed_by_content(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("{}\n")
    (data / "manifest.json").write_text(json.dumps({"files": {"train.jsonl": "aaa"}}))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_model.safetensors").write_bytes(b"weights")
    cfg = load_config(None, [f"eval.poison_dir={data}", f"model.adapter={adapter}"])
    before = read_settings("evaluate", cfg)["settings"]
    assert before["eval.poison_dir"]["path"] == str(data) and fingerprint(str(data / "train.jsonl"))["data"] == before["eval.poison_dir"]["data"]
    (data / "manifest.json").write_text(json.dumps({"files": {"train.jsonl": "bbb"}}))  # regenerated data
    (adapter / "adapter_model.safetensors").write_bytes(b"retrained")
    after = read_settings("evaluate", cfg)["settings"]
    assert after["eval.poison_dir"] != before["eval.poison_dir"] and after["model.adapter"] != before["model.adapter"]
    assert fingerprint("not/a/path") == "not/a/path"
