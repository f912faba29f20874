"""Tasks: how a backbone's output becomes a loss and the paper's metrics.

Each task names its output size, loss, metric function and the validation metric used for model
selection (its direction: ``metrics.lower_is_better``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from harness.tasks import metrics
from harness.tasks.retrieval_loss import max_margin_ranking_loss


@dataclass(frozen=True)
class Task:
    name: str
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    evaluate: Callable[[torch.Tensor, torch.Tensor], dict[str, float]]
    select_metric: str

    @property
    def lower_is_better(self) -> bool:
        return metrics.lower_is_better(self.select_metric)

    def better(self, new: float, best: float | None) -> bool:
        if best is None:
            return True
        return new < best if self.lower_is_better else new > best


def _regression_loss(output: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    return F.l1_loss(output.view(-1), label.view(-1).to(output.dtype))  # MulT: L1 for MOSI


def _emotion_binary_loss(output: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """IEMOCAP MulT layout: 4 binary tasks, output (B, 8) read as (B, 4, 2), label (B, 4)."""
    return F.cross_entropy(output.view(-1, 2), label.reshape(-1).long())


EMOTIONS = ("neutral", "happy", "sad", "angry")


def _emotion_binary_metrics(output: torch.Tensor, label: torch.Tensor) -> dict[str, float]:
    """Per-emotion binary accuracy / weighted F1 (MulT), plus their means as ``acc`` / ``f1``."""
    per_emotion = metrics.emotion_binary_metrics(output.view(-1, 4, 2), label, names=EMOTIONS)
    per_emotion["acc"] = sum(per_emotion[f"{e}_acc"] for e in EMOTIONS) / len(EMOTIONS)
    per_emotion["f1"] = sum(per_emotion[f"{e}_f1"] for e in EMOTIONS) / len(EMOTIONS)
    return per_emotion


def _cross_entropy(output: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(output, label.view(-1).long())


def _ranking_loss(similarity: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """MMT's bidirectional max-margin ranking loss; the batch's diagonal pairs are the positives."""
    return max_margin_ranking_loss(similarity)


def _retrieval_metrics(similarity: torch.Tensor, caption_video: torch.Tensor) -> dict[str, float]:
    """R@K / MdR / MnR both ways, plus ``rsum`` (sum of the six recalls) for model selection."""
    scores = metrics.retrieval_metrics(similarity, caption_video)
    scores["rsum"] = sum(scores[f"{d}_r{k}"] for d in ("t2v", "v2t") for k in (1, 5, 10))
    return scores


TASKS = {
    "regression": Task("regression", _regression_loss, metrics.regression_metrics, "mae"),
    "emotion_binary": Task("emotion_binary", _emotion_binary_loss, _emotion_binary_metrics, "acc"),
    "emotion4": Task("emotion4", _cross_entropy, metrics.emotion_metrics, "acc"),
    "classification": Task("classification", _cross_entropy, metrics.classification_metrics, "acc"),
    "retrieval": Task("retrieval", _ranking_loss, _retrieval_metrics, "rsum"),
}
