"""Statistics across seeds: per-cell summaries and paired Wander-vs-baseline comparisons.

Conventions (every table and figure of ``harness.tables`` uses these):

Direction
    ``lower_is_better(metric)`` (``harness.tasks.metrics``: MAE and the retrieval ranks); every
    other metric is higher-is-better. A comparison's ``improvement`` is the paired difference
    signed so that a positive value means *Wander is better* (wander - baseline for
    higher-is-better metrics, baseline - wander for lower-is-better ones). The paired t
    statistic is that of the improvement, so ``t_stat > 0`` also means Wander is better.

Undefined values
    A NaN value (e.g. a Pearson correlation with a constant side) is never used as a number:
    ``summarize`` and ``compare`` leave its seed out and list it (``undefined_seeds``, and a
    note); the lower-level functions refuse non-finite input (``ValueError``).

Rounding
    Two values closer than ``RELATIVE_TOLERANCE`` times the largest |value| of the comparison
    are equal: such a paired difference is zero (a tie), and paired differences whose spread
    is within it have zero variance (t-test untestable). Float rounding (0.1 + 0.2 - 0.3 =
    5.6e-17, or accuracies scaled x100) therefore cannot turn "untestable" into p = 1e-31.
    ``merge_ties`` applies the rule within one list of values (sorted values each within the
    tolerance of the previous one are one tie): the Wilcoxon test's |differences| (mid-ranks)
    and the leaderboards' means (shared ranks).

Summary of one cell (``summarize``)
    mean, std (ddof=1), n and the seeds; the 95% Student-t interval of the mean
    (``t_ci_low``, ``t_ci_high``: mean +- t_{0.975, n-1} s / sqrt(n)), exact for normal data at
    every n >= 2. No bootstrap: with the 3-5 seeds of these tables a BCa bootstrap interval of
    the mean covers about 75% (n = 3) instead of 95%. With n < 2 no interval is given
    (``ci_note`` says why); equal values give the zero-width interval, noted.

Paired comparison (``compare``)
    Only seeds present (and defined) on both sides pair up; the seeds missing on either side
    are listed and reduce n. Reported: the mean paired improvement with its t interval (same
    rules as above); the paired t-test (two-sided, ``scipy.stats.ttest_1samp`` of the
    improvements against 0, i.e. ``ttest_rel`` with the sign of the improvement); the
    Wilcoxon signed-rank test (``scipy.stats.wilcoxon``, two-sided, exact: zero differences
    dropped as in Wilcoxon's original rule; when |differences| tie, the exact p comes from
    enumerating all 2^n sign flips with mid-ranks, ``scipy.stats.PermutationMethod``, since
    scipy's "exact" table ignores ties); ``wilcoxon_min_p``, the smallest two-sided p
    attainable with that many non-zero differences (2 / 2^n: 0.25 at n = 3, 0.0625 at n = 5),
    and a note when it is above alpha: such a test can never be significant and is no
    evidence either way. ``p_better`` = P(Wander > baseline), the *paired* estimator: over the
    matched seeds, the fraction where Wander is better (direction-aware), a tie counting 0.5.
    ``p_better_all_pairs`` is the unpaired estimator of Agarwal et al. (2021) (the
    Mann-Whitney AUC over every Wander seed x every baseline seed, ties 0.5), for reference.

Multiple comparisons (``holm``, ``adjust``)
    Holm's step-down adjustment over a family of p-values (the t-test p-values of all
    comparisons of one table); adjusted p-values are monotone in the raw ones and capped at 1
    (the same numbers as statsmodels' ``multipletests(method='holm')``).
    ``verdict`` rejects at Holm-adjusted t-test p <= alpha = 0.05.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import stats as sps

from harness.tasks.metrics import lower_is_better

CONFIDENCE = 0.95
SEED = 0
ALPHA = 0.05
RELATIVE_TOLERANCE = 1e-9
INTERVAL = "95% Student-t interval of the mean"

WANDER_BETTER = "Wander better"
BASELINE_BETTER = "baseline better"
NOT_SIGNIFICANT = "no significant difference"
UNTESTABLE = "untestable"


def _finite(values) -> np.ndarray:
    """1-D float64 array; refuses NaN and inf (an undefined metric is not a number to test)."""
    arr = np.asarray([float(v) for v in values], dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError("expected a 1-D sequence of numbers")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"undefined (NaN / inf) value among {arr.tolist()}: leave it out "
                         f"(summarize / compare do, with a note)")
    return arr


def _none_if_nan(x) -> float | None:
    if x is None:
        return None
    x = float(x)
    return None if math.isnan(x) else x


def _defined(value) -> bool:
    return value is not None and math.isfinite(float(value))


def tolerance(*arrays: np.ndarray) -> float:
    """Rounding tolerance of differences between the given values: RELATIVE_TOLERANCE x the
    largest |value| (0 when every value is 0)."""
    scale = max((float(np.max(np.abs(a))) for a in arrays if a.size), default=0.0)
    return RELATIVE_TOLERANCE * scale


def merge_ties(values) -> np.ndarray:
    """``values`` with each tie made exact: sorted values each within the rounding ``tolerance``
    of the previous one take the smallest one's value."""
    x = _finite(values)
    merged, order, tol = x.copy(), np.argsort(x, kind="stable"), tolerance(x)
    for previous, current in zip(order, order[1:]):
        if x[current] - x[previous] <= tol:
            merged[current] = merged[previous]
    return merged


