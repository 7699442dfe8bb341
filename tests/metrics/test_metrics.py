import pytest

from defend.metrics.captioning import caption_scores
from defend.metrics.vqa import normalize_answer, vqa_accuracy


def test_answer_normalization_ignores_case_punctuation_and_articles():
    assert normalize_answer("  The Circle. ") == "circle"
    assert normalize_answer("A red, Triangle!") == "red triangle"


def test_vqa_accuracy_and_majority_baseline_by_hand():
    preds = ["yes", "No", "circle", "red", "blue"]
    refs = ["yes", "yes", "circle", "red", "yes"]
    result = vqa_accuracy(preds, refs, ["yes/no", "yes/no", "shape", "color", "yes/no"])
    assert result["vqa_accuracy"] == pytest.approx(3 / 5)
    assert result["n_correct"] == 3 and result["n"] == 5
    assert result["majority_answer"] == "yes" and result["majority_baseline"] == pytest.approx(3 / 5)
    assert result["by_question_type"]["yes/no"] == {"vqa_accuracy": pytest.approx(1 / 3), "n": 3, "n_correct": 1}


def test_caption_scores_reward_exact_captions_and_punish_wrong_ones():
    refs = ["a red circle on white", "a blue triangle in the corner", "a green rectangle at the top"]
    perfect = caption_scores(refs, refs)
    assert perfect["bleu4"] == pytest.approx(1.0, abs=1e-6)
    assert perfect["cider"] == pytest.approx(10.0, abs=1e-3)
    wrong = caption_scores(["banana", "banana", "banana"], refs)
    assert wrong["bleu4"] < 1e-6 and wrong["cider"] == pytest.approx(0.0, abs=1e-6)
    partial = caption_scores(["a red circle on white", "banana", "banana"], refs)
    assert 0 < partial["cider"] < perfect["cider"]
