"""The method registry: ``@register`` adds a method; ``apply_method`` attaches one to a backbone."""
from __future__ import annotations

from typing import Callable

from torch import nn

from methods.base import (ConfigError, MethodConfig, MethodSpec, UnknownName, Variant, freeze,
                          trainable_head)

_REGISTRY: dict[str, MethodSpec] = {}


def register(name: str, *, config: type, variants: dict[str, Variant], summary: str,
             modalities: str = "any") -> Callable:
    """Decorator for ``apply(backbone, config) -> None`` (the variant is in the config: its
    ``Variant.defaults``).

    ``apply`` receives a fully frozen backbone, adds its modules (their parameters trainable) and
    may unfreeze backbone parameters it trains; the head is made trainable afterwards.
    """

    def decorate(apply_fn: Callable) -> Callable:
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} registered twice")
        _REGISTRY[name] = MethodSpec(name, config, variants, apply_fn, summary, modalities)
        return apply_fn

    return decorate


def method_names() -> list[str]:
    return sorted(_REGISTRY)


def get_method(name: str) -> MethodSpec:
    if name not in _REGISTRY:
        raise UnknownName(f"unknown method {name!r}; known methods: {method_names()}")
    return _REGISTRY[name]


def apply_method(backbone: nn.Module, name: str, variant: str = "paper",
                 **overrides) -> MethodConfig:
    """Freeze ``backbone``, attach method ``name`` (``variant``, config ``overrides``) and return the
    resolved config. Raises UnknownName (a ConfigError and a KeyError) for unknown names,
    ConfigError for invalid configs."""
    spec = get_method(name)
    config = spec.make_config(variant, **overrides)
    config.validate_for(backbone)
    freeze(backbone)
    spec.apply_fn(backbone, config)
    trainable_head(backbone)
    return config


__all__ = ["register", "method_names", "get_method", "apply_method", "ConfigError", "UnknownName"]
