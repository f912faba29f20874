"""Late-fusion backbone for MOSI / IEMOCAP / MOSEI, as in the Wander code (MulT-style encoders).

Per modality: Conv1d(k=1) to a shared width, scaled embedding + sinusoidal positions, a stack of
pre-LN transformer layers and a final LayerNorm; the head is an MLP on the concatenation of every
modality's first token (MulT's proj1 / proj2 with residual / out_layer).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn
import torch.nn.functional as F

from harness.backbones.base import LockstepBackbone
from harness.backbones.layers import EncoderLayer, sinusoidal_positions


@dataclass
class LateFusionConfig:
    input_dims: dict[str, int] = field(default_factory=lambda: {"text": 32, "audio": 8, "vision": 12})
    seq_lens: dict[str, int] = field(default_factory=lambda: {"text": 16, "audio": 16, "vision": 16})
    width: int = 40
    depth: int = 2
    heads: int = 8
    output_dim: int = 1
    attn_dropout: float = 0.2
    relu_dropout: float = 0.2
    embed_dropout: float = 0.15
    res_dropout: float = 0.2
    out_dropout: float = 0.1

    def __post_init__(self):
        if len(self.input_dims) < 2:
            raise ValueError(f"late_fusion needs >= 2 modalities, got {list(self.input_dims)}")
        if set(self.input_dims) != set(self.seq_lens):
            raise ValueError(f"input_dims modalities {sorted(self.input_dims)} differ from "
                             f"seq_lens modalities {sorted(self.seq_lens)}")
        for name in ("width", "depth", "heads", "output_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"LateFusionConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.width % self.heads:
            raise ValueError(f"LateFusionConfig.width {self.width} is not divisible by heads {self.heads}")


# The backbone as released with the Wander code (data-and-metrics.md): 32 layers, width 40.
PAPER_MOSI = dict(input_dims={"text": 768, "audio": 5, "vision": 20},
                  seq_lens={"text": 50, "audio": 50, "vision": 50}, width=40, depth=32, heads=8)


class MLPHead(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, dropout: float):
        super().__init__()
        self.proj1 = nn.Linear(in_dim, in_dim)
        self.proj2 = nn.Linear(in_dim, in_dim)
        self.out = nn.Linear(in_dim, out_dim)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.proj2(F.dropout(F.relu(self.proj1(x)), p=self.dropout, training=self.training))
        return self.out(hidden + x)


class LateFusionBackbone(LockstepBackbone):
    activation = "relu"  # the encoders' FFN nonlinearity (what Wander's paper variant uses)

    def __init__(self, config: LateFusionConfig):
        super().__init__()
        self.config = config
        self.modalities = tuple(config.input_dims)
        w = config.width
        self.projections = nn.ModuleDict(
            {m: nn.Conv1d(d, w, kernel_size=1, bias=False) for m, d in config.input_dims.items()})
        self.encoders = nn.ModuleDict({
            m: nn.ModuleList(EncoderLayer(w, config.heads, config.attn_dropout, config.relu_dropout,
                                          config.res_dropout) for _ in range(config.depth))
            for m in self.modalities})
        self.final_norms = nn.ModuleDict({m: nn.LayerNorm(w) for m in self.modalities})
        self.register_buffer("positions", sinusoidal_positions(max(config.seq_lens.values()), w),
                             persistent=False)
        self.head = MLPHead(w * len(self.modalities), config.output_dim, config.out_dropout)

    def seq_len(self, modality: str) -> int:
        return self.config.seq_lens[modality]

    def embed(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        states = {}
        for m in self.modalities:
            x = self.projections[m](batch[m].transpose(1, 2)).transpose(1, 2)
            x = math.sqrt(self.config.width) * x + self.positions[: x.shape[1]]
            states[m] = F.dropout(x, p=self.config.embed_dropout, training=self.training)
        return states

    def pool(self, states: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([states[m][:, 0] for m in self.modalities], dim=-1)
