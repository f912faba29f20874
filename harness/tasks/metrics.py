"""Evaluation metrics for the four task families, as the MulT / MMSA / MMT evaluation code defines them.

Pure numpy. Every function accepts numpy arrays or torch tensors (converted through
``.detach().cpu()``), validates its inputs (shapes agree, values finite, class ids valid) and
raises :class:`harness.errors.InputError` naming the argument, what was expected and what was
found. Every function returns a ``dict[str, float]`` with self-describing keys.

Functions and keys
------------------
``regression_metrics(pred, label)``  (CMU-MOSI / CMU-MOSEI, sentiment in [-3, 3])
    ``mae``, ``corr``, ``acc7``, ``acc5``,
    ``acc2_non0``, ``f1_non0``  -- drop samples with y == 0, compare p > 0 with y > 0
                                   (MulT default, MMSA "Non0"),
    ``acc2_has0``, ``f1_has0``  -- all samples, p >= 0 vs y >= 0 (MMSA "Has0", neg/nonneg),
    ``acc2_pos``,  ``f1_pos``   -- all samples, p > 0 vs y > 0 (Wander code default, pos/nonpos),
    ``f1_non0_sklearn``, ``f1_has0_sklearn``, ``f1_pos_sklearn`` -- the same three F1s in
                                   sklearn's usual argument order (see "F1 of MOSI/MOSEI" below).
``classification_metrics(logits_or_pred, label, num_classes=None)``  (UPMC-Food101)
    ``acc``, ``f1_macro``, ``f1_weighted``.
``emotion_metrics(logits, label)``  (IEMOCAP 4-class, MMIN/CGGM layout)
    ``acc``, ``f1_weighted``.
``emotion_binary_metrics(logits, labels, names=...)``  (IEMOCAP, MulT layout)
    ``{name}_acc``, ``{name}_f1`` for each emotion (binary task, weighted F1).
``retrieval_metrics(sim, caption_video=None)``  (MSR-VTT)
    ``t2v_r1, t2v_r5, t2v_r10, t2v_mdr, t2v_mnr, v2t_r1, v2t_r5, v2t_r10, v2t_mdr, v2t_mnr``.

Conventions
-----------
* F1 is sklearn's ``f1_score`` semantics: per-class F1 over the classes present in the labels
  OR the predictions (classes absent from both are ignored); a zero precision (or recall)
  denominator gives 0 for that term, and F1 = 0 when precision + recall = 0. ``weighted``
  weights each class by its support in the labels; ``macro`` is the plain mean.
* F1 of MOSI/MOSEI (``f1_non0``, ``f1_has0``, ``f1_pos``) is computed as the reference code
  computes it: ``f1_score(preds > 0, truth > 0, average='weighted')``, the predictions in
  sklearn's ``y_true`` slot, so each class is weighted by how often it is PREDICTED (per-class
  F1 itself is symmetric in the two arguments). Read in yaohungt/Multimodal-Transformer
  ``src/eval_metrics.py`` (``eval_mosei_senti``, which ``eval_mosi`` calls), zrguo/CGGM
  ``src/eval_metrics.py`` (``eval_senti``) and the Wander code as released in
  HalfMoon1008/WANDER and shinnew9/WANDER ``utils/eval_metrics.py`` (``eval_senti``, called
  by ``train/mosi_train.py``): the paper's MOSI F1 comes from this call. The usual order
  (weights = true class counts, MMSA) is kept as ``f1_*_sklearn``.
  IEMOCAP and Food-101 F1s use the usual order, as the reference code does there
  (MulT ``eval_iemocap``, CGGM ``eval_iemocap``, Wander/CGGM ``eval_food``: all
  ``f1_score(truth, preds)``).
* Pearson ``corr`` is NaN when either side is constant (or N < 2): the correlation is
  undefined there (0.0 would read as "no correlation"); the tables show such a value as
  undefined and the statistics exclude it with a note.
* Rounding for ACC-7 / ACC-5 is ``np.round``, i.e. round half to EVEN (2.5 -> 2, -0.5 -> -0,
  1.5 -> 2), exactly as the MulT and MMSA evaluation code does.
* ``acc2_non0`` / ``f1_non0`` are NaN when every label is 0 (no sample left).
* Retrieval ranks are 1-based, ties averaged (see :func:`retrieval_metrics`); R@K is in
  percent and counts hits as MMT does (rank - 1 == 0 for R@1, rank - 1 < K for R@5 / R@10).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from harness.errors import InputError


def lower_is_better(metric: str) -> bool:
    """True for the metrics where smaller is better: MAE and the retrieval ranks (median and mean
    rank, ``*_mdr`` / ``*_mnr``, either direction). Every other metric is higher-is-better."""
    return metric == "mae" or metric.endswith(("_mdr", "_mnr"))

__all__ = [
    "regression_metrics",
    "classification_metrics",
    "emotion_metrics",
    "emotion_binary_metrics",
    "retrieval_metrics",
    "weighted_f1",
    "macro_f1",
]


# ---------------------------------------------------------------------------------------------
# input handling
# ---------------------------------------------------------------------------------------------

def _to_numpy(x: Any, name: str) -> np.ndarray:
    """numpy array from a numpy array, torch tensor, list or scalar."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch tensor, without importing torch
        t = x.detach().cpu()
        try:
            return t.numpy()
        except TypeError:  # e.g. bfloat16 has no numpy dtype
            return t.float().numpy()
    try:
        arr = np.asarray(x)
    except Exception as exc:  # ragged lists and the like
        raise InputError(f"{name} cannot be converted to an array ({exc})", key=name,
                         expected="array-like of numbers", found=type(x).__name__) from exc
    return arr


