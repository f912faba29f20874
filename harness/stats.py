"""Statistics across seeds: per-cell summaries and paired Wander-vs-baseline comparisons.

Conventions (every table and figure of ``harness.tables`` uses these):

Direction
    ``lower_is_better(metric)`` is true for MAE and the retrieval ranks (``mae``, ``t2v_mdr``,
    ``t2v_mnr``, ``v2t_mdr``, ``v2t_mnr``, and any key ending in ``_mdr`` / ``_mnr``); every
    other metric is higher-is-better. A comparison's ``improvement`` is the paired difference
    signed so that a positive value means *Wander is better* (wander - baseline for
    higher-is-better metrics, baseline - wander for lower-is-better ones).

Summary of one cell (``summarize``)
    mean, std (ddof=1), n and the seeds; a 95% bootstrap CI of the mean from
    ``scipy.stats.bootstrap`` (BCa, 9999 resamples, a fixed ``numpy`` generator seeded with
    ``seed``, so reruns are identical). With n < 3 no CI is given (``ci_note`` says why) rather
    than one made up from one or two numbers; when all values are equal the CI is the point
    [v, v] and the note says so. A Student-t interval (``t_ci_*``) is reported next to it:
    bootstrap CIs of a mean under-cover at small n (about 0.90 instead of 0.95 at n = 10 for
    normal data), the t interval is exact for normal data.

Paired comparison (``compare``)
    Only seeds present on both sides pair up; the seeds missing on either side are listed and
    reduce n. Reported: the mean paired improvement with a bootstrap CI (same rules as above);
    the paired t-test (``scipy.stats.ttest_rel``, two-sided); the Wilcoxon signed-rank test
    (``scipy.stats.wilcoxon``, two-sided, exact: zero differences dropped as in Wilcoxon's
    original rule; when |differences| tie, the exact p comes from enumerating all 2^n sign
    flips with mid-ranks, ``scipy.stats.PermutationMethod``, since scipy's "exact" table
    ignores ties); ``wilcoxon_min_p``, the smallest two-sided p attainable with that many
    non-zero differences (2 / 2^n: 0.25 at n = 3, 0.0625 at n = 5), and a note when it is above
    alpha: such a test can never be significant and is no evidence either way.
    ``p_better`` = P(Wander > baseline), the *paired* estimator: over the matched seeds, the
    fraction where Wander is better (direction-aware), a tie counting 0.5.
    ``p_better_all_pairs`` is the unpaired estimator of Agarwal et al. (2021) (the
    Mann-Whitney AUC over every Wander seed x every baseline seed, ties 0.5), for reference.

Multiple comparisons (``holm``, ``adjust``)
    Holm's step-down adjustment over a family of p-values (the t-test p-values of all
    comparisons of one table); adjusted p-values are monotone in the raw ones and capped at 1.
    ``verdict`` reads the Holm-adjusted t-test p at alpha = 0.05.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import stats as sps

LOWER_IS_BETTER = frozenset({"mae", "t2v_mdr", "t2v_mnr", "v2t_mdr", "v2t_mnr"})
CONFIDENCE = 0.95
N_RESAMPLES = 9999
SEED = 0
ALPHA = 0.05
MIN_N_CI = 3

WANDER_BETTER = "Wander better"
BASELINE_BETTER = "baseline better"
NOT_SIGNIFICANT = "no significant difference"
UNTESTABLE = "untestable"


def lower_is_better(metric: str) -> bool:
    """True for metrics where smaller is better (MAE, median and mean retrieval rank)."""
    return metric in LOWER_IS_BETTER or metric.endswith(("_mdr", "_mnr"))


def _finite(values) -> np.ndarray:
    arr = np.asarray([float(v) for v in values], dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError("expected a 1-D sequence of numbers")
    return arr


def _none_if_nan(x) -> float | None:
    if x is None:
        return None
    x = float(x)
    return None if math.isnan(x) else x


def bootstrap_ci(values: Sequence[float], *, confidence: float = CONFIDENCE,
                 n_resamples: int = N_RESAMPLES, seed: int = SEED,
                 ) -> tuple[float | None, float | None, str]:
    """95% (by default) BCa bootstrap CI of the mean: (low, high, note).

    n < 3: (None, None, "CI unavailable: ..."); all values equal: the point interval, noted;
    BCa undefined (NaN): falls back to the percentile interval and says so.
    """
    x = _finite(values)
    n = x.size
    if n < MIN_N_CI:
        return None, None, f"CI unavailable: n={n} < {MIN_N_CI}"
    if np.all(x == x[0]):
        return float(x[0]), float(x[0]), "all values equal: CI is the point"
    note = ""
    for method in ("BCa", "percentile"):
        result = sps.bootstrap((x,), np.mean, n_resamples=n_resamples, confidence_level=confidence,
                               method=method, rng=np.random.default_rng(seed))
        low, high = result.confidence_interval
        if np.isfinite(low) and np.isfinite(high):
            return float(low), float(high), note
        note = "BCa undefined: percentile interval"
    return None, None, "CI unavailable: bootstrap degenerate"


def t_interval(values: Sequence[float], confidence: float = CONFIDENCE,
               ) -> tuple[float | None, float | None]:
    """Student-t interval of the mean (n >= 2), for reference next to the bootstrap CI."""
    x = _finite(values)
    if x.size < 2:
        return None, None
    half = sps.t.ppf(0.5 + confidence / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size)
    return float(x.mean() - half), float(x.mean() + half)


def summarize(values: Sequence[float], seeds: Sequence[int] | None = None, *,
              confidence: float = CONFIDENCE, n_resamples: int = N_RESAMPLES,
              seed: int = SEED) -> dict:
    """mean, std (ddof=1), n, seeds, bootstrap CI (+ note) and t interval of one cell."""
    x = _finite(values)
    n = int(x.size)
    low, high, note = bootstrap_ci(x, confidence=confidence, n_resamples=n_resamples, seed=seed)
    t_low, t_high = t_interval(x, confidence)
    return {
        "n": n,
        "seeds": sorted(int(s) for s in seeds) if seeds is not None else None,
        "mean": float(x.mean()) if n else None,
        "std": float(x.std(ddof=1)) if n >= 2 else None,
        "ci_low": low, "ci_high": high, "ci_note": note,
        "t_ci_low": t_low, "t_ci_high": t_high,
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
    ties = np.unique(np.abs(nonzero)).size < n
    if ties:
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


def paired_t(a: Sequence[float], b: Sequence[float]) -> tuple[float | None, float | None, str]:
    """Paired t-test (scipy.stats.ttest_rel, two-sided): (t, p, note)."""
    a, b = _finite(a), _finite(b)
    if a.size < 2:
        return None, None, f"t-test needs n >= 2 pairs (n={a.size})"
    d = a - b
    if np.all(d == d[0]):
        return None, None, ("all paired differences equal: t-test undefined (zero variance)"
                            if d[0] != 0 else "all paired differences zero: t-test undefined")
    result = sps.ttest_rel(a, b)
    return _none_if_nan(result.statistic), _none_if_nan(result.pvalue), ""


def _wins(improvement: np.ndarray) -> np.ndarray:
    return np.where(improvement > 0, 1.0, np.where(improvement < 0, 0.0, 0.5))


def prob_better(wander: Sequence[float], baseline: Sequence[float], metric: str,
                paired: bool = True) -> float | None:
    """P(Wander > baseline), direction-aware, ties 0.5.

    paired=True: ``wander[i]`` and ``baseline[i]`` are the same seed; the fraction of seeds where
    Wander is better. paired=False: over all len(wander) x len(baseline) combinations.
    """
    w, b = _finite(wander), _finite(baseline)
    sign = -1.0 if lower_is_better(metric) else 1.0
    if paired:
        if w.size != b.size:
            raise ValueError("paired P(Wander > baseline) needs equal-length, seed-matched inputs")
        if w.size == 0:
            return None
        return float(_wins(sign * (w - b)).mean())
    if w.size == 0 or b.size == 0:
        return None
    return float(_wins(sign * (w[:, None] - b[None, :])).mean())


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
            confidence: float = CONFIDENCE, n_resamples: int = N_RESAMPLES, seed: int = SEED,
            alpha: float = ALPHA) -> dict:
    """Wander vs one baseline on one metric, paired by seed (``{seed: value}`` on each side)."""
    seeds = sorted(set(wander) & set(baseline))
    w = _finite([wander[s] for s in seeds])
    b = _finite([baseline[s] for s in seeds])
    sign = -1.0 if lower_is_better(metric) else 1.0
    improvement = sign * (w - b)
    n = len(seeds)
    low, high, ci_note = bootstrap_ci(improvement, confidence=confidence,
                                      n_resamples=n_resamples, seed=seed)
    t_stat, p_t, t_note = paired_t(w, b)
    wil = (wilcoxon_exact(improvement, alpha) if n else
           {"p": None, "n": 0, "min_p": 1.0, "method": None, "note": "no paired seeds"})
    notes = [note for note in (t_note, ci_note) if note]
    return {
        "metric": metric,
        "lower_is_better": lower_is_better(metric),
        "n": n,
        "seeds": seeds,
        "missing_in_wander": sorted(set(baseline) - set(wander)),
        "missing_in_baseline": sorted(set(wander) - set(baseline)),
        "wander_mean": float(w.mean()) if n else None,
        "baseline_mean": float(b.mean()) if n else None,
        "improvement": float(improvement.mean()) if n else None,
        "improvement_ci_low": low, "improvement_ci_high": high,
        "t_stat": t_stat, "p_t": p_t,
        "p_wilcoxon": wil["p"], "wilcoxon_n": wil["n"], "wilcoxon_min_p": wil["min_p"],
        "wilcoxon_method": wil["method"], "wilcoxon_note": wil["note"],
        "p_better": prob_better(w, b, metric, paired=True),
        "p_better_all_pairs": prob_better(list(wander.values()), list(baseline.values()), metric,
                                          paired=False),
        "note": "; ".join(notes),
        "p_holm": None, "verdict": None,
    }


def verdict(comparison: Mapping, alpha: float = ALPHA) -> str:
    """Reads the Holm-adjusted t-test p and the sign of the mean improvement."""
    p = comparison.get("p_holm")
    if p is None:
        return UNTESTABLE
    if p >= alpha:
        return NOT_SIGNIFICANT
    return WANDER_BETTER if comparison["improvement"] > 0 else BASELINE_BETTER


def adjust(comparisons: Sequence[dict], alpha: float = ALPHA) -> None:
    """Holm over the t-test p-values of ``comparisons`` (one family); sets p_holm and verdict."""
    for comparison, p in zip(comparisons, holm([c["p_t"] for c in comparisons])):
        comparison["p_holm"] = p
        comparison["verdict"] = verdict(comparison, alpha)


def write_stats(records_dir="results/runs", out_path="results/stats.csv", params=None, *,
                n_resamples: int = N_RESAMPLES) -> dict:
    """The ``stats`` stage: a per-(dataset, grid row, metric) summary over seeds of every metric
    in the selected records, as one CSV (written atomically). Returns {"path", "cells"}."""
    from harness.tables.collect import collect
    from harness.tables.io import write_csv_atomic

    selection = collect(records_dir, params)
    rows = []
    for (dataset, key), by_seed in sorted(selection.cells().items()):
        metrics = sorted({m for r in by_seed.values() for m, v in r["metrics"].items()
                          if isinstance(v, (int, float)) and not isinstance(v, bool)})
        for metric in metrics:
            seeds = [s for s in sorted(by_seed) if metric in by_seed[s]["metrics"]]
            summary = summarize([by_seed[s]["metrics"][metric] for s in seeds], seeds,
                                n_resamples=n_resamples)
            rows.append({"dataset": dataset, "row": key, "metric": metric,
                         "lower_is_better": lower_is_better(metric),
                         **{k: summary[k] for k in ("n", "mean", "std", "ci_low", "ci_high",
                                                    "ci_note", "t_ci_low", "t_ci_high")},
                         "seeds": " ".join(str(s) for s in seeds)})
    fields = ["dataset", "row", "metric", "lower_is_better", "n", "seeds", "mean", "std", "ci_low",
              "ci_high", "ci_note", "t_ci_low", "t_ci_high"]
    write_csv_atomic(out_path, fields, rows)
    return {"path": str(out_path), "cells": len(rows)}
