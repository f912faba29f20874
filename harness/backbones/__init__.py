"""Backbones implementing the method contract (methods/base.py), built from a profile's settings
(params.yaml ``profiles.<profile>.<kind>``) and what the data loader found (dims, lengths, classes).
Pretrained towers named there (``image_model`` / ``text_model``) are loaded by
``harness.backbones.pretrained`` and fix the sizes of their tower (their config wins)."""
from __future__ import annotations

import dataclasses

from torch import nn

from harness.backbones.late_fusion import LateFusionBackbone, LateFusionConfig
from harness.backbones.mmt import MMTBackbone, MMTConfig, pretrained_text_config
from harness.backbones.pretrained import load_named
from harness.backbones.two_tower import TwoTowerBackbone, TwoTowerConfig, pretrained_sizes
from harness.errors import InputError

KINDS = ("late_fusion", "two_tower", "mmt")


def _check_keys(kind: str, settings: dict, allowed: set[str]) -> None:
    unknown = sorted(set(settings) - allowed)
    if unknown:
        raise InputError(f"unknown {kind} setting", key=f"profiles.*.{kind}.{unknown[0]}",
                         expected=f"one of {sorted(allowed)}", found=unknown[0])


def build_backbone(kind: str, settings: dict, info: dict, output_dim: int,
                   vocab_size: int | None = None, key_prefix: str | None = None,
                   file: str | None = None) -> nn.Module:
    """``settings``: the profile's block for ``kind``; ``info``: the loader's dataset info;
    ``vocab_size``: the word vocabulary's size (ignored where a pretrained text model is named:
    its tokenizer is used); ``key_prefix`` / ``file``: where ``settings`` came from, for error
    messages (default ``profiles.*.<kind>``)."""
    settings = dict(settings)
    key_prefix = key_prefix or f"profiles.*.{kind}"
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
        loaded = load_named(kind, {"preset": preset, **settings}, key_prefix, file)
        settings.update(pretrained_sizes(loaded))
        if vocab_size is not None and "text" not in loaded:
            settings.setdefault("vocab_size", vocab_size)
        if "text" in loaded:  # text_encoder: minilm is text_model: minilm
            settings.update(text_model=loaded["text"].name, text_encoder="config")
        return TwoTowerBackbone(TwoTowerConfig.preset(preset, num_classes=output_dim, **settings))
    if kind == "mmt":
        preset = settings.pop("preset", "tiny")
        _check_keys(kind, settings, {f.name for f in dataclasses.fields(MMTConfig)}
                    - {"experts", "expert_dims"})
        experts = tuple(info["experts"])
        factory = MMTConfig.paper if preset == "paper" else MMTConfig.tiny
        text = dict(factory().text)
        loaded = load_named(kind, settings, key_prefix, file)
        if "text" in loaded:
            text.update(pretrained_text_config(loaded["text"]))
        elif vocab_size is not None:
            text["vocab_size"] = vocab_size
        settings.setdefault("max_tokens", {e: info["max_tokens"] for e in experts})
        return MMTBackbone(factory(experts=experts, expert_dims=dict(info["dims"]),
                                   text={**text, **settings.pop("text", {})}, **settings))
    raise InputError("unknown backbone kind", key="backbone", expected=KINDS, found=kind)
