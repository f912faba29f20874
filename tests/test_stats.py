"""harness.stats: summaries, t intervals, paired tests, Holm, direction, rounding, NaN."""
import math
import warnings

import numpy as np
import pytest
from scipy import stats as sps

from harness import stats


# ------------------------------------------------------------------ summaries
def test_summary_mean_std_and_t_interval():
    s = stats.summarize([1.0, 2.0, 3.0, 4.0], seeds=[3, 0, 1, 2])
    assert s["n"] == 4 and s["seeds"] == [0, 1, 2, 3]
    assert s["mean"] == pytest.approx(2.5)
    assert s["std"] == pytest.approx(np.std([1, 2, 3, 4], ddof=1))
    # by hand: 2.5 +- t_{0.975,3} * s / 2, with s = sqrt(5/3)
    half = sps.t.ppf(0.975, 3) * math.sqrt(5 / 3) / 2
    assert (s["t_ci_low"], s["t_ci_high"]) == pytest.approx((2.5 - half, 2.5 + half))
    assert (s["t_ci_low"], s["t_ci_high"]) == pytest.approx(
        sps.t.interval(0.95, 3, loc=2.5, scale=sps.sem([1, 2, 3, 4])))
    assert s["ci_note"] == "" and s["undefined_seeds"] == [] and s["note"] == ""


def test_t_interval_from_two_values_none_from_one():
    s = stats.summarize([1.0])
    assert s["t_ci_low"] is None and s["t_ci_high"] is None and s["std"] is None
    assert "CI unavailable" in s["ci_note"] and "n=1" in s["ci_note"]
    # n = 2: 1.5 +- t_{0.975,1} * (1/sqrt 2) / sqrt 2 = 1.5 +- 12.706 / 2
    s = stats.summarize([1.0, 2.0])
    assert (s["t_ci_low"], s["t_ci_high"]) == pytest.approx(
        (1.5 - sps.t.ppf(0.975, 1) / 2, 1.5 + sps.t.ppf(0.975, 1) / 2))


def test_constant_values_zero_width_interval():
    s = stats.summarize([0.5, 0.5, 0.5])
    assert (s["t_ci_low"], s["t_ci_high"]) == (0.5, 0.5) and "equal" in s["ci_note"]


def test_t_interval_covers_at_nominal_rate_with_three_seeds():
    """4000 replications of n = 3 normal samples: the 95% t interval covers the true mean about
    95% of the time (a BCa bootstrap interval covers about 75% here)."""
    rng = np.random.default_rng(12345)
    covered = 0
    for x in rng.normal(5.0, 2.0, size=(4000, 3)):
        low, high, _ = stats.t_interval(x)
        covered += low <= 5.0 <= high
    assert 0.935 <= covered / 4000 <= 0.965


def test_summary_leaves_undefined_values_out():
    s = stats.summarize([1.0, float("nan"), 3.0], seeds=[0, 1, 2])
    assert s["n"] == 2 and s["seeds"] == [0, 2] and s["mean"] == pytest.approx(2.0)
    assert s["undefined_seeds"] == [1] and "seed(s) 1" in s["note"]
    assert stats.summarize([float("nan")] * 3)["mean"] is None


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
    c = stats.compare(wander, base, "acc2_non0")
    assert c["n"] == 3 and c["seeds"] == [0, 1, 2]
    assert c["t_stat"] == pytest.approx(t, rel=1e-9)
    assert c["p_t"] == pytest.approx(p, rel=1e-9)
    assert p == pytest.approx(0.1567, abs=1e-4)
    assert c["improvement"] == pytest.approx(mean)
    assert c["p_better"] == 1.0


def test_t_test_undefined_cases():
    t, p, note = stats.paired_t([1.0, 2.0, 3.0], [0.0, 1.0, 2.0], "acc")
    assert t is None and p is None and "zero variance" in note
    t, p, note = stats.paired_t([1.0], [0.0], "acc")
    assert p is None and "n >= 2" in note