def improvements(wander: np.ndarray, baseline: np.ndarray, metric: str) -> np.ndarray:
    """Direction-signed differences (> 0: Wander better), broadcasting; differences within the
    rounding ``tolerance`` of the values are exactly 0 (ties)."""
    sign = -1.0 if lower_is_better(metric) else 1.0
    d = sign * (wander - baseline)
    return np.where(np.abs(d) <= tolerance(wander, baseline), 0.0, d)


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE,
               ) -> tuple[float | None, float | None, str]:
    """Student-t interval of the mean: (low, high, note); None with a note when n < 2."""
    x = _finite(values)
    if x.size < 2:
        return None, None, f"CI unavailable: n={x.size} < 2"
    mean = float(x.mean())
    if np.ptp(x) <= tolerance(x):
        return mean, mean, "all values equal: zero-width interval"
    half = sps.t.ppf(0.5 + confidence / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size)
    return float(mean - half), float(mean + half), ""


def summarize(values: Sequence[float], seeds: Sequence[int] | None = None, *,
              confidence: float = CONFIDENCE) -> dict:
    """mean, std (ddof=1), n, seeds and the Student-t interval (+ note) of one cell.

    Undefined (NaN) values are left out: their seeds (positions when ``seeds`` is None) are
    listed in ``undefined_seeds`` and ``note``."""
    raw = [float(v) for v in values]
    labels = list(seeds) if seeds is not None else list(range(len(raw)))
    undefined = sorted(int(s) for s, v in zip(labels, raw) if not math.isfinite(v))
    kept = [(int(s), v) for s, v in zip(labels, raw) if math.isfinite(v)]
    x = _finite([v for _, v in kept])
    n = int(x.size)
    low, high, ci_note = t_interval(x, confidence)
    return {
        "n": n,
        "seeds": sorted(s for s, _ in kept) if seeds is not None else None,
        "mean": float(x.mean()) if n else None,
        "std": float(x.std(ddof=1)) if n >= 2 else None,
        "t_ci_low": low, "t_ci_high": high, "ci_note": ci_note,
        "undefined_seeds": undefined,
        "note": (f"undefined (NaN) at seed(s) {', '.join(map(str, undefined))}: left out"
                 if undefined else ""),
        "confidence": confidence,
    }


