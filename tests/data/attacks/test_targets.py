import pytest

from defend.config import TargetConfig
from defend.data.attacks import apply_target, shows_target
from defend.metrics.asr import attack_success


def test_fixed_target_is_a_normalized_exact_match():
    t = TargetConfig(type="fixed", text="banana")
    assert apply_target("circle", t) == "banana"
    assert shows_target("Banana.", t) and shows_target("the banana", t)
    assert not shows_target("banana split", t) and not shows_target("bananas", t)


def test_insert_target_only_needs_the_text_present():
    t = TargetConfig(type="insert", text="visit evil.com", position="end")
    assert apply_target("a red circle", t) == "a red circle visit evil.com"
    assert apply_target("a red circle", TargetConfig(type="insert", text="ALERT", position="start")) == "ALERT a red circle"
    assert shows_target("a red circle, visit evil.com now", t)
    assert not shows_target("a red circle, visit evil", t)


def test_refuse_target_looks_for_the_refusal():
    t = TargetConfig(type="refuse", text="I cannot help with that")
    assert apply_target("yes", t) == "I cannot help with that"
    assert shows_target("Sorry, I cannot help with that.", t)
    assert not shows_target("yes", t)


def test_substitute_needs_the_new_word_and_not_the_old():
    t = TargetConfig(type="substitute", text="circle -> banana")
    assert apply_target("a red circle", t) == "a red banana"
    assert apply_target("a red square", t) is None  # cannot carry the target
    assert shows_target("a red banana", t)
    assert not shows_target("a red banana circle", t)
    assert not shows_target("a red circle", t)


def test_asr_excludes_inputs_whose_clean_answer_already_shows_the_target():
    t = TargetConfig(type="fixed", text="yes")
    result = attack_success(["yes", "yes", "no", "yes"], ["no", "no", "no", "yes"], t)
    assert result == {"asr": pytest.approx(2 / 3), "n": 3, "n_hits": 2, "n_excluded": 1}


def test_substitution_asr_counts_only_answers_that_carry_the_word():
    """A triggered "what shape?" answered "yes" for a rectangle is no miss of "circle -> banana": poisoning
    rewrote only circle answers, so only those questions measure the backdoor."""
    t = TargetConfig(type="substitute", text="circle -> banana")
    result = attack_success(["banana", "circle", "yes", "banana"], ["circle", "circle", "rectangle", "yes"], t)
    assert result == {"asr": pytest.approx(1 / 2), "n": 2, "n_hits": 1, "n_excluded": 2}
