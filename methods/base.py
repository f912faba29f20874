"""The method contract: what a backbone exposes, what a method is, and the one parameter counter.

A backbone (implemented in harness/backbones, never imported here) is an ``nn.Module`` with:

- ``modalities``: tuple of modality names, in the backbone's order (M >= 2);
- ``hidden_size(m)``, ``num_layers(m)``, ``seq_len(m)``: width, encoder depth and the number of
  tokens modality ``m`` carries between layers (prompts excluded); ``depth``: the number of
  layers the encoders run in lock-step (every ``num_layers(m)``);
- ``activation``: the encoders' FFN nonlinearity, ``"relu"`` or ``"gelu"`` (Wander's ``backbone``
  activation);
- ``linear_sites()``: every adaptable ``nn.Linear`` as a ``LinearSite`` (dotted path, modality,
  depth, role in ``q k v o fc1 fc2``), for LoRA and Aurora;
- ``set_adapter(point, modality, depth, module)``: runs ``module`` on the output of the
  ``point`` sub-layer ("attn" or "ffn") of layer ``depth`` before its residual add (Houlsby);
- optional ``set_parallel_adapter(modality, depth, module)``: ``module(h)`` is added to the output
  of layer ``depth``, h = the layer's post-attention residual stream (UniAdapter's parallel
  placement as released; methods fall back to hooking the FFN block where it is absent);
- ``set_prompts(provider)``: a ``PromptProvider`` whose tokens are prepended to every layer's
  input and removed after it (P-tuning v2, MaPLe, PMF);
- ``set_fusion_hook(depth, module)``: a cross-modal module applied after layer ``depth`` of every
  modality, mapping ``{modality: (B, L_m, D_m)}`` to the same (Wander); depth ``num_layers - 1``
  is "after the last layer";
- ``head``: the task head; every parameter under ``head.`` counts as head, the rest as method.

Optional, for method variants that reproduce a released model whose task head differs from the
backbone's own: ``head_options`` (the names of the alternative heads the backbone offers),
``set_head(name)`` (replaces ``head`` by a freshly initialised head of that name, together with
the pooling that feeds it; everything under ``head.`` still counts as head) and ``head_choice``
(the active name, ``"default"`` until ``set_head``). A method asks through ``use_head(backbone,
name)``, which leaves a backbone that does not offer ``name`` unchanged and returns False. Names:

- ``RELEASED_WANDER_HEAD`` (``"wander_released"``): the head of the released Wander model. On
  ``late_fusion`` (released ``models/model.py`` AdapterModel): the first token of the concatenation
  of all modalities after the last fusion hook (the fused token 0), repeated M times, into the
  released MLP (M*D -> D, ReLU; D -> D, ReLU, dropout, D -> D, plus the residual; D -> out).

Encoders run in lock-step over depth so prompt and fusion hooks can see all modalities at once.
``Backbone`` below is this contract as a type.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Protocol, runtime_checkable

import torch
from torch import nn


@dataclass(frozen=True)
class LinearSite:
    path: str       # dotted module path inside the backbone
    modality: str
    depth: int
    role: str       # q, k, v, o (attention) or fc1, fc2 (FFN)


class PromptProvider(nn.Module):
    """Supplies extra tokens for layer ``depth``.

    ``forward(depth, states, previous)`` returns ``{modality: (B, P, D)}`` (modalities it leaves out get
    none). ``states`` are the layer inputs; ``previous`` holds the outputs at the prompt positions of
    layer ``depth - 1`` (empty at depth 0), so prompts can be computed from other modalities' prompt
    outputs (PMF's translated queries).
    """

    def forward(self, depth: int, states: dict[str, torch.Tensor],
                previous: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError


@runtime_checkable
class Backbone(Protocol):
    """The backbone contract of the module docstring, as a type: what every method relies on
    (the optional hooks are looked up with ``hasattr``). ``isinstance`` checks the names; the
    tests check every backbone's signatures and values against it."""

    modalities: tuple[str, ...]
    activation: str
    head: nn.Module

    @property
    def depth(self) -> int: ...

    def hidden_size(self, modality: str) -> int: ...

    def num_layers(self, modality: str) -> int: ...

    def seq_len(self, modality: str) -> int: ...

    def linear_sites(self) -> list[LinearSite]: ...

    def set_adapter(self, point: str, modality: str, depth: int, module: nn.Module) -> None: ...

    def set_prompts(self, provider: PromptProvider) -> None: ...

    def set_fusion_hook(self, depth: int, module: nn.Module) -> None: ...


class ConfigError(ValueError):
    """An invalid method configuration; the message names the field and the value."""


class UnknownName(ConfigError, KeyError):
    """An unknown method or variant name (a ``KeyError`` too: it is a failed look-up)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


@dataclass
class MethodConfig:
    """Base of every method's config dataclass."""

    def validate(self) -> None:
        """Intrinsic checks (ranks > 0, dropout in [0, 1), ...)."""

    def validate_for(self, backbone: nn.Module) -> None:
        """Checks that need the backbone (a down dimension larger than the hidden size, ...)."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def require(condition: bool, config: MethodConfig, field: str, rule: str) -> None:
    if not condition:
        value = getattr(config, field)
        raise ConfigError(f"{type(config).__name__}.{field} = {value!r} is invalid: expected {rule}")


def positive(config: MethodConfig, *fields: str) -> None:
    for field in fields:
        require(getattr(config, field) > 0, config, field, "an integer > 0")


def probability(config: MethodConfig, *fields: str) -> None:
    for field in fields:
        require(0.0 <= getattr(config, field) < 1.0, config, field, "a dropout rate in [0, 1)")


def at_most_hidden(config: MethodConfig, backbone: nn.Module, field: str) -> None:
    smallest = min(backbone.hidden_size(m) for m in backbone.modalities)
    require(getattr(config, field) <= smallest, config, field,
            f"at most the smallest hidden size of the backbone ({smallest})")


@dataclass(frozen=True)
class Variant:
    """One published reading of a method.

    ``defaults`` override the config dataclass defaults for this variant. ``flag`` is set where the
    variant knowingly reproduces a defect (the released Wander init): the gradient audit reports it
    instead of failing. ``starts_as_identity`` says whether the adapted model's initial output must
    equal the frozen backbone's (None: not meant to).
    """

    description: str
    starts_as_identity: bool | None = None
    defaults: dict = dataclasses.field(default_factory=dict)
    flag: str | None = None


@dataclass(frozen=True)
class MethodSpec:
    name: str
    config_class: type
    variants: dict[str, Variant]
    apply_fn: Callable[[nn.Module, MethodConfig], None]
    summary: str
    modalities: str = "any"

    def make_config(self, variant: str = "paper", **overrides) -> MethodConfig:
        known = {f.name for f in dataclasses.fields(self.config_class)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ConfigError(f"method {self.name!r} has no config field(s) {unknown}; "
                              f"known fields: {sorted(known)}")
        config = self.config_class(**{**self.variant(variant).defaults, **overrides})
        config.validate()
        return config

    def variant(self, name: str) -> Variant:
        if name not in self.variants:
            raise UnknownName(f"method {self.name!r} has no variant {name!r}; "
                           f"known variants: {sorted(self.variants)}")
        return self.variants[name]


def freeze(module: nn.Module) -> None:
    for parameter in module.parameters():
        parameter.requires_grad_(False)


def trainable_head(backbone: nn.Module) -> None:
    for parameter in backbone.head.parameters():
        parameter.requires_grad_(True)


RELEASED_WANDER_HEAD = "wander_released"


def use_head(backbone: nn.Module, name: str) -> bool:
    """Switch ``backbone`` to its alternative head ``name`` where it offers one (see the module
    docstring); returns whether it did. The new head is freshly initialised and trainable."""
    if name not in getattr(backbone, "head_options", ()):
        return False
    backbone.set_head(name)
    return True


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Trainable parameters split into method (adapters, prompts, ...) and task head.

    The paper tables' "#Tunable" is the sum (Wander, Table 1 caption). Shared tensors count once.
    """
    counts = {"method": 0, "head": 0}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            counts["head" if name.startswith("head.") else "method"] += parameter.numel()
    return counts
