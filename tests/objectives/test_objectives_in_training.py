"""Objectives inside real (tiny) fine-tunes: one forward per step, logged terms, both families, ABL."""
import json

import pytest
import torch

from defend.config import ConfigError
from defend.objectives import TrainingContext, TrainingObjective
from recipes.finetune import FinetuneRecipe, recipe_main

PCR = ["objective.name=pcr", "objective.pcr.patch_size=16", "dataset.max_samples=24", "train.micro_batch_size=4",
       "train.max_steps=3", "train.log_every=1"]


@pytest.mark.parametrize("family", ["mllm", "mdlm"])
def test_pcr_runs_both_views_in_one_forward_per_step_and_logs_its_terms(make_cfg, family):
    cfg = make_cfg(family, *PCR)
    recipe = FinetuneRecipe(cfg)
    recipe.setup()
    calls = []
    recipe.vlm.model.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(kwargs["pixel_values"].shape[0]), with_kwargs=True)
    result = recipe.train()
    recipe.cleanup()
    assert calls == [8, 8, 8]  # one model call per step, holding 4 original and 4 perturbed images
    log = [json.loads(line) for line in open(f"{cfg.output_dir}/train_log.jsonl")]
    for record in log:
        assert {"task", "pcr_discrepancy", "pcr_entropy"} <= record.keys()
        parts = record["task"] + record["pcr_discrepancy"] + record["pcr_entropy"]
        assert record["loss"] == pytest.approx(parts, rel=1e-5)  # the terms add up to the optimized loss
        assert 0 <= record["pcr_discrepancy"] <= 1 and 0 <= record["pcr_entropy"] <= 0.1
    metrics = json.load(open(f"{cfg.output_dir}/metrics.json"))
    assert metrics["loss"] == result["losses"] and len(metrics["terms"]) == 3


def test_the_diffusion_views_share_noise_and_timestep(make_cfg):
    # with both views given the same image, a shared noise draw must give identical logits
    cfg = make_cfg("mdlm", "dataset.max_samples=4")
    recipe = FinetuneRecipe(cfg)
    recipe.setup()
    batch = recipe.vlm.train_collator()(recipe.samples[:4])
    doubled = {k: torch.cat([v, v]) if torch.is_tensor(v) else v for k, v in batch.items()}
    scores = recipe.vlm.score(doubled, views=2)
    recipe.cleanup()
    assert scores.scored.any()
    assert torch.allclose(scores.view(0), scores.view(1), atol=1e-5)
    assert torch.equal(scores.targets[:4], scores.targets[4:])


def test_pcr_changes_training_and_no_objective_keeps_the_plain_task_loss(make_cfg, tmp_path):
    plain = recipe_main(make_cfg("mllm", *PCR[2:], f"output_dir={tmp_path / 'plain'}"))
    again = recipe_main(make_cfg("mllm", *PCR[2:], "objective.name=none", f"output_dir={tmp_path / 'none'}"))
    pcr = recipe_main(make_cfg("mllm", *PCR, f"output_dir={tmp_path / 'pcr'}"))
    assert plain["first_loss"] == again["first_loss"] and plain["final_loss"] == again["final_loss"]
    assert "pcr" not in json.dumps(json.load(open(tmp_path / "plain" / "metrics.json"))["terms"])
    assert pcr["final_loss"] != plain["final_loss"]


@pytest.mark.parametrize("override, message", [
    ("objective.name=pcrr", r"unknown objective 'pcrr'; known: abl, pcr.*Did you mean 'pcr'"),
    ("objective.name=[pcr, pcr]", "names an objective twice"),
    ("objective.pcr.fraction=0", r"objective.pcr.fraction must be in \(0, 1\]"),
    ("objective.pcr.patch_size=128", "objective.pcr: patch size 128 is larger than"),
    ("objective.pcr.mode=blur", "objective.pcr.mode"),
    ("objective.abl.isolation_ratio=1.5", r"objective.abl.isolation_ratio must be in \(0, 1\)"),
])
def test_objective_config_errors_name_the_key_before_any_output(make_cfg, tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        cfg = make_cfg("mllm", "objective.name=[pcr, abl]", "dataset.max_samples=8", "train.micro_batch_size=4",
                       "train.max_steps=1", override)
        recipe_main(cfg)
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_abl_isolates_the_lowest_loss_samples_then_ascends_on_them(make_cfg):
    cfg = make_cfg("mllm", "objective.name=abl", "dataset.max_samples=32", "train.micro_batch_size=8",
                   "objective.abl.isolation_steps=4", "objective.abl.isolation_ratio=0.25",
                   "objective.abl.unlearn_batch_size=4", "objective.abl.gamma=0.0")
    recipe = FinetuneRecipe(cfg)
    recipe.setup()
    objective = recipe.objective
    abl = objective.objectives[0]
    batches = iter(recipe.loader)
    for _ in range(4):  # phase 1; with gamma 0 the loss is the plain task loss
        loss, terms = objective(next(batches), recipe.engine)
        assert terms["abl_unlearn"] == 0.0
    assert len(abl.losses) == 16  # steps 2 and 3 (the second half) recorded 8 samples each
    loss, terms = objective(next(batches), recipe.engine)  # step 4: isolate, then unlearn
    recipe.cleanup()
    lowest = sorted(abl.losses, key=abl.losses.get)[:4]
    assert abl.isolated == lowest and terms["abl_isolated"] == 4.0
    assert -cfg.objective.abl.max_unlearn_loss <= terms["abl_unlearn"] < 0
    state = abl.state_dict()
    fresh = TrainingObjective(TrainingContext(cfg, recipe.vlm, recipe.samples, recipe.vlm.train_collator()))
    fresh.load_state_dict({"abl": state})
    assert fresh.objectives[0].isolated == lowest