def _numeric(x: Any, name: str) -> np.ndarray:
    """Numeric array with only finite values."""
    arr = _to_numpy(x, name)
    if arr.dtype == bool:
        arr = arr.astype(np.int64)
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise InputError(f"{name} must be numeric", key=name,
                         expected="integer or floating array", found=f"dtype {arr.dtype}")
    if arr.size == 0:
        raise InputError(f"{name} is empty", key=name, expected="at least one sample",
                         found=f"shape {tuple(arr.shape)}")
    if np.issubdtype(arr.dtype, np.floating):
        bad = ~np.isfinite(arr)
        if bad.any():
            n_nan = int(np.isnan(arr).sum())
            n_inf = int(bad.sum()) - n_nan
            raise InputError(f"{name} contains non-finite values", key=name,
                             expected="only finite values",
                             found=f"{n_nan} NaN and {n_inf} inf of {arr.size}")
    return arr


def _vector(x: Any, name: str) -> np.ndarray:
    """1-D float64 vector; (N,), (N, 1) and (N, 1, 1) are accepted (MulT stores N x 1 x 1)."""
    arr = _numeric(x, name)
    if arr.ndim == 0 or any(d != 1 for d in arr.shape[1:]):
        raise InputError(f"{name} must be one value per sample", key=name,
                         expected="shape (N,), (N, 1) or (N, 1, 1)",
                         found=f"shape {tuple(arr.shape)}")
    return arr.reshape(arr.shape[0]).astype(np.float64)


def _int_vector(x: Any, name: str) -> np.ndarray:
    """1-D int64 vector of non-negative class ids (float arrays with integral values pass)."""
    arr = _vector(x, name)
    if not np.all(arr == np.round(arr)):
        raise InputError(f"{name} must hold integer class ids", key=name,
                         expected="integer values", found=f"non-integer values, e.g. "
                         f"{arr[arr != np.round(arr)][0]!r}")
    out = arr.astype(np.int64)
    if out.min() < 0:
        raise InputError(f"{name} must hold non-negative class ids", key=name,
                         expected="ids >= 0", found=f"min {int(out.min())}")
    return out


