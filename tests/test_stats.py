"""harness.stats: summaries, paired tests, Holm, bootstrap coverage, direction-awareness."""
import math

import numpy as np
import pytest
from scipy import stats as sps

from harness import stats


# ------------------------------------------------------------------ summaries
def test_summary_mean_std_ci():
    s = stats.summarize([1.0, 2.0, 3.0, 4.0], seeds=[3, 0, 1, 2], n_resamples=999)
    assert s["n"] == 4 and s["seeds"] == [0, 1, 2, 3]
    assert s["mean"] == pytest.approx(2.5)
    assert s["std"] == pytest.approx(np.std([1, 2, 3, 4], ddof=1))
    assert s["ci_low"] <= 2.5 <= s["ci_high"] and s["ci_note"] == ""
    # t interval by hand: 2.5 +- t_{0.975,3} * s / 2
    half = sps.t.ppf(0.975, 3) * np.std([1, 2, 3, 4], ddof=1) / 2
    assert (s["t_ci_low"], s["t_ci_high"]) == pytest.approx((2.5 - half, 2.5 + half))


@pytest.mark.parametrize("values", [[1.0], [1.0, 2.0]])
def test_no_ci_below_three(values):
    s = stats.summarize(values)
    assert s["ci_low"] is None and s["ci_high"] is None
    assert "CI unavailable" in s["ci_note"] and f"n={len(values)}" in s["ci_note"]
    assert (s["std"] is None) == (len(values) == 1)


def test_constant_values_point_ci():
    s = stats.summarize([0.5, 0.5, 0.5])
    assert (s["ci_low"], s["ci_high"]) == (0.5, 0.5) and "equal" in s["ci_note"]


def test_bootstrap_is_deterministic():
    x = [0.3, 0.9, 0.4, 0.7, 0.55]
    assert stats.bootstrap_ci(x, n_resamples=999) == stats.bootstrap_ci(x, n_resamples=999)


def test_bootstrap_ci_coverage_near_nominal():
    """200 replications of n=10 normal samples: the 95% BCa CI covers the true mean at roughly the
    nominal rate (the bootstrap is known to under-cover a little at n=10, about 0.90)."""
    rng = np.random.default_rng(12345)
    true_mean, covered, t_covered = 5.0, 0, 0
    for _ in range(200):
        x = rng.normal(true_mean, 2.0, size=10)
        low, high, _ = stats.bootstrap_ci(x, n_resamples=999)
        covered += low <= true_mean <= high
        t_low, t_high = stats.t_interval(x)
        t_covered += t_low <= true_mean <= t_high
    assert 0.88 <= covered / 200 <= 0.99
    assert 0.90 <= t_covered / 200 <= 0.99


# ------------------------------------------------------------------ paired t
def test_paired_t_hand_computed_three_seeds():
    wander = {0: 0.80, 1: 0.82, 2: 0.85}
    base = {0: 0.78, 1: 0.81, 2: 0.80}
    # differences 0.02, 0.01, 0.05: mean 0.08/3, sum of squared deviations 26/30000,
    # sd = sqrt(13/30000), t = mean / (sd / sqrt 3) = 8 / sqrt(13); with df = 2 the t CDF is
    # 1/2 + t / (2 sqrt(2 + t^2)), so the two-sided p = 1 - t / sqrt(2 + t^2) = 1 - 8 / sqrt(90).
    mean = 0.08 / 3
    t = 8 / math.sqrt(13)
    p = 1 - 8 / math.sqrt(90)
    c = stats.compare(wander, base, "acc2_non0", n_resamples=999)
    assert c["n"] == 3 and c["seeds"] == [0, 1, 2]
    assert c["t_stat"] == pytest.approx(t, rel=1e-9)
    assert c["p_t"] == pytest.approx(p, rel=1e-9)
    assert p == pytest.approx(0.1567, abs=1e-4)
    assert c["improvement"] == pytest.approx(mean)
    assert c["p_better"] == 1.0


def test_t_test_undefined_cases():
    t, p, note = stats.paired_t([1.0, 2.0, 3.0], [0.0, 1.0, 2.0])
    assert t is None and p is None and "zero variance" in note
    t, p, note = stats.paired_t([1.0], [0.0])
    assert p is None and "n >= 2" in note


# ------------------------------------------------------------------ Wilcoxon
def test_wilcoxon_exact_small_n():
    w = stats.wilcoxon_exact([0.1, 0.2, 0.3, 0.4, 0.5])
    assert w["p"] == pytest.approx(0.0625) and w["n"] == 5
    assert w["min_p"] == pytest.approx(0.0625)
    assert "cannot reach significance" in w["note"]
    assert stats.wilcoxon_min_p(3) == pytest.approx(0.25)
    assert stats.wilcoxon_min_p(5) == pytest.approx(0.0625)
    assert stats.wilcoxon_min_p(6) == pytest.approx(0.03125)
    six = stats.wilcoxon_exact([1, 2, 3, 4, 5, 6])
    assert six["p"] == pytest.approx(0.03125) and "cannot reach" not in six["note"]