def test_t_statistic_positive_when_wander_better_for_lower_is_better_metric():
    wander = [0.90, 0.92, 0.91, 0.85]   # MAE: Wander lower = better at every seed
    base = [0.95, 0.97, 0.94, 0.96]
    t, p, _ = stats.paired_t(wander, base, "mae")
    reference = sps.ttest_rel(base, wander)   # baseline - wander: > 0 when Wander's MAE is lower
    assert t > 0 and t == pytest.approx(reference.statistic) and p == pytest.approx(reference.pvalue)
    t_acc, p_acc, _ = stats.paired_t(wander, base, "acc")   # same numbers as an accuracy
    assert t_acc == pytest.approx(-t) and p_acc == pytest.approx(p)
    c = stats.compare(dict(enumerate(wander)), dict(enumerate(base)), "mae")
    assert c["t_stat"] == pytest.approx(t) and c["improvement"] > 0


def test_rounding_noise_does_not_make_a_test():
    # 0.1 + 0.2 = 0.30000000000000004: the differences below are all 0.1 up to rounding
    wander = [0.1 + 0.2, 0.3, 0.6]
    base = [0.2, 0.2, 0.5]
    d = np.subtract(wander, base)
    assert np.ptp(d) > 0  # rounding noise: not exactly equal
    with warnings.catch_warnings():  # scipy warns about the cancellation, then tests anyway
        warnings.simplefilter("ignore", RuntimeWarning)
        assert sps.ttest_rel(wander, base).pvalue < 1e-10  # a "significant" difference
    t, p, note = stats.paired_t(wander, base, "acc")
    assert t is None and p is None and "zero variance" in note
    c = stats.compare(dict(enumerate(wander)), dict(enumerate(base)), "acc")
    stats.adjust([c])
    assert c["verdict"] == stats.UNTESTABLE
    # differences that are zero up to rounding are ties: no Wilcoxon sample, P(better) 0.5
    tie = stats.compare({0: 0.1 + 0.2, 1: 0.3, 2: 0.7}, {0: 0.3, 1: 0.3, 2: 0.7}, "acc")
    assert tie["p_better"] == 0.5 and tie["wilcoxon_n"] == 0 and tie["p_t"] is None
    assert "all paired differences zero" in tie["note"]


def test_undefined_value_is_left_out_never_a_tie():
    wander = {0: 0.70, 1: float("nan"), 2: 0.72, 3: 0.75}
    base = {0: 0.60, 1: 0.65, 2: 0.61, 3: 0.62}
    c = stats.compare(wander, base, "corr")
    assert c["n"] == 3 and c["seeds"] == [0, 2, 3] and c["undefined_seeds"] == [1]
    assert c["p_better"] == 1.0  # a NaN seed counted as a tie would give 0.875
    assert c["p_better_all_pairs"] == 1.0
    assert "seed(s) 1 left out" in c["note"]
    with pytest.raises(ValueError, match="undefined"):
        stats.prob_better([0.7, float("nan")], [0.6, 0.6], "corr")
    with pytest.raises(ValueError, match="undefined"):
        stats.paired_t([0.7, float("nan")], [0.6, 0.6], "corr")


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


def test_wilcoxon_ties_within_rounding_get_mid_ranks():
    """|d| equal but for float noise (accuracies k/250 x 100) are one tie, as the exact values."""
    d = [-0.3999999999999986, 0.4000000000000057, 4.0]
    w = stats.wilcoxon_exact(d)
    assert w["p"] == pytest.approx(0.75) and "mid-ranks" in w["method"]
    exact = sps.wilcoxon(np.round(d, 9), method=sps.PermutationMethod()).pvalue
    assert w["p"] == pytest.approx(exact)