def _same_length(a: np.ndarray, b: np.ndarray, name_a: str, name_b: str) -> None:
    if a.shape[0] != b.shape[0]:
        raise InputError(f"{name_a} and {name_b} must have the same number of samples",
                         key=name_b, expected=f"{a.shape[0]} samples (as {name_a})",
                         found=f"{b.shape[0]} samples")


# ---------------------------------------------------------------------------------------------
# F1 (sklearn semantics, own implementation)
# ---------------------------------------------------------------------------------------------

def _per_class_f1(y_true: np.ndarray, y_pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(f1, support) for every class present in y_true or y_pred, from counts per class (the
    same divisions, class by class, as precision = tp / predicted, recall = tp / true)."""
    classes, codes = np.unique(np.concatenate([y_true, y_pred]), return_inverse=True)
    true_codes, pred_codes = codes[:len(y_true)], codes[len(y_true):]
    k = len(classes)
    tp = np.bincount(true_codes[true_codes == pred_codes], minlength=k).astype(np.float64)
    n_true = np.bincount(true_codes, minlength=k).astype(np.float64)
    n_pred = np.bincount(pred_codes, minlength=k).astype(np.float64)
    precision = np.divide(tp, n_pred, out=np.zeros(k), where=n_pred > 0)
    recall = np.divide(tp, n_true, out=np.zeros(k), where=n_true > 0)
    both = precision + recall
    f1 = np.divide(2 * precision * recall, both, out=np.zeros(k), where=both > 0)
    return f1, n_true


def weighted_f1(y_true: Any, y_pred: Any) -> float:
    """sklearn ``f1_score(y_true, y_pred, average='weighted')``: per-class F1 weighted by true support."""
    f1, support = _per_class_f1(np.asarray(y_true).ravel(), np.asarray(y_pred).ravel())
    total = support.sum()
    return float((f1 * support).sum() / total) if total > 0 else 0.0


def macro_f1(y_true: Any, y_pred: Any) -> float:
    """sklearn ``f1_score(y_true, y_pred, average='macro')``: unweighted mean over present classes."""
    f1, _ = _per_class_f1(np.asarray(y_true).ravel(), np.asarray(y_pred).ravel())
    return float(f1.mean()) if f1.size else 0.0


# ---------------------------------------------------------------------------------------------
# regression (MOSI / MOSEI)
# ---------------------------------------------------------------------------------------------

def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation; NaN when either side is constant (the correlation is undefined)."""
    da = a - a.mean()
    db = b - b.mean()
    na = np.sqrt(np.sum(da * da))
    nb = np.sqrt(np.sum(db * db))
    # A side is "constant" when its spread is zero or only rounding noise of its magnitude.
    scale_a = max(np.abs(a).max(), 1.0)
    scale_b = max(np.abs(b).max(), 1.0)
    eps = np.finfo(np.float64).eps * 16
    if na <= eps * scale_a * np.sqrt(a.size) or nb <= eps * scale_b * np.sqrt(b.size):
        return float("nan")
    r = float(np.sum(da * db) / (na * nb))
    return float(min(1.0, max(-1.0, r)))


def _binary(p_pos: np.ndarray, y_pos: np.ndarray) -> tuple[float, float, float]:
    """(accuracy, F1 as the MulT/Wander code calls it, F1 in sklearn's usual order)."""
    if y_pos.size == 0:
        return float("nan"), float("nan"), float("nan")
    return float(np.mean(p_pos == y_pos)), weighted_f1(p_pos, y_pos), weighted_f1(y_pos, p_pos)


def regression_metrics(pred: Any, label: Any) -> dict[str, float]:
    """MOSI/MOSEI sentiment metrics (see the module docstring for the keys and conventions)."""
    p = _vector(pred, "pred")
    y = _vector(label, "label")
    _same_length(p, y, "pred", "label")

    out: dict[str, float] = {}
    out["mae"] = float(np.mean(np.abs(p - y)))
    out["corr"] = _pearson(p, y)
    # np.round = round half to even (banker's rounding), as MulT's and MMSA's evaluation code.
    out["acc7"] = float(np.mean(np.round(np.clip(p, -3, 3)) == np.round(np.clip(y, -3, 3))))
    out["acc5"] = float(np.mean(np.round(np.clip(p, -2, 2)) == np.round(np.clip(y, -2, 2))))

    nz = y != 0  # Non0: samples with a zero label are dropped
    for name, p_pos, y_pos in (("non0", p[nz] > 0, y[nz] > 0),
                               ("has0", p >= 0, y >= 0),   # neg / non-neg
                               ("pos", p > 0, y > 0)):     # non-pos / pos
        out[f"acc2_{name}"], out[f"f1_{name}"], out[f"f1_{name}_sklearn"] = _binary(p_pos, y_pos)
    return out


# ---------------------------------------------------------------------------------------------
# classification (Food-101, IEMOCAP)
# ---------------------------------------------------------------------------------------------

def _predictions(logits_or_pred: Any, name: str, n_classes_hint: int | None) -> np.ndarray:
    """(N, C) scores -> argmax; (N,) / (N, 1) integer predictions pass through."""
    arr = _numeric(logits_or_pred, name)
    if arr.ndim == 2 and arr.shape[1] > 1:
        if n_classes_hint is not None and arr.shape[1] != n_classes_hint:
            raise InputError(f"{name} has the wrong number of classes", key=name,
                             expected=f"{n_classes_hint} columns (num_classes)",
                             found=f"shape {tuple(arr.shape)}")
        return np.argmax(arr, axis=1).astype(np.int64)
    if arr.ndim >= 1 and all(d == 1 for d in arr.shape[1:]):
        return _int_vector(arr, name)
    raise InputError(f"{name} must be (N, C) scores or (N,) class predictions", key=name,
                     expected="shape (N, C) or (N,)", found=f"shape {tuple(arr.shape)}")


def _check_range(ids: np.ndarray, name: str, num_classes: int | None) -> None:
    if num_classes is not None and ids.size and ids.max() >= num_classes:
        raise InputError(f"{name} holds a class id out of range", key=name,
                         expected=f"ids in [0, {num_classes})", found=f"max {int(ids.max())}")


def classification_metrics(logits_or_pred: Any, label: Any,
                           num_classes: int | None = None) -> dict[str, float]:
    """Accuracy, macro F1 and weighted F1.

    ``logits_or_pred``: (N, C) scores (argmax is taken) or (N,) integer predictions.
    ``label``: (N,) integer class ids. ``num_classes``, when given, checks the score width
    and the id range; the F1 averages are over the classes present in labels or predictions
    (sklearn's default), not over all ``num_classes``.
    """
    if num_classes is not None and (int(num_classes) != num_classes or num_classes < 1):
        raise InputError("num_classes must be a positive integer", key="num_classes",
                         expected="int >= 1", found=repr(num_classes))
    pred = _predictions(logits_or_pred, "logits_or_pred", num_classes)
    y = _int_vector(label, "label")
    _same_length(pred, y, "logits_or_pred", "label")
    _check_range(y, "label", num_classes)
    _check_range(pred, "logits_or_pred", num_classes)
    return {
        "acc": float(np.mean(pred == y)),
        "f1_macro": macro_f1(y, pred),
        "f1_weighted": weighted_f1(y, pred),
    }


def emotion_metrics(logits: Any, label: Any) -> dict[str, float]:
    """IEMOCAP 4-class (MMIN/CGGM layout): accuracy and weighted F1.

    ``logits``: (N, C) scores or (N,) predictions; ``label``: (N,) class ids.
    """
    m = classification_metrics(logits, label)
    return {"acc": m["acc"], "f1_weighted": m["f1_weighted"]}


def emotion_binary_metrics(logits: Any, labels: Any,
                           names: Sequence[str] = ("neutral", "happy", "sad", "angry"),
                           ) -> dict[str, float]:
    """IEMOCAP in the MulT layout: one binary task per emotion.

    ``logits``: (N, K, 2) scores (or (N, 2K), read as (N, K, 2), the flat output of MulT's
    head); ``labels``: (N, K) 0/1 ints or (N, K, 2) one-hot (argmax over the last axis).
    For each emotion ``name``: ``{name}_acc`` and ``{name}_f1`` (weighted F1 of that binary
    task, sklearn's usual order ``f1_score(truth, preds)``), as MulT's ``eval_iemocap``.
    """
    names = tuple(names)
    k = len(names)
    if k == 0 or len(set(names)) != k:
        raise InputError("names must be distinct and non-empty", key="names",
                         expected="distinct emotion names", found=repr(names))
    lg = _numeric(logits, "logits")
    if lg.ndim == 2 and lg.shape[1] == 2 * k:
        lg = lg.reshape(lg.shape[0], k, 2)
    if lg.ndim != 3 or lg.shape[1:] != (k, 2):
        raise InputError("logits must be (N, K, 2) with K = len(names)", key="logits",
                         expected=f"shape (N, {k}, 2) or (N, {2 * k})",
                         found=f"shape {tuple(lg.shape)}")
    lb = _numeric(labels, "labels")
    if lb.ndim == 3:
        if lb.shape[1:] != (k, 2):
            raise InputError("one-hot labels must be (N, K, 2)", key="labels",
                             expected=f"shape (N, {k}, 2)", found=f"shape {tuple(lb.shape)}")
        lb = np.argmax(lb, axis=2)
    elif lb.ndim != 2 or lb.shape[1] != k:
        raise InputError("labels must be (N, K) ints or (N, K, 2) one-hot", key="labels",
                         expected=f"shape (N, {k}) or (N, {k}, 2)",
                         found=f"shape {tuple(lb.shape)}")
    if not np.all((lb == 0) | (lb == 1)):
        raise InputError("binary labels must be 0 or 1", key="labels", expected="values in {0, 1}",
                         found=f"values {np.unique(lb)[:5].tolist()}")
    if lg.shape[0] != lb.shape[0]:
        raise InputError("logits and labels must have the same number of samples", key="labels",
                         expected=f"{lg.shape[0]} samples (as logits)",
                         found=f"{lb.shape[0]} samples")
    pred = np.argmax(lg, axis=2)
    lb = lb.astype(np.int64)
    out: dict[str, float] = {}
    for i, name in enumerate(names):
        out[f"{name}_acc"] = float(np.mean(pred[:, i] == lb[:, i]))
        out[f"{name}_f1"] = weighted_f1(lb[:, i], pred[:, i])
    return out


# ---------------------------------------------------------------------------------------------
# retrieval (MSR-VTT)
# ---------------------------------------------------------------------------------------------

def _tie_averaged_rank(scores: np.ndarray, target: np.ndarray) -> np.ndarray:
    """1-based rank of ``target`` values within each row of ``scores`` (descending), ties averaged.

    ``scores``: (Q, M); ``target``: (Q,) the score of the item to rank in each row. An item
    tied with k others (k + 1 equal scores) behind g strictly higher ones gets the mean of the
    positions g+1 .. g+k+1, i.e. g + (k + 2) / 2.
    """
    t = target[:, None]
    greater = np.sum(scores > t, axis=1)
    equal = np.sum(scores == t, axis=1)  # includes the item itself
    return greater + (equal + 1) / 2.0


def _rank_summary(ranks: np.ndarray, prefix: str) -> dict[str, float]:
    """R@K, MdR, MnR from 1-based tie-averaged ranks, with MMT's hit rule (gabeur/mmt
    ``model/metric.py``, ``cols2metrics``, on 0-based ranks): R@1 counts rank - 1 == 0,
    R@5 / R@10 count rank - 1 < K, so a tie-averaged 5.5 is an R@5 hit, 1.5 is no R@1 hit."""
    zero_based = ranks - 1
    out = {f"{prefix}_r1": float(100.0 * np.mean(zero_based == 0))}
    out.update({f"{prefix}_r{k}": float(100.0 * np.mean(zero_based < k)) for k in (5, 10)})
    out[f"{prefix}_mdr"] = float(np.median(ranks))
    out[f"{prefix}_mnr"] = float(np.mean(ranks))
    return out


def retrieval_metrics(sim: Any, caption_video: Any = None) -> dict[str, float]:
    """Text<->video retrieval metrics (MMT conventions).

    ``sim``: (num_captions, num_videos) similarities, text queries in rows.
    ``caption_video``: (num_captions,) ground-truth video index of each caption (several
    captions may share a video). ``None`` means caption i belongs to video i (square ``sim``,
    the 1k-A one-caption-per-video test).

    Text->video: each caption ranks its video among all videos by descending similarity.
    Video->text: each video ranks ALL captions by its column of ``sim``; the video's rank is
    the best (minimum) rank over its own captions (MMT's multi-caption rule).
    Ranks are 1-based; ties are averaged in both directions (a correct item tied with k others
    gets the mean of the tied positions; in v2t this applies to each caption against all
    captions, including the video's other captions, before the minimum is taken, as MMT).
    R@K is the percentage of hits by MMT's rule (see :func:`_rank_summary`: a tie-averaged
    rank 1.5 is not an R@1 hit, 5.5 is an R@5 hit, 10.5 an R@10 hit); MdR and MnR are the
    median and mean rank. Every video needs at least one caption.
    """
    s = _numeric(sim, "sim")
    if s.ndim != 2:
        raise InputError("sim must be a (num_captions, num_videos) matrix", key="sim",
                         expected="2-D array", found=f"shape {tuple(s.shape)}")
    if not np.issubdtype(s.dtype, np.floating):
        s = s.astype(np.float64)  # float inputs keep their dtype (full-split sims are large)
    n_cap, n_vid = s.shape
    if caption_video is None:
        if n_cap != n_vid:
            raise InputError("without caption_video, sim must be square (caption i <-> video i)",
                             key="caption_video", expected="caption_video, or a square sim",
                             found=f"sim shape {(n_cap, n_vid)}")
        cv = np.arange(n_cap, dtype=np.int64)
    else:
        cv = _int_vector(caption_video, "caption_video")
        if cv.shape[0] != n_cap:
            raise InputError("caption_video needs one video index per caption (row of sim)",
                             key="caption_video", expected=f"{n_cap} entries",
                             found=f"{cv.shape[0]} entries")
        _check_range(cv, "caption_video", n_vid)
    counts = np.bincount(cv, minlength=n_vid)
    if np.any(counts == 0):
        missing = np.flatnonzero(counts == 0)
        raise InputError("every video needs at least one caption for video->text ranking",
                         key="caption_video", expected=f"all {n_vid} videos captioned",
                         found=f"{missing.size} videos without captions, e.g. index {int(missing[0])}")

    rows = np.arange(n_cap)
    t2v = _tie_averaged_rank(s, s[rows, cv])

    # v2t: rank every caption of video j within column j (sorted once, O(num_captions)
    # memory per video), then keep the best rank of the video's own captions.
    order = np.argsort(cv, kind="stable")
    starts = np.concatenate([[0], np.cumsum(counts)])
    v2t = np.empty(n_vid, dtype=np.float64)
    for j in range(n_vid):
        col = s[:, j]
        own = col[order[starts[j]:starts[j + 1]]]
        sorted_col = np.sort(col)
        right = np.searchsorted(sorted_col, own, side="right")
        left = np.searchsorted(sorted_col, own, side="left")
        greater = n_cap - right
        equal = right - left  # includes the caption itself
        v2t[j] = np.min(greater + (equal + 1) / 2.0)

    out = _rank_summary(t2v, "t2v")
    out.update(_rank_summary(v2t, "v2t"))
    return out
