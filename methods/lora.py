"""LoRA (Hu et al. 2021) through the ``peft`` library: W x + (alpha / r) B A x on the targeted linears.

Targets are roles of the backbone's ``linear_sites()`` (default q and v, as in the LoRA paper);
peft receives their exact dotted paths, so any backbone exposing the contract works.
"""
from __future__ import annotations

from dataclasses import dataclass

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


def peft_config(backbone: nn.Module, config: LoraConfig):
    from peft import LoraConfig as PeftLoraConfig  # imported on use: peft takes seconds to import

    return PeftLoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout,
                          target_modules=target_paths(backbone, config.target_roles))


@register(
    "lora",
    config=LoraConfig,
    summary="LoRA (Hu et al. 2021) via peft on the backbone's attention/FFN linears",
    variants={"paper": Variant("peft LoRA: A Kaiming-uniform, B zero (Delta W = 0 at init)",
                               starts_as_identity=True)},
)
def apply(backbone: nn.Module, config: LoraConfig) -> None:
    from peft import inject_adapter_in_model

    inject_adapter_in_model(peft_config(backbone, config), backbone)
    for name, parameter in backbone.named_parameters():
        parameter.requires_grad_("lora_" in name)
