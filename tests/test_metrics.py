"""Tests for harness.tasks.metrics.

Expected values are derived by hand in the comments; random-data checks compare against
independent implementations written here (scipy.stats for Pearson and average ranks, a
confusion-matrix F1 via np.add.at) and sklearn's f1_score.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import f1_score

from harness.errors import InputError
from harness.tasks.metrics import (
    classification_metrics,
    emotion_binary_metrics,
    emotion_metrics,
    regression_metrics,
    retrieval_metrics,
)

approx = pytest.approx


# ---------------------------------------------------------------------------------------------
# independent reference implementations
# ---------------------------------------------------------------------------------------------

def cm_f1(y_true, y_pred, average):
    """F1 from a confusion matrix built with np.add.at (rows: truth, columns: prediction)."""
    y_true = np.asarray(y_true).astype(int)
    y_pred = np.asarray(y_pred).astype(int)
    n = int(max(y_true.max(), y_pred.max())) + 1
    cm = np.zeros((n, n))
    np.add.at(cm, (y_true, y_pred), 1)
    tp = np.diag(cm)
    true_count = cm.sum(axis=1)
    pred_count = cm.sum(axis=0)
    present = (true_count + pred_count) > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        prec = np.where(pred_count > 0, tp / pred_count, 0.0)
        rec = np.where(true_count > 0, tp / true_count, 0.0)
        f1 = np.where(prec + rec > 0, 2 * prec * rec / (prec + rec), 0.0)
    if average == "macro":
        return f1[present].mean()
    return (f1 * true_count).sum() / true_count.sum()


def brute_retrieval(sim, caption_video):
    """Per-query average ranks with scipy.stats.rankdata, then the summary statistics."""
    sim = np.asarray(sim, dtype=float)
    cv = np.asarray(caption_video)
    t2v = np.array([stats.rankdata(-sim[i], method="average")[cv[i]] for i in range(len(cv))])
    v2t = []
    for j in range(sim.shape[1]):
        r = stats.rankdata(-sim[:, j], method="average")
        v2t.append(min(r[i] for i in range(len(cv)) if cv[i] == j))
    v2t = np.array(v2t)
    out = {}
    for name, ranks in (("t2v", t2v), ("v2t", v2t)):
        # MMT's hits on 0-based ranks: R@1 rank == 0, R@5 / R@10 rank < K
        out[f"{name}_r1"] = 100.0 * sum(1 for r in ranks if r - 1 == 0) / len(ranks)
        for k in (5, 10):
            out[f"{name}_r{k}"] = 100.0 * sum(1 for r in ranks if r - 1 < k) / len(ranks)
        out[f"{name}_mdr"] = float(np.median(ranks))
        out[f"{name}_mnr"] = float(np.mean(ranks))
    return out


# ---------------------------------------------------------------------------------------------
# regression
# ---------------------------------------------------------------------------------------------

def test_regression_hand_case_three_acc2_conventions_differ():
    y = np.array([0.0, 0.0, 1.0, -1.0, 2.0])
    p = np.array([0.0, -0.5, 0.5, 0.5, -1.0])
    m = regression_metrics(p, y)
    # MAE: |0| + |-0.5| + |-0.5| + |1.5| + |-3| = 5.5 -> 5.5 / 5
    assert m["mae"] == approx(1.1)
    # Pearson: p mean -0.1, y mean 0.4; dp = [.1,-.4,.6,.6,-.9], dy = [-.4,-.4,.6,-1.4,1.6]
    # sum dp*dy = -.04+.16+.36-.84-1.44 = -1.8; sum dp^2 = 1.7; sum dy^2 = 5.2
    assert m["corr"] == approx(-1.8 / math.sqrt(1.7 * 5.2))
    # ACC-7: round(p) = [0, -0 (half to even), 0 (half to even), 0, -1] vs [0, 0, 1, -1, 2]
    # -> matches at samples 0 and 1 -> 2/5
    assert m["acc7"] == approx(0.4)
    assert m["acc5"] == approx(0.4)  # nothing exceeds +-2, same rounding
    # Non0: keep samples 2,3,4: y>0 = [T,F,T], p>0 = [T,T,F] -> acc 1/3
    #   class T: support 2, predicted 2, tp 1 -> P=R=1/2, F1=1/2; class F: tp 0 -> F1 0
    #   weighted = (1/2*2 + 0*1)/3 = 1/3
    assert m["acc2_non0"] == approx(1 / 3)
    assert m["f1_non0"] == approx(1 / 3)
    # Has0: y>=0 = [T,T,T,F,T], p>=0 = [T,F,T,T,F] -> matches 0,2 -> 2/5
    #   class T: support 4, predicted 3, tp 2 -> P 2/3, R 1/2, F1 4/7; class F: tp 0 -> 0
    #   sklearn order (weights = true counts 4, 1): 4/7 * 4/5 = 16/35
    #   MulT/Wander order (weights = predicted counts 3, 2): 4/7 * 3/5 = 12/35
    assert m["acc2_has0"] == approx(0.4)
    assert m["f1_has0"] == approx(12 / 35)
    assert m["f1_has0_sklearn"] == approx(16 / 35)
    # Pos: y>0 = [F,F,T,F,T], p>0 = [F,F,T,T,F] -> matches 0,1,2 -> 3/5
    #   class T: support 2, predicted 2, tp 1 -> F1 1/2; class F: support 3, predicted 3,
    #   tp 2 -> F1 2/3; weighted = (1/2*2 + 2/3*3)/5 = 3/5 (true and predicted counts agree)
    assert m["acc2_pos"] == approx(0.6)
    assert m["f1_pos"] == m["f1_pos_sklearn"] == approx(0.6)
    assert m["f1_non0_sklearn"] == approx(1 / 3)  # Non0: true and predicted counts agree too
    assert set(m) == {"mae", "corr", "acc7", "acc5", "acc2_non0", "f1_non0", "f1_non0_sklearn",
                      "acc2_has0", "f1_has0", "f1_has0_sklearn", "acc2_pos", "f1_pos",
                      "f1_pos_sklearn"}
    assert all(isinstance(v, float) for v in m.values())


def test_f1_reference_code_order_vs_sklearn_order_confusion_matrix():
    """Confusion matrix (rows truth, columns prediction, classes pos / neg):
                 pred pos  pred neg
    truth pos       3         1
    truth neg       2         2
    Per-class F1 = 2 TP / (2 TP + FP + FN): pos 6 / 9 = 2/3, neg 4 / 7.
    True counts pos 4, neg 4; predicted counts pos 5, neg 3.
    sklearn order f1_score(truth, preds), weighted by true counts: (2/3 * 4 + 4/7 * 4) / 8 = 13/21.
    MulT / Wander order f1_score(preds, truth), weighted by predicted counts:
    (2/3 * 5 + 4/7 * 3) / 8 = (70/21 + 36/21) / 8 = 53/84."""
    y = np.array([1.0] * 4 + [-1.0] * 4)
    p = np.array([1.0, 1.0, 1.0, -1.0, 1.0, 1.0, -1.0, -1.0])
    m = regression_metrics(p, y)
    for name in ("non0", "has0", "pos"):  # no zero label or prediction: the three agree
        assert m[f"acc2_{name}"] == approx(5 / 8)
        assert m[f"f1_{name}"] == approx(53 / 84)
        assert m[f"f1_{name}_sklearn"] == approx(13 / 21)
    # the exact calls of the reference code (predictions first) and of MMSA (truth first)
    assert f1_score(p > 0, y > 0, average="weighted") == approx(53 / 84)
    assert f1_score(y > 0, p > 0, average="weighted") == approx(13 / 21)


def test_acc7_rounds_half_to_even_and_clips():
    # np.round: 2.5->2, 0.5->0, -0.5->-0, 1.5->2, -2.5->-2; 3.7 clips to 3 -> all six match.
    # (Round-half-away-from-zero would give 3, 1, -1, 2, -3: only 2/6 matches.)
    p = np.array([2.5, 0.5, -0.5, 1.5, -2.5, 3.7])
    y = np.array([2.0, 0.0, 0.0, 2.0, -2.0, 3.0])
    m = regression_metrics(p, y)
    assert m["acc7"] == 1.0
    # ACC-5 clips to +-2 first: p -> [2, .5, -.5, 1.5, -2, 2] -> [2, 0, -0, 2, -2, 2];
    # y -> [2, 0, 0, 2, -2, 2] -> all match
    assert m["acc5"] == 1.0


def test_acc5_differs_from_acc7_by_clipping():
    # sample 0: p 3.0 vs y 2.4: ACC-7 3 != 2; ACC-5 clip(3)=2 == round(2.4)=2
    # sample 1: p -2.6 vs y -3: ACC-7 -3 == -3; ACC-5 -2 == -2
    # sample 2: p 0.6 vs y -0.2: 1 != -0 in both
    m = regression_metrics([3.0, -2.6, 0.6], [2.4, -3.0, -0.2])
    assert m["acc7"] == approx(1 / 3)
    assert m["acc5"] == approx(2 / 3)


def test_corr_constant_side_is_undefined():
    assert math.isnan(regression_metrics([0.3, 0.3, 0.3, 0.3], [1.0, 2.0, 3.0, 4.0])["corr"])
    assert math.isnan(regression_metrics([1.0, 2.0, 3.0], [0.0, 0.0, 0.0])["corr"])
    # 0.1 repeated: the mean carries rounding noise, still constant
    assert math.isnan(regression_metrics([0.1] * 7, np.arange(7.0))["corr"])
    # a single sample has no correlation either
    assert math.isnan(regression_metrics([1.0], [2.0])["corr"])
    # perfectly linear -> 1 and -1
    assert regression_metrics([1.0, 2.0, 3.0], [2.0, 4.0, 6.0])["corr"] == approx(1.0)
    assert regression_metrics([1.0, 2.0, 3.0], [3.0, 2.0, 1.0])["corr"] == approx(-1.0)


def test_non0_all_zero_labels_is_nan():
    m = regression_metrics([0.5, -0.5], [0.0, 0.0])
    assert math.isnan(m["acc2_non0"]) and math.isnan(m["f1_non0"])
    assert math.isnan(m["f1_non0_sklearn"])
    # Has0: y>=0 all T; p>=0 = [T, F] -> acc 1/2; class T: support 2, pred 1, tp 1 ->
    # P 1, R 1/2, F1 2/3; class F: support 0, pred 1, F1 0.
    # sklearn order, weights = true counts (2, 0): 2/3. Predicted counts (1, 1): 1/3.
    assert m["acc2_has0"] == approx(0.5)
    assert m["f1_has0_sklearn"] == approx(2 / 3)
    assert m["f1_has0"] == approx(1 / 3)
    # Pos: y>0 all F; p>0 = [T, F] -> acc 1/2; class F: support 2, pred 1, tp 1 -> 2/3,
    # class T: F1 0; true counts (F 2, T 0) -> 2/3, predicted counts (1, 1) -> 1/3
    assert m["acc2_pos"] == approx(0.5)
    assert m["f1_pos_sklearn"] == approx(2 / 3)
    assert m["f1_pos"] == approx(1 / 3)


def test_regression_random_cross_check():
    rng = np.random.default_rng(0)
    y = np.round(rng.uniform(-3, 3, 400) * 3) / 3  # includes exact zeros
    y[:20] = 0.0
    p = np.clip(y + rng.normal(0, 1.0, 400), -3.5, 3.5)
    p[20:30] = 0.0
    m = regression_metrics(p.reshape(-1, 1, 1), y.reshape(-1, 1))  # MulT shapes accepted
    assert m["mae"] == approx(np.abs(p - y).mean())
    assert m["corr"] == approx(stats.pearsonr(p, y)[0])
    nz = y != 0
    for key, pp, yy in (("non0", p[nz] > 0, y[nz] > 0), ("has0", p >= 0, y >= 0),
                        ("pos", p > 0, y > 0)):
        assert m[f"acc2_{key}"] == approx(np.mean(pp == yy))
        assert m[f"f1_{key}"] == approx(cm_f1(pp, yy, "weighted"))
        assert m[f"f1_{key}"] == approx(f1_score(pp, yy, average="weighted"))
        assert m[f"f1_{key}_sklearn"] == approx(cm_f1(yy, pp, "weighted"))
        assert m[f"f1_{key}_sklearn"] == approx(f1_score(yy, pp, average="weighted"))
    a7 = sum(int(np.round(np.clip(a, -3, 3)) == np.round(np.clip(b, -3, 3))) for a, b in zip(p, y))
    assert m["acc7"] == approx(a7 / 400)


def test_regression_accepts_torch():
    torch = pytest.importorskip("torch")
    p = torch.tensor([0.0, -0.5, 0.5, 0.5, -1.0], requires_grad=True) * 1.0
    y = torch.tensor([0.0, 0.0, 1.0, -1.0, 2.0])
    m = regression_metrics(p, y)
    assert m["mae"] == approx(1.1)
    assert m["acc2_pos"] == approx(0.6)


# ---------------------------------------------------------------------------------------------
# classification / emotion
# ---------------------------------------------------------------------------------------------

def test_classification_hand_case_predictions_and_logits():
    label = np.array([0, 0, 0, 1, 1, 2])
    pred = np.array([0, 0, 1, 1, 2, 2])
    # class 0: support 3, predicted 2, tp 2 -> P 1, R 2/3, F1 4/5
    # class 1: support 2, predicted 2, tp 1 -> F1 1/2
    # class 2: support 1, predicted 2, tp 1 -> P 1/2, R 1, F1 2/3
    # acc 4/6; macro (4/5 + 1/2 + 2/3)/3 = 59/90; weighted (4/5*3 + 1/2*2 + 2/3*1)/6 = 61/90
    m = classification_metrics(pred, label)
    assert m == {"acc": approx(2 / 3), "f1_macro": approx(59 / 90),
                 "f1_weighted": approx(61 / 90)}
    logits = np.full((6, 3), -1.0)
    logits[np.arange(6), pred] = 2.0
    assert classification_metrics(logits, label, num_classes=3) == m


def test_classification_class_only_in_predictions_and_absent_classes():
    # class 0: support 2, predicted 1, tp 1 -> F1 2/3; class 1: perfect -> 1;
    # class 3: predicted once, never true -> F1 0, weight 0. Classes 2 and 4 (absent from
    # both) are ignored although num_classes=5.
    # macro (2/3 + 1 + 0)/3 = 5/9; weighted (2/3*2 + 1*2)/4 = 5/6; acc 3/4
    m = classification_metrics([0, 3, 1, 1], [0, 0, 1, 1], num_classes=5)
    assert m["acc"] == approx(0.75)
    assert m["f1_macro"] == approx(5 / 9)
    assert m["f1_weighted"] == approx(5 / 6)


def test_classification_random_cross_check_against_confusion_matrix():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 101, 3000)
    logits = rng.normal(size=(3000, 101))
    logits[np.arange(3000), y] += rng.normal(2.0, 2.0, 3000)
    pred = logits.argmax(1)
    m = classification_metrics(logits, y, num_classes=101)
    assert m["acc"] == approx(np.mean(pred == y))
    assert m["f1_macro"] == approx(cm_f1(y, pred, "macro"))
    assert m["f1_weighted"] == approx(cm_f1(y, pred, "weighted"))


def test_emotion_metrics_hand_case():
    # label [0,1,2,3,3], pred [0,1,2,3,0]: acc 4/5
    # class 0: support 1, predicted 2, tp 1 -> P 1/2, R 1, F1 2/3; classes 1, 2: F1 1;
    # class 3: support 2, predicted 1, tp 1 -> P 1, R 1/2, F1 2/3
    # weighted = (2/3 + 1 + 1 + 2/3*2)/5 = 4/5
    logits = np.eye(4)[[0, 1, 2, 3, 0]]
    m = emotion_metrics(logits, [0, 1, 2, 3, 3])
    assert m == {"acc": approx(0.8), "f1_weighted": approx(0.8)}


def test_emotion_binary_metrics_hand_case():
    labels = np.array([[1, 1, 0, 1],
                       [0, 1, 0, 1],
                       [1, 0, 0, 1],
                       [0, 0, 0, 1]])
    preds = np.array([[1, 1, 1, 1],
                      [0, 0, 1, 1],
                      [1, 0, 1, 1],
                      [0, 0, 1, 1]])
    logits = np.stack([-preds.astype(float), preds.astype(float)], axis=2)  # (4, 4, 2)
    m = emotion_binary_metrics(logits, labels)
    # neutral: perfect -> acc 1, F1 1
    assert m["neutral_acc"] == 1.0 and m["neutral_f1"] == approx(1.0)
    # happy: y [1,1,0,0], p [1,0,0,0] -> acc 3/4; class 1: P 1, R 1/2, F1 2/3;
    # class 0: support 2, predicted 3, tp 2 -> P 2/3, R 1, F1 4/5; weighted (2/3+4/5)/2 = 11/15
    assert m["happy_acc"] == approx(0.75)
    assert m["happy_f1"] == approx(11 / 15)
    # sad: y all 0, p all 1 -> acc 0; class 0 F1 0 (nothing predicted), class 1 weight 0 -> 0
    assert m["sad_acc"] == 0.0 and m["sad_f1"] == 0.0
    # angry: y all 1, p all 1 -> 1 and 1 (only class 1 present)
    assert m["angry_acc"] == 1.0 and m["angry_f1"] == approx(1.0)
    assert set(m) == {f"{n}_{k}" for n in ("neutral", "happy", "sad", "angry")
                      for k in ("acc", "f1")}
    # one-hot labels (MulT's N x 4 x 2) and flat (N, 8) logits give the same numbers
    onehot = np.eye(2)[labels]
    assert emotion_binary_metrics(logits.reshape(4, 8), onehot) == m


# ---------------------------------------------------------------------------------------------
# retrieval
# ---------------------------------------------------------------------------------------------

def test_retrieval_tie_gives_average_rank():
    sim = np.array([[0.9, 0.9, 0.1],   # caption 0: video 0 tied with video 1 -> rank 1.5
                    [0.2, 0.5, 0.8],   # caption 1: video 1 behind 0.8 -> rank 2
                    [0.3, 0.4, 0.7]])  # caption 2: video 2 first -> rank 1
    m = retrieval_metrics(sim, np.array([0, 1, 2]))
    # t2v ranks [1.5, 2, 1]: R@1 1/3 (0-based 0.5 is not 0), R@5 = R@10 = all, MdR 1.5, MnR 1.5
    assert m["t2v_r1"] == approx(100 / 3)
    assert m["t2v_r5"] == 100.0 and m["t2v_r10"] == 100.0
    assert m["t2v_mdr"] == approx(1.5) and m["t2v_mnr"] == approx(1.5)
    # v2t columns: video 0 [.9,.2,.3] caption 0 first -> 1; video 1 [.9,.5,.4] caption 1
    # behind .9 -> 2; video 2 [.1,.8,.7] caption 2 behind .8 -> 2. ranks [1,2,2]
    assert m["v2t_r1"] == approx(100 / 3)
    assert m["v2t_r5"] == 100.0
    assert m["v2t_mdr"] == approx(2.0) and m["v2t_mnr"] == approx(5 / 3)
    # caption_video=None means caption i <-> video i
    assert retrieval_metrics(sim) == m


def test_retrieval_multi_caption_best_rank_counts():
    sim = np.array([[0.1, 0.5, 0.5],    # c0 -> v0
                    [0.8, 0.2, 0.1],    # c1 -> v0
                    [0.6, 0.4, 0.2],    # c2 -> v1
                    [0.3, 0.45, 0.9],   # c3 -> v1
                    [0.2, 0.1, 0.5]])   # c4 -> v2
    cv = np.array([0, 0, 1, 1, 2])
    m = retrieval_metrics(sim, cv)
    # t2v: c0 0.1 behind two -> 3; c1 -> 1; c2 0.4 behind 0.6 -> 2; c3 0.45 behind 0.9 -> 2;
    # c4 -> 1. ranks [3,1,2,2,1]: R@1 40%, MdR 2, MnR 9/5
    assert m["t2v_r1"] == approx(40.0)
    assert m["t2v_r5"] == 100.0
    assert m["t2v_mdr"] == approx(2.0) and m["t2v_mnr"] == approx(1.8)
    # v2t, every video ranks all 5 captions:
    # v0 column [.1,.8,.6,.3,.2]: c0 rank 5, c1 rank 1 -> best 1 (the mean would be 3)
    # v1 column [.5,.2,.4,.45,.1]: c2 behind .5,.45 -> 3; c3 behind .5 -> 2 -> best 2
    # v2 column [.5,.1,.2,.9,.5]: c4 behind .9, tied with c0 -> 1 + (1+2)/2 = 2.5
    # ranks [1, 2, 2.5]: R@1 1/3, MdR 2, MnR 5.5/3
    assert m["v2t_r1"] == approx(100 / 3)
    assert m["v2t_r5"] == 100.0 and m["v2t_r10"] == 100.0
    assert m["v2t_mdr"] == approx(2.0)
    assert m["v2t_mnr"] == approx(5.5 / 3)


def test_retrieval_recall_at_5_and_10():
    # 12 captions/videos; caption i scores its video 0, the first i other videos 1, the rest -1,
    # so its rank is i + 1 -> ranks 1..12. Column j gets a 1 from every caption i > j, so
    # caption j ranks 12 - j in its video's column -> v2t ranks 12..1.
    n = 12
    sim = np.full((n, n), -1.0)
    for i in range(n):
        others = [j for j in range(n) if j != i]
        sim[i, others[:i]] = 1.0
        sim[i, i] = 0.0
    m = retrieval_metrics(sim, np.arange(n))
    for d in ("t2v", "v2t"):
        assert m[f"{d}_r1"] == approx(100 / 12)
        assert m[f"{d}_r5"] == approx(500 / 12)
        assert m[f"{d}_r10"] == approx(1000 / 12)
        assert m[f"{d}_mdr"] == approx(6.5)
        assert m[f"{d}_mnr"] == approx(6.5)


def test_retrieval_recall_counts_tied_ranks_as_mmt():
    """MMT counts an R@K hit when the 0-based tie-averaged rank is < K (R@1: == 0)."""
    n = 12
    sim = np.zeros((n, n))
    sim[0, [1, 2, 3, 4]] = 1.0                 # caption 0: 4 above, video 0 tied with video 5
    sim[0, [0, 5]] = 0.5                       #   -> rank 4 + (1 + 2) / 2 = 5.5
    sim[1, [0, 2, 3, 4, 5, 6, 7, 8, 9]] = 1.0  # caption 1: 9 above, video 1 tied with video 10
    sim[1, [1, 10]] = 0.5                      #   -> rank 9 + 1.5 = 10.5
    sim[2, [0, 1, 3, 4, 5]] = 1.0              # caption 2: 5 above, no tie -> rank 6
    sim[2, 2] = 0.5
    for i in range(3, n):                      # captions 3..11: own video alone on top -> 1
        sim[i, i] = 2.0
    m = retrieval_metrics(sim)
    # t2v ranks [5.5, 10.5, 6, 1 x 9]; 0-based [4.5, 9.5, 5, 0 x 9]
    assert m["t2v_r1"] == approx(100 * 9 / 12)
    assert m["t2v_r5"] == approx(100 * 10 / 12)   # 4.5 < 5 counts ("rank <= 5" would give 9)
    assert m["t2v_r10"] == approx(100.0)           # 9.5 < 10 counts ("<= 10" would give 11)
    assert m["t2v_mdr"] == approx(1.0)
    assert m["t2v_mnr"] == approx((9 + 5.5 + 10.5 + 6) / 12)


def test_retrieval_random_cross_check_with_ties():
    rng = np.random.default_rng(2)
    n_vid, per = 30, 3
    cv = np.repeat(np.arange(n_vid), per)
    rng.shuffle(cv)
    sim = np.round(rng.normal(size=(n_vid * per, n_vid)), 1)  # coarse values: many ties
    sim[np.arange(len(cv)), cv] += 0.5
    m = retrieval_metrics(sim.astype(np.float32), cv)
    ref = brute_retrieval(sim.astype(np.float32), cv)
    assert m.keys() == ref.keys()
    for k in ref:
        assert m[k] == approx(ref[k]), k


def test_retrieval_accepts_torch():
    torch = pytest.importorskip("torch")
    sim = torch.tensor([[0.9, 0.9, 0.1], [0.2, 0.5, 0.8], [0.3, 0.4, 0.7]])
    m = retrieval_metrics(sim, torch.tensor([0, 1, 2]))
    assert m["t2v_mdr"] == approx(1.5)


# ---------------------------------------------------------------------------------------------
# input validation
# ---------------------------------------------------------------------------------------------

def test_bad_regression_inputs_raise():
    with pytest.raises(InputError) as e:
        regression_metrics([0.1, 0.2, 0.3], [0.1, 0.2])
    assert e.value.key == "label" and "3 samples" in str(e.value.expected)
    with pytest.raises(InputError) as e:
        regression_metrics([0.1, float("nan")], [0.1, 0.2])
    assert e.value.key == "pred" and "1 NaN" in str(e.value.found)
    with pytest.raises(InputError) as e:
        regression_metrics([0.1, 0.2], [0.1, float("inf")])
    assert e.value.key == "label" and "1 inf" in str(e.value.found)
    with pytest.raises(InputError) as e:
        regression_metrics(np.zeros((4, 2)), np.zeros(4))
    assert e.value.key == "pred" and "(4, 2)" in str(e.value.found)
    with pytest.raises(InputError):
        regression_metrics([], [])
    with pytest.raises(InputError):
        regression_metrics(np.array(["a", "b"]), [0.0, 1.0])


def test_bad_classification_inputs_raise():
    with pytest.raises(InputError) as e:
        classification_metrics([0, 1], [0, 1, 1])
    assert e.value.key == "label"
    with pytest.raises(InputError) as e:
        classification_metrics([0, 1], [0, 1.5])
    assert e.value.key == "label"
    with pytest.raises(InputError) as e:
        classification_metrics(np.zeros((2, 3)), [0, 1], num_classes=4)
    assert e.value.key == "logits_or_pred"
    with pytest.raises(InputError) as e:
        classification_metrics([0, 1], [0, 5], num_classes=3)
    assert e.value.key == "label" and "max 5" in str(e.value.found)
    with pytest.raises(InputError) as e:
        classification_metrics(np.array([[np.nan, 1.0], [0.0, 1.0]]), [0, 1])
    assert e.value.key == "logits_or_pred"
    with pytest.raises(InputError) as e:
        emotion_binary_metrics(np.zeros((3, 4, 2)), np.zeros((3, 3), dtype=int))
    assert e.value.key == "labels"
    with pytest.raises(InputError) as e:
        emotion_binary_metrics(np.zeros((3, 4, 2)), np.full((3, 4), 2))
    assert e.value.key == "labels"
    with pytest.raises(InputError) as e:
        emotion_binary_metrics(np.zeros((3, 5)), np.zeros((3, 4), dtype=int))
    assert e.value.key == "logits"


def test_bad_retrieval_inputs_raise():
    sim = np.zeros((4, 3))
    with pytest.raises(InputError) as e:
        retrieval_metrics(sim, [0, 1, 2])  # one entry per caption needed
    assert e.value.key == "caption_video" and "4 entries" in str(e.value.expected)
    with pytest.raises(InputError) as e:
        retrieval_metrics(sim, [0, 1, 2, 3])  # video 3 does not exist
    assert e.value.key == "caption_video"
    with pytest.raises(InputError) as e:
        retrieval_metrics(sim, [0, 1, 1, 0])  # video 2 has no caption
    assert e.value.key == "caption_video" and "index 2" in str(e.value.found)
    with pytest.raises(InputError) as e:
        retrieval_metrics(sim)  # not square
    assert e.value.key == "caption_video"
    bad = np.eye(3)
    bad[1, 2] = np.nan
    with pytest.raises(InputError) as e:
        retrieval_metrics(bad)
    assert e.value.key == "sim"
    with pytest.raises(InputError) as e:
        retrieval_metrics(np.zeros(3))
    assert e.value.key == "sim"