def test_compare_reports_wilcoxon_min_p_note():
    w = {s: 1.0 + s for s in range(3)}
    b = {s: 0.5 + s * 0.9 for s in range(3)}
    c = stats.compare(w, b, "acc")
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


def test_holm_matches_statsmodels():
    multipletests = pytest.importorskip("statsmodels.stats.multitest").multipletests
    rng = np.random.default_rng(7)
    for _ in range(50):
        p = rng.uniform(0, 0.2, size=rng.integers(1, 12))
        assert stats.holm(list(p)) == pytest.approx(list(multipletests(p, method="holm")[1]))


def test_holm_rejects_at_adjusted_p_equal_alpha():
    # raw 0.025 and 0.05: adjusted 2 * 0.025 = 0.05 and max(0.05, 1 * 0.05) = 0.05 (exact in
    # binary floating point): both are rejected at alpha = 0.05, as statsmodels' Holm does.
    comparisons = [{"p_t": 0.025, "improvement": 1.0}, {"p_t": 0.05, "improvement": -1.0}]
    stats.adjust(comparisons)
    assert [c["p_holm"] for c in comparisons] == [0.05, 0.05]
    assert [c["verdict"] for c in comparisons] == [stats.WANDER_BETTER, stats.BASELINE_BETTER]
    multipletests = pytest.importorskip("statsmodels.stats.multitest").multipletests
    assert list(multipletests([0.025, 0.05], alpha=0.05, method="holm")[0]) == [True, True]
    above = {"p_holm": np.nextafter(0.05, 1.0), "improvement": 1.0}
    assert stats.verdict(above) == stats.NOT_SIGNIFICANT


def test_holm_skips_missing():
    assert stats.holm([None, 0.02, float("nan"), 0.04]) == [None, pytest.approx(0.04), None,
                                                              pytest.approx(0.04)]


# ------------------------------------------------------------------ direction
def test_direction_aware_mae_lower_wins():
    assert stats.lower_is_better("mae") and stats.lower_is_better("t2v_mnr")
    assert stats.lower_is_better("v2t_mdr") and not stats.lower_is_better("acc2_non0")
    wander = {0: 0.90, 1: 0.92, 2: 0.91, 3: 0.89}     # lower MAE: Wander better
    base = {0: 0.95, 1: 0.97, 2: 0.94, 3: 0.96}
    c = stats.compare(wander, base, "mae")
    assert c["improvement"] > 0 and c["p_better"] == 1.0 and c["p_better_all_pairs"] == 1.0
    assert c["improvement_t_ci_low"] > 0
    same_numbers_as_accuracy = stats.compare(wander, base, "acc")
    assert same_numbers_as_accuracy["improvement"] < 0
    assert same_numbers_as_accuracy["p_better"] == 0.0
    stats.adjust([c])
    assert c["verdict"] == stats.WANDER_BETTER and c["p_holm"] == pytest.approx(c["p_t"])


def test_prob_better_ties_half_and_missing_seeds():
    assert stats.prob_better([1, 2, 3], [1, 1, 4], "acc") == pytest.approx((0.5 + 1 + 0) / 3)
    assert stats.prob_better([1, 2], [1, 3], "acc", paired=False) == pytest.approx(
        (0.5 + 0 + 1 + 0) / 4)
    c = stats.compare({0: 1.0, 1: 2.0, 2: 3.0}, {1: 1.5, 2: 2.0, 3: 9.0}, "acc")
    assert c["n"] == 2 and c["seeds"] == [1, 2]
    assert c["missing_in_baseline"] == [0] and c["missing_in_wander"] == [3]
    # improvements 0.5, 1.0: 0.75 +- t_{0.975,1} * sqrt(0.125) / sqrt(2) = 0.75 +- 12.706 / 4
    half = sps.t.ppf(0.975, 1) / 4
    assert (c["improvement_t_ci_low"], c["improvement_t_ci_high"]) == pytest.approx(
        (0.75 - half, 0.75 + half))
