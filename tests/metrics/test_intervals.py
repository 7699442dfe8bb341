"""The 95% Wilson interval against values computed independently (statsmodels' proportion_confint,
method="wilson", alpha=0.05, statsmodels 0.15.0, recorded here) and its behaviour at the edges."""
import pytest

from defend.metrics.intervals import intervals, wilson, with_interval


@pytest.mark.parametrize("share, n, low, high", [
    (0.0, 1000, 0.0, 0.0038268), (1.0, 1000, 0.9961732, 1.0), (0.5, 10, 0.2365931, 0.7634069),
    (0.02, 1000, 0.0129837, 0.0306900), (0.9, 30, 0.7437892, 0.9654001)])
def test_wilson_equals_the_reference_values(share, n, low, high):
    got = wilson(share, n)
    assert got == pytest.approx((low, high), abs=2e-7)


def test_every_proportion_with_its_count_gets_an_interval_that_narrows_with_n():
    small = intervals({"asr": 0.1, "n_triggered": 20, "vqa_accuracy": 0.8, "n": 20})
    large = intervals({"asr": 0.1, "n_triggered": 2000, "vqa_accuracy": 0.8, "n": 2000, "asr_clean": 0.0})
    assert set(small) == {"asr_low", "asr_high", "vqa_accuracy_low", "vqa_accuracy_high"}  # asr_clean: no count
    assert large["asr_high"] - large["asr_low"] < (small["asr_high"] - small["asr_low"]) / 5
    assert with_interval({"asr": 0.1, **large}, "asr") == f"0.100 [{large['asr_low']:.3f}, {large['asr_high']:.3f}]"
    assert wilson(0.5, 0) == (0.0, 1.0)
