"""Backbones implementing the method contract (methods/base.py), built from profile settings and
the dims the data loader found."""
from __future__ import annotations

from torch import nn

from harness.backbones.late_fusion import LateFusionBackbone, LateFusionConfig
from harness.errors import InputError


def build_backbone(kind: str, settings: dict, info: dict, output_dim: int) -> nn.Module:
    """``settings``: the profile's block for this backbone kind in params.yaml; ``info``: what the
    data loader reports (modalities, dims, lengths)."""
    if kind == "late_fusion":
        known = {"width", "depth", "heads", "attn_dropout", "relu_dropout", "embed_dropout",
                 "res_dropout", "out_dropout"}
        unknown = sorted(set(settings) - known)
        if unknown:
            raise InputError("unknown late_fusion setting", key=unknown[0],
                             expected=f"one of {sorted(known)}", found=unknown[0])
        dims = {m: info["dims"][m] for m in info["modalities"]}
        lengths = {m: info["lengths"][m] for m in info["modalities"]}
        return LateFusionBackbone(LateFusionConfig(input_dims=dims, seq_lens=lengths,
                                                   output_dim=output_dim, **settings))
    raise InputError("unknown backbone kind", key="backbone", expected="late_fusion", found=kind)
