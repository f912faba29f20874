"""Backbones implementing the method contract (``methods.base.Backbone``), built from a profile's
settings (params.yaml ``profiles.<profile>.<kind>``) and what the data loader found (dims, lengths,
classes). Pretrained towers named there (``image_model`` / ``text_model``: ``named_encoders``) are
loaded by ``harness.backbones.pretrained`` and fix the sizes of their tower (their config wins)."""
from __future__ import annotations

import dataclasses

from torch import nn

from harness.backbones.late_fusion import LateFusionBackbone, LateFusionConfig
from harness.backbones.mmt import MMTBackbone, MMTConfig, pretrained_text_config
from harness.backbones.pretrained import MINILM_NAME, LoadedEncoder, load_encoder
from harness.backbones.two_tower import PRESETS, TwoTowerBackbone, TwoTowerConfig, pretrained_sizes
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


def named_encoders(kind: str, settings: dict) -> dict[str, str]:
    """{"image": name, "text": name} of the pretrained encoders a backbone block names.

    two_tower: ``image_model``, ``text_model``; the older ``text_encoder: minilm`` (and the
    ``minilm`` preset) mean ``text_model: minilm``. mmt: ``text_model``."""
    settings = dict(settings or {})
    names: dict[str, str] = {}
    if kind == "two_tower":
        preset = PRESETS.get(settings.get("preset", "tiny"), {})
        merged = {**preset, **settings}
        if merged.get("image_model"):
            names["image"] = merged["image_model"]
        if merged.get("text_model"):
            names["text"] = merged["text_model"]
        elif merged.get("text_encoder") == MINILM_NAME:
            names["text"] = MINILM_NAME
    elif kind == "mmt" and settings.get("text_model"):
        names["text"] = settings["text_model"]
    return names


KEY_FIELD = {"image": "image_model", "text": "text_model"}


def load_named(kind: str, settings: dict, key_prefix: str,
               file: str | None = None) -> dict[str, LoadedEncoder]:
    """Load (memoised) the encoders of ``named_encoders(kind, settings)``; errors name
    ``<key_prefix>.image_model`` / ``.text_model``."""
    architecture = {"image": "vit", "text": "bert"}
    return {m: load_encoder(name, architecture[m], f"{key_prefix}.{KEY_FIELD[m]}", file)
            for m, name in named_encoders(kind, settings).items()}


def plan_encoders(kind: str, settings: dict, key_prefix: str,
                  file: str | None = None) -> dict | None:
    """Load and check the pretrained encoders a backbone block names; their identities
    ({modality: LoadedEncoder.identity()}) for the run key, or None when none is named.

    two_tower: the towers (pretrained or built from the block's sizes) must share one width
    (Wander, Aurora and UniAdapter fuse or share weights across both towers' token states) and
    one depth (they run in lock-step), and the block must make a valid ``TwoTowerConfig``."""
    loaded = load_named(kind, settings, key_prefix, file)
    if not loaded:
        return None
    if kind == "two_tower":
        block = dict(settings)
        preset = block.pop("preset", "tiny")
        block.update(pretrained_sizes(loaded))
        block.pop("num_classes", None)
        if "text" in loaded:
            block.update(text_model=loaded["text"].name, text_encoder="config")
        blame = f"{key_prefix}.{KEY_FIELD['text' if 'text' in loaded else 'image']}"
        names = {m: f"{e.name!r}" for m, e in loaded.items()}
        image = names.get("image", "the random ViT (image_hidden / image_layers)")
        text = names.get("text", "the random BERT (text_hidden / text_layers)")
        try:
            config = TwoTowerConfig.preset(preset, **block)
        except (KeyError, ValueError) as error:
            raise InputError(f"the pretrained tower does not fit the two-tower backbone: {error}",
                             file=file, key=blame, expected="towers of one depth (lock-step) and "
                             "sizes the two-tower config accepts",
                             found=f"image {image}, text {text}") from None
        if config.image_hidden != config.text_hidden:
            raise InputError("the two towers must share one width (Wander, Aurora and UniAdapter "
                             "act on both towers' token states with one width)", file=file,
                             key=blame, expected=f"text width = image width ({config.image_hidden}, "
                                                 f"{image})",
                             found=f"text width {config.text_hidden} ({text})")
        if config.image_layers != config.text_layers:  # pragma: no cover - validate() refuses it
            raise InputError("the towers run in lock-step and need one depth", file=file,
                             key=blame, expected=config.image_layers, found=config.text_layers)
    return {m: encoder.identity() for m, encoder in sorted(loaded.items())}