def wilcoxon_min_p(n: int, alternative: str = "two-sided") -> float:
    """Smallest p-value the exact signed-rank test can give with n non-zero differences."""
    if n <= 0:
        return 1.0
    one_sided = 0.5 ** n
    return min(1.0, 2 * one_sided) if alternative == "two-sided" else one_sided


def wilcoxon_exact(differences: Sequence[float], alpha: float = ALPHA) -> dict:
    """Exact two-sided Wilcoxon signed-rank test of paired differences.

    Returns p (None when no non-zero difference), the number of non-zero differences used,
    the smallest attainable p and a note (zeros dropped, ties handled, min p above alpha).
    """
    d = _finite(differences)
    nonzero = d[d != 0]
    n = int(nonzero.size)
    notes = []
    if n < d.size:
        notes.append(f"{d.size - n} zero difference(s) dropped")
    min_p = wilcoxon_min_p(n)
    if n == 0:
        notes.append("no non-zero difference: test undefined")
        return {"p": None, "n": 0, "min_p": min_p, "method": None, "note": "; ".join(notes)}
    # |differences| equal within the rounding tolerance are one tie (mid-ranks), never ranked
    # by float noise
    magnitude = merge_ties(np.abs(nonzero))
    nonzero = np.sign(nonzero) * magnitude
    if np.unique(magnitude).size < n:
        method = sps.PermutationMethod(n_resamples=max(2 ** n, 9999),
                                       rng=np.random.default_rng(SEED))
        method_name = "exact (sign-flip enumeration, mid-ranks for tied |differences|)"
    else:
        method, method_name = "exact", "exact"
    p = float(sps.wilcoxon(nonzero, method=method).pvalue)
    if min_p > alpha:
        notes.append(f"n={n}: smallest attainable two-sided p is {min_p:.4g} > {alpha}: "
                     f"cannot reach significance; not evidence either way")
    return {"p": p, "n": n, "min_p": min_p, "method": method_name, "note": "; ".join(notes)}


def paired_t(wander: Sequence[float], baseline: Sequence[float], metric: str,
             ) -> tuple[float | None, float | None, str]:
    """Two-sided paired t-test of the direction-signed improvement: (t, p, note).

    ``t > 0`` means Wander is better, whatever the metric's direction. Untestable (None, None)
    with n < 2 pairs or when the improvements' spread is within the rounding tolerance."""
    w, b = _finite(wander), _finite(baseline)
    if w.size != b.size:
        raise ValueError("paired t-test needs equal-length, seed-matched inputs")
    if w.size < 2:
        return None, None, f"t-test needs n >= 2 pairs (n={w.size})"
    d = improvements(w, b, metric)
    if np.ptp(d) <= tolerance(w, b):
        return None, None, ("all paired differences zero: t-test undefined"
                            if np.all(d == 0) else
                            "all paired differences equal: t-test undefined (zero variance)")
    result = sps.ttest_1samp(d, 0.0)
    return _none_if_nan(result.statistic), _none_if_nan(result.pvalue), ""


def _wins(improvement: np.ndarray) -> np.ndarray:
    return np.where(improvement > 0, 1.0, np.where(improvement < 0, 0.0, 0.5))


def prob_better(wander: Sequence[float], baseline: Sequence[float], metric: str,
                paired: bool = True) -> float | None:
    """P(Wander > baseline), direction-aware, ties (within the rounding tolerance) 0.5.

    paired=True: ``wander[i]`` and ``baseline[i]`` are the same seed; the fraction of seeds where
    Wander is better. paired=False: over all len(wander) x len(baseline) combinations.
    """
    w, b = _finite(wander), _finite(baseline)
    if paired:
        if w.size != b.size:
            raise ValueError("paired P(Wander > baseline) needs equal-length, seed-matched inputs")
        if w.size == 0:
            return None
        return float(_wins(improvements(w, b, metric)).mean())
    if w.size == 0 or b.size == 0:
        return None
    return float(_wins(improvements(w[:, None], b[None, :], metric)).mean())


