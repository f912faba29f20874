"""Backbones implementing the method contract (methods/base.py), built from a profile's settings
(params.yaml ``profiles.<profile>.<kind>``) and what the data loader found (dims, lengths, classes)."""
from __future__ import annotations

import dataclasses

from torch import nn

from harness.backbones.late_fusion import LateFusionBackbone, LateFusionConfig
from harness.backbones.mmt import MMTBackbone, MMTConfig
from harness.backbones.two_tower import TwoTowerBackbone, TwoTowerConfig
from harness.errors import InputError

KINDS = ("late_fusion", "two_tower", "mmt")


def _check_keys(kind: str, settings: dict, allowed: set[str]) -> None:
    unknown = sorted(set(settings) - allowed)
    if unknown:
        raise InputError(f"unknown {kind} setting", key=f"profiles.*.{kind}.{unknown[0]}",
                         expected=f"one of {sorted(allowed)}", found=unknown[0])


def build_backbone(kind: str, settings: dict, info: dict, output_dim: int,
                   vocab_size: int | None = None) -> nn.Module:
    """``settings``: the profile's block for ``kind``; ``info``: the loader's dataset info."""
    settings = dict(settings)
    if kind == "late_fusion":
        fixed = {"input_dims", "seq_lens", "output_dim"}
        _check_keys(kind, settings, {f.name for f in dataclasses.fields(LateFusionConfig)} - fixed)
        return LateFusionBackbone(LateFusionConfig(
            input_dims={m: info["dims"][m] for m in info["modalities"]},
            seq_lens={m: info["lengths"][m] for m in info["modalities"]},
            output_dim=output_dim, **settings))
    if kind == "two_tower":
        preset = settings.pop("preset", "tiny")
        _check_keys(kind, settings, {f.name for f in dataclasses.fields(TwoTowerConfig)} - {"num_classes"})
        if vocab_size is not None and settings.get("text_encoder", "config") == "config":
            settings.setdefault("vocab_size", vocab_size)
        return TwoTowerBackbone(TwoTowerConfig.preset(preset, num_classes=output_dim, **settings))
    if kind == "mmt":
        preset = settings.pop("preset", "tiny")
        _check_keys(kind, settings, {f.name for f in dataclasses.fields(MMTConfig)}
                    - {"experts", "expert_dims"})
        experts = tuple(info["experts"])
        factory = MMTConfig.paper if preset == "paper" else MMTConfig.tiny
        text = dict(factory().text)
        if vocab_size is not None:
            text["vocab_size"] = vocab_size
        settings.setdefault("max_tokens", {e: info["max_tokens"] for e in experts})
        return MMTBackbone(factory(experts=experts, expert_dims=dict(info["dims"]),
                                   text={**text, **settings.pop("text", {})}, **settings))
    raise InputError("unknown backbone kind", key="backbone", expected=KINDS, found=kind)
