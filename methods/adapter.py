"""Houlsby adapter (Houlsby et al. 2019, Eq. 1 of the Wander paper): x + Up(act(Down(x))), two per
layer (after attention and after the FFN), in every layer of every modality encoder. Up starts at
zero, so the adapted model starts as the frozen backbone. Every LayerNorm of the backbone trains
with the adapters, as Houlsby et al. do ("we also train the layer normalization parameters";
released google-research/adapter-bert ``optimization.py``: the "adapters", "layer_norm" and "head"
collections).

Deviations from the released adapter-bert, both at init or in training only: its Down and Up
weights start from a truncated N(0, 1e-3) (near-identity; here Up is exactly zero, so the start is
exactly the frozen model), and it applies the sub-layer's dropout before the adapter (here the
backbone's residual dropout follows it: the same in eval mode). ``down_dim`` may exceed the width: the
Wander paper's "Adapter (d=64)" rows of Tables 2 and 3 run on the width-40 MOSI / IEMOCAP backbone
(no bottleneck then, but the configuration the paper reports)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from methods.base import MethodConfig, Variant, positive
from methods.registry import register


@dataclass
class AdapterConfig(MethodConfig):
    down_dim: int = 64

    def validate(self) -> None:
        positive(self, "down_dim")


class Bottleneck(nn.Module):
    def __init__(self, width: int, down_dim: int):
        super().__init__()
        self.down = nn.Linear(width, down_dim)
        self.up = nn.Linear(down_dim, width)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(nn.functional.gelu(self.down(x)))


@register(
    "adapter",
    config=AdapterConfig,
    summary="Houlsby adapter: two bottleneck adapters per layer (after attention and after FFN)",
    variants={"paper": Variant("Houlsby et al. 2019, zero-init up, LayerNorms trained",
                               starts_as_identity=True)},
)
def apply(backbone: nn.Module, config: AdapterConfig) -> None:
    for m in backbone.modalities:
        for depth in range(backbone.num_layers(m)):
            for point in ("attn", "ffn"):
                backbone.set_adapter(point, m, depth, Bottleneck(backbone.hidden_size(m), config.down_dim))
    for module in backbone.modules():
        if isinstance(module, nn.LayerNorm):
            module.requires_grad_(True)