def test_wilcoxon_zero_and_tied_differences():
    w = stats.wilcoxon_exact([0.0, 1.0, 2.0, 3.0, 4.0])
    assert w["n"] == 4 and w["p"] == pytest.approx(0.125) and "zero difference" in w["note"]
    # ties among |d|: enumerate all 2^7 sign flips with mid-ranks by hand
    d = np.array([0.5, -0.5, 0.5, 1, 2, 3, -1])
    ranks = sps.rankdata(np.abs(d))
    observed = ranks[d > 0].sum()
    centre = ranks.sum() / 2
    flips = [sum(r for r, s in zip(ranks, signs) if s) for signs in np.ndindex(*(2,) * 7)]
    expected = np.mean([abs(v - centre) >= abs(observed - centre) - 1e-12 for v in flips])
    assert stats.wilcoxon_exact(d)["p"] == pytest.approx(expected)
    assert stats.wilcoxon_exact([0.0, 0.0, 0.0])["p"] is None


def test_compare_reports_wilcoxon_min_p_note():
    w = {s: 1.0 + s for s in range(3)}
    b = {s: 0.5 + s * 0.9 for s in range(3)}
    c = stats.compare(w, b, "acc", n_resamples=999)
    assert c["wilcoxon_min_p"] == pytest.approx(0.25)
    assert c["p_wilcoxon"] == pytest.approx(0.25)
    assert "cannot reach significance" in c["wilcoxon_note"]


# ------------------------------------------------------------------ Holm
def test_holm_hand_case():
    p = [0.01, 0.04, 0.03, 0.005]
    # sorted: 0.005*4=0.02, 0.01*3=0.03, 0.03*2=0.06, 0.04*1=0.04 -> max-accumulated 0.06
    assert stats.holm(p) == pytest.approx([0.03, 0.06, 0.06, 0.02])


def test_holm_monotone_and_capped():
    rng = np.random.default_rng(1)
    for _ in range(50):
        p = list(rng.uniform(0, 1, size=rng.integers(1, 12)) ** 2)
        adj = stats.holm(p)
        order = np.argsort(p, kind="stable")
        sorted_adj = [adj[i] for i in order]
        assert all(a <= b + 1e-15 for a, b in zip(sorted_adj, sorted_adj[1:]))
        assert all(a >= raw - 1e-15 and a <= 1.0 for a, raw in zip(adj, p))


def test_holm_skips_missing():
    assert stats.holm([None, 0.02, float("nan"), 0.04]) == [None, pytest.approx(0.04), None,
                                                              pytest.approx(0.04)]


# ------------------------------------------------------------------ direction
def test_direction_aware_mae_lower_wins():
    assert stats.lower_is_better("mae") and stats.lower_is_better("t2v_mnr")
    assert stats.lower_is_better("v2t_mdr") and not stats.lower_is_better("acc2_non0")
    wander = {0: 0.90, 1: 0.92, 2: 0.91, 3: 0.89}     # lower MAE: Wander better
    base = {0: 0.95, 1: 0.97, 2: 0.94, 3: 0.96}
    c = stats.compare(wander, base, "mae", n_resamples=999)
    assert c["improvement"] > 0 and c["p_better"] == 1.0 and c["p_better_all_pairs"] == 1.0
    assert c["improvement_ci_low"] > 0
    same_numbers_as_accuracy = stats.compare(wander, base, "acc", n_resamples=999)
    assert same_numbers_as_accuracy["improvement"] < 0
    assert same_numbers_as_accuracy["p_better"] == 0.0
    stats.adjust([c])
    assert c["verdict"] == stats.WANDER_BETTER and c["p_holm"] == pytest.approx(c["p_t"])


def test_prob_better_ties_half_and_missing_seeds():
    assert stats.prob_better([1, 2, 3], [1, 1, 4], "acc") == pytest.approx((0.5 + 1 + 0) / 3)
    assert stats.prob_better([1, 2], [1, 3], "acc", paired=False) == pytest.approx(
        (0.5 + 0 + 1 + 0) / 4)
    c = stats.compare({0: 1.0, 1: 2.0, 2: 3.0}, {1: 1.5, 2: 2.0, 3: 9.0}, "acc", n_resamples=999)
    assert c["n"] == 2 and c["seeds"] == [1, 2]
    assert c["missing_in_baseline"] == [0] and c["missing_in_wander"] == [3]
    assert c["improvement_ci_low"] is None  # n = 2 < 3: no CI
