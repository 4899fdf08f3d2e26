"""Paired-seed verdicts and Student-t intervals on constructed numbers."""

from __future__ import annotations

import math

import pytest

from megatron_doremi.stats import estimate, paired_verdict, summarize_verdicts, t_quantile_975


def test_a_real_effect_across_three_seeds_is_better_and_its_mirror_worse():
    base = [3.00, 3.10, 2.95]
    method = [2.90, 3.01, 2.86]  # 0.10, 0.09, 0.09 lower on every seed: a consistent effect
    v = paired_verdict(method, base)
    assert v["verdict"] == "better" and v["mean"] < 0 and v["mean"] + v["ci95"] < 0
    assert paired_verdict(base, method)["verdict"] == "worse"


def test_noise_is_no_significant_difference():
    base = [3.00, 3.10, 2.95]
    method = [2.95, 3.16, 2.93]  # -0.05, +0.06, -0.02: differences of both signs
    v = paired_verdict(method, base)
    assert v["verdict"] == "no significant difference"
    assert v["mean"] - v["ci95"] < 0 < v["mean"] + v["ci95"]


def test_one_replicate_is_not_tested_and_missing_values_are_not_tested():
    assert paired_verdict([2.0], [3.0])["verdict"] == "not tested"
    assert paired_verdict([2.0, float("nan")], [3.0, 3.0])["verdict"] == "not tested"
    assert estimate([1.5]) == {"values": [1.5], "n": 1, "mean": 1.5, "sd": None, "ci95": None}
    with pytest.raises(ValueError, match="one value per seed"):
        paired_verdict([1.0, 2.0], [1.0])


def test_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in (1, 2, 5, 30, 31, 50, 200):
        assert t_quantile_975(df) == pytest.approx(float(stats.t.ppf(0.975, df)), rel=1e-6), df
    base = [3.0, 3.1, 2.95, 3.05]
    method = [2.9, 3.05, 2.96, 2.97]
    v = paired_verdict(method, base)
    ref = stats.ttest_rel(method, base)
    ci = ref.confidence_interval(0.95)
    assert v["mean"] - v["ci95"] == pytest.approx(ci.low) and v["mean"] + v["ci95"] == pytest.approx(ci.high)
    assert (v["verdict"] != "no significant difference") == (ref.pvalue < 0.05)
    e = estimate([1.0, 2.0, 4.0])
    assert e["sd"] == pytest.approx(math.sqrt(7 / 3))


def test_summary_counts():
    s = summarize_verdicts({"a": "better", "b": "no significant difference", "c": "better"})
    assert s == {"better": 2, "worse": 0, "no significant difference": 1, "not tested": 0}
    with pytest.raises(ValueError):
        summarize_verdicts(["improved"])
