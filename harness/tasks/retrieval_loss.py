"""Bidirectional max-margin ranking loss for text-video retrieval (MMT, Gabeur et al. 2020;
margin 0.05 in MMT's MSR-VTT and HowTo100M configs).

``similarity`` is (B, B): row i = text i, column j = video j, the diagonal holds the positive
pairs. For every negative pair (i, j), i != j:

    text -> video:  max(0, margin + s_ij - s_ii)     (text i ranks video j above its own)
    video -> text:  max(0, margin + s_ij - s_jj)     (video j ranks text i above its own)

loss = (mean over i != j of the first + mean over i != j of the second) / 2. The diagonal does not
enter the means (MMT's ``fix_norm: true``: the positive pair is not counted as a zero-loss
"negative"). A batch of one pair has no negatives and gives 0.
"""
from __future__ import annotations

import torch
from torch import nn

MARGIN = 0.05


def max_margin_ranking_loss(similarity: torch.Tensor, margin: float = MARGIN) -> torch.Tensor:
    if similarity.dim() != 2 or similarity.shape[0] != similarity.shape[1]:
        raise ValueError(f"similarity must be a square (B, B) matrix with the positives on the "
                         f"diagonal, got shape {tuple(similarity.shape)}")
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    n = similarity.shape[0]
    if n < 2:
        return similarity.sum() * 0.0
    positive = similarity.diagonal()
    negative = ~torch.eye(n, dtype=torch.bool, device=similarity.device)
    text_to_video = torch.relu(margin + similarity - positive[:, None])[negative]
    video_to_text = torch.relu(margin + similarity - positive[None, :])[negative]
    return (text_to_video.mean() + video_to_text.mean()) / 2


class MaxMarginRankingLoss(nn.Module):
    def __init__(self, margin: float = MARGIN):
        super().__init__()
        self.margin = margin

    def forward(self, similarity: torch.Tensor) -> torch.Tensor:
        return max_margin_ranking_loss(similarity, self.margin)


__all__ = ["MARGIN", "MaxMarginRankingLoss", "max_margin_ranking_loss"]
