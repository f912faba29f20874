"""Full fine-tuning and linear probing: the two reference rows of every table."""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from methods.base import MethodConfig, Variant
from methods.registry import register


@dataclass
class NoConfig(MethodConfig):
    """These methods have no settings."""


@register(
    "full",
    config=NoConfig,
    summary="Full fine-tuning: every backbone parameter trains",
    variants={"paper": Variant("all parameters trainable", starts_as_identity=True)},
)
def apply_full(backbone: nn.Module, config: NoConfig) -> None:
    for parameter in backbone.parameters():
        parameter.requires_grad_(True)


@register(
    "linear",
    config=NoConfig,
    summary="Linear probe: frozen backbone, only the task head trains",
    variants={"paper": Variant("head only", starts_as_identity=True)},
)
def apply_linear(backbone: nn.Module, config: NoConfig) -> None:
    """Nothing to add: the registry freezes the backbone and unfreezes the head."""
