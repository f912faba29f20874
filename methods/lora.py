"""LoRA (Hu et al. 2021, Eq. 3): h = W x + (alpha / r) B A x on the targeted linears, W frozen.

Targets are roles of the backbone's ``linear_sites()`` (default q and v, as in the LoRA paper),
wrapped by their exact dotted paths, so any backbone exposing the contract works.

``LoraLinear`` is laid out and initialised as the ``peft`` library's LoRA linear (``base_layer``,
``lora_A.default``, ``lora_B.default``; the same random draws in the same module order), so a
model adapted here has peft's parameters, names, order and numbers
(tests/test_methods_contract.py compares them bit for bit). It is written here because importing
peft (transformers, accelerate and their imports) cost each process running a LoRA run several
seconds, more than a tiny run's training.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from methods.base import MethodConfig, Variant, at_most_hidden, positive, probability, require
from methods.registry import register

ROLES = ("q", "k", "v", "o", "fc1", "fc2")


@dataclass
class LoraConfig(MethodConfig):
    rank: int = 16
    alpha: float = 16.0
    dropout: float = 0.0
    target_roles: tuple[str, ...] = ("q", "v")

    def validate(self) -> None:
        positive(self, "rank", "alpha")
        probability(self, "dropout")
        self.target_roles = tuple(self.target_roles)
        require(bool(self.target_roles) and set(self.target_roles) <= set(ROLES), self,
                "target_roles", f"a non-empty subset of {ROLES}")

    def validate_for(self, backbone: nn.Module) -> None:
        at_most_hidden(self, backbone, "rank")


def target_paths(backbone: nn.Module, roles: tuple[str, ...]) -> list[str]:
    return [site.path for site in backbone.linear_sites() if site.role in roles]


class LoraLinear(nn.Module):
    """``base_layer(x) + lora_B(lora_A(dropout(x))) * alpha / r`` around a frozen ``nn.Linear``."""

    ADAPTER = "default"  # peft's adapter name, kept so parameter names match peft's

    def __init__(self, base_layer: nn.Linear, rank: int, alpha: float, dropout: float):
        super().__init__()
        self.base_layer = base_layer
        # created on the CPU in float32 and moved, as peft does: the same draws on any device
        down = nn.Linear(base_layer.in_features, rank, bias=False)
        up = nn.Linear(rank, base_layer.out_features, bias=False)
        nn.init.kaiming_uniform_(down.weight, a=math.sqrt(5))  # A as nn.Linear's default, drawn again
        nn.init.zeros_(up.weight)                              # B = 0: Delta W = B A = 0 at init
        weight = base_layer.weight
        self.lora_A = nn.ModuleDict({self.ADAPTER: down.to(weight.device, weight.dtype)})
        self.lora_B = nn.ModuleDict({self.ADAPTER: up.to(weight.device, weight.dtype)})
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.scaling = alpha / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        down, up = self.lora_A[self.ADAPTER], self.lora_B[self.ADAPTER]
        update = up(down(self.lora_dropout(x.to(down.weight.dtype)))) * self.scaling
        return (result + update).to(result.dtype)


@register(
    "lora",
    config=LoraConfig,
    summary="LoRA (Hu et al. 2021) on the backbone's attention/FFN linears",
    variants={"paper": Variant("LoRA as peft's: A Kaiming-uniform, B zero (Delta W = 0 at init)",
                               starts_as_identity=True)},
)
def apply(backbone: nn.Module, config: LoraConfig) -> None:
    targets = set(target_paths(backbone, config.target_roles))
    for path in [name for name, _ in backbone.named_modules() if name in targets]:  # module order
        parent, _, attribute = path.rpartition(".")
        owner = backbone.get_submodule(parent)
        linear = getattr(owner, attribute)
        if type(linear) is not nn.Linear:
            raise TypeError(f"LoRA target {path} is a {type(linear).__name__}, not an nn.Linear")
        setattr(owner, attribute, LoraLinear(linear, config.rank, config.alpha, config.dropout))
    for name, parameter in backbone.named_parameters():
        parameter.requires_grad_("lora_" in name)
