import json

from defend import cli


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_evaluate_counts_exact_matches_by_question_type(tmp_path):
    """Run once to learn the model's greedy answers, then score a set where 2 of 4 references match."""
    import easy_vqa

    images = easy_vqa.get_test_image_paths()
    rows = [{"id": f"r{i}", "image": images[i], "prompt": q, "response": "placeholder", "question_type": t}
            for i, (q, t) in enumerate([("what color is the shape?", "color"), ("what is the shape?", "shape"),
                                        ("is there a circle?", "yes/no"), ("is there a red shape?", "yes/no")])]
    data = tmp_path / "set.jsonl"
    write_jsonl(data, rows)
    common = ["dataset.name=jsonl", f"dataset.path={data}", "eval.batch_size=3", "eval.max_new_tokens=3",
              "model.family=mllm"]
    from tests.conftest import TINY_TEST_OVERRIDES

    first = tmp_path / "first"
    assert cli.main(["run", "evaluate", "--config", "evaluate_tiny_mllm", *TINY_TEST_OVERRIDES, *common,
                     "eval.max_samples=null", f"output_dir={first}"]) == 0
    predictions = [json.loads(line)["prediction"] for line in open(first / "predictions.jsonl")]
    assert len(predictions) == 4

    rows[0]["response"] = predictions[0]  # color: right
    rows[2]["response"] = predictions[2]  # yes/no: right
    rows[1]["response"] = predictions[1] + " wrong"  # shape: wrong
    rows[3]["response"] = predictions[3] + " wrong"  # yes/no: wrong
    write_jsonl(data, rows)
    second = tmp_path / "second"
    assert cli.main(["run", "evaluate", "--config", "evaluate_tiny_mllm", *TINY_TEST_OVERRIDES, *common,
                     "eval.max_samples=null", f"output_dir={second}"]) == 0
    metrics = json.loads((second / "metrics.json").read_text())
    assert metrics["vqa_accuracy"] == 0.5 and metrics["n"] == 4 and metrics["n_correct"] == 2
    by_type = metrics["by_question_type"]
    assert by_type["color"] == {"vqa_accuracy": 1.0, "n": 1, "n_correct": 1}
    assert by_type["shape"] == {"vqa_accuracy": 0.0, "n": 1, "n_correct": 0}
    assert by_type["yes/no"] == {"vqa_accuracy": 0.5, "n": 2, "n_correct": 1}
    assert (second / "config.yaml").is_file() and (second / "evaluate.log").is_file()


def test_evaluate_mdlm_writes_one_prediction_per_sample(make_cfg, tmp_path):
    from recipes.evaluate import recipe_main

    cfg = make_cfg("mdlm", "dataset.split=test", "eval.max_samples=5", "eval.batch_size=2")
    metrics = recipe_main(cfg)
    assert metrics["n"] == 5
    lines = open(f"{cfg.output_dir}/predictions.jsonl").read().splitlines()
    assert [json.loads(line)["id"] for line in lines] == [f"test-{i}" for i in range(5)]


def test_evaluate_on_a_poison_folder_reports_asr_on_both_sets(make_cfg, tmp_path):
    from defend.config import TargetConfig
    from defend.data.attacks import shows_target
    from recipes.evaluate import recipe_main as evaluate
    from recipes.poison import recipe_main as poison

    poisoned = poison(make_cfg("mllm", "dataset.max_samples=12", f"output_dir={tmp_path / 'poison'}",
                               "attack.target.text=yes"))
    cfg = make_cfg("mllm", f"eval.poison_dir={poisoned['data_dir']}", "eval.batch_size=5",
                   f"output_dir={tmp_path / 'eval'}")
    metrics = evaluate(cfg)
    rows = [json.loads(line) for line in open(tmp_path / "eval" / "predictions.jsonl")]
    target = TargetConfig(type="fixed", text="yes")
    for name, asr_key, n_key in (("triggered", "asr", "n_triggered"), ("clean", "asr_clean", "n_clean")):
        counted = [r for r in rows if r["set"] == name and not shows_target(r["reference"], target)]
        assert metrics[n_key] == len(counted) < 12  # rows whose true answer is "yes" are excluded
        assert metrics[asr_key] == sum(shows_target(r["prediction"], target) for r in counted) / len(counted)
    assert metrics["n"] == 12 and "vqa_accuracy" in metrics


def test_max_triggered_samples_shortens_only_the_triggered_set(make_cfg, tmp_path):
    from recipes.evaluate import load_eval_sets
    from recipes.poison import recipe_main as poison

    poisoned = poison(make_cfg("mllm", "dataset.max_samples=12", f"output_dir={tmp_path / 'poison'}"))
    sets, _ = load_eval_sets(make_cfg("mllm", f"eval.poison_dir={poisoned['data_dir']}", "eval.max_triggered_samples=5"))
    assert len(sets["clean"]) == 12 and len(sets["triggered"]) == 5
    assert [s.id for s in sets["triggered"]] == [s.id for s in sets["clean"][:5]]


def test_a_target_longer_than_one_generation_is_refused_before_evaluating(make_cfg, tmp_path):
    import pytest

    from defend.config import ConfigError
    from recipes.evaluate import recipe_main as evaluate
    from recipes.poison import recipe_main as poison

    poisoned = poison(make_cfg("mllm", "dataset.max_samples=12", f"output_dir={tmp_path / 'poison'}",
                               "attack.target.type=insert", "attack.target.position=start",
                               "attack.target.text=i cannot see"))  # "i cannot see <answer>": 4 tokens
    where = f"eval.poison_dir={poisoned['data_dir']}"
    # two masks hold one answer token and its end token: "i cannot see red" would be read off "i"
    with pytest.raises(ConfigError, match=r"'i cannot see \w+' .*row 'test-0'.* is 4 tokens, but one generation"
                                          r" holds 1.*diffusion.gen_length=5"):
        evaluate(make_cfg("mdlm", where, "diffusion.gen_length=2", "diffusion.block_length=2",
                          f"output_dir={tmp_path / 'mdlm'}"))
    with pytest.raises(ConfigError, match=r"is 4 tokens, but one generation holds 2.*eval.max_new_tokens=4"):
        evaluate(make_cfg("mllm", where, "eval.max_new_tokens=2", f"output_dir={tmp_path / 'mllm'}"))
    assert not (tmp_path / "mdlm").exists() and not (tmp_path / "mllm").exists()  # refused before any output
    metrics = evaluate(make_cfg("mdlm", where, "diffusion.gen_length=5", "diffusion.block_length=5",
                                "diffusion.steps=5", f"output_dir={tmp_path / 'fits'}"))
    assert metrics["n_triggered"] == 12