def holm(pvalues: Sequence[float | None]) -> list[float | None]:
    """Holm step-down adjusted p-values (same order as given; None / NaN stay None).

    Sorted ascending p_(1) <= ... <= p_(m): adj_(i) = max_{j <= i} min(1, (m - j + 1) p_(j)),
    so adjusted p-values are monotone in the raw ones.
    """
    valid = [(i, float(p)) for i, p in enumerate(pvalues)
             if p is not None and not math.isnan(float(p))]
    m = len(valid)
    adjusted: list[float | None] = [None] * len(pvalues)
    running = 0.0
    for rank, (index, p) in enumerate(sorted(valid, key=lambda item: (item[1], item[0]))):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[index] = running
    return adjusted


def compare(wander: Mapping[int, float], baseline: Mapping[int, float], metric: str, *,
            confidence: float = CONFIDENCE, alpha: float = ALPHA) -> dict:
    """Wander vs one baseline on one metric, paired by seed (``{seed: value}`` on each side).
    A seed whose value is undefined (NaN) on either side is left out and listed."""
    common = sorted(set(wander) & set(baseline))
    undefined = [s for s in common if not (_defined(wander[s]) and _defined(baseline[s]))]
    seeds = [s for s in common if s not in undefined]
    w = _finite([wander[s] for s in seeds])
    b = _finite([baseline[s] for s in seeds])
    improvement = improvements(w, b, metric)
    n = len(seeds)
    low, high, ci_note = t_interval(improvement, confidence)
    t_stat, p_t, t_note = paired_t(w, b, metric)
    wil = (wilcoxon_exact(improvement, alpha) if n else
           {"p": None, "n": 0, "min_p": 1.0, "method": None, "note": "no paired seeds"})
    undefined_note = (f"seed(s) {', '.join(map(str, undefined))} left out: {metric} undefined "
                      f"(NaN) on one side" if undefined else "")
    notes = [note for note in (undefined_note, t_note, ci_note) if note]
    return {
        "metric": metric,
        "lower_is_better": lower_is_better(metric),
        "n": n,
        "seeds": seeds,
        "undefined_seeds": undefined,
        "missing_in_wander": sorted(set(baseline) - set(wander)),
        "missing_in_baseline": sorted(set(wander) - set(baseline)),
        "wander_mean": float(w.mean()) if n else None,
        "baseline_mean": float(b.mean()) if n else None,
        "improvement": float(improvement.mean()) if n else None,
        "improvement_t_ci_low": low, "improvement_t_ci_high": high,
        "t_stat": t_stat, "p_t": p_t,
        "p_wilcoxon": wil["p"], "wilcoxon_n": wil["n"], "wilcoxon_min_p": wil["min_p"],
        "wilcoxon_method": wil["method"], "wilcoxon_note": wil["note"],
        "p_better": prob_better(w, b, metric, paired=True),
        "p_better_all_pairs": prob_better([v for v in wander.values() if _defined(v)],
                                          [v for v in baseline.values() if _defined(v)],
                                          metric, paired=False),
        "note": "; ".join(notes),
        "p_holm": None, "verdict": None,
    }


def verdict(comparison: Mapping, alpha: float = ALPHA) -> str:
    """Reads the Holm-adjusted t-test p (rejected at p <= alpha) and the sign of the mean
    improvement."""
    p = comparison.get("p_holm")
    if p is None:
        return UNTESTABLE
    if p > alpha:
        return NOT_SIGNIFICANT
    return WANDER_BETTER if comparison["improvement"] > 0 else BASELINE_BETTER


def adjust(comparisons: Sequence[dict], alpha: float = ALPHA) -> None:
    """Holm over the t-test p-values of ``comparisons`` (one family); sets p_holm and verdict."""
    for comparison, p in zip(comparisons, holm([c["p_t"] for c in comparisons])):
        comparison["p_holm"] = p
        comparison["verdict"] = verdict(comparison, alpha)

