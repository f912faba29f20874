"""Builders shared by several test modules (pytest puts this folder on sys.path)."""
from pathlib import Path

import torch
import yaml

from harness.backbones.late_fusion import LateFusionBackbone, LateFusionConfig
from harness.data import generate

ROOT = Path(__file__).resolve().parent.parent


def sized_backbone(size: str, n: int) -> tuple[LateFusionBackbone, int, int]:
    """(backbone, width, depth) of the ``audit`` (32 x 2) or ``wide`` (40 x 3) size."""
    from harness.audit import audit_backbone

    return (audit_backbone(n), 32, 2) if size == "audit" else (wide_backbone(n), 40, 3)


def wide_backbone(n: int, seed: int = 1) -> LateFusionBackbone:
    """A second size next to the audit backbone: width 40, depth 3, ffn multiplier 4 (the
    late-fusion default), ``n`` modalities."""
    names = [f"m{i}" for i in range(n)]
    torch.manual_seed(seed)
    return LateFusionBackbone(LateFusionConfig(input_dims={m: 4 + i for i, m in enumerate(names)},
                                               seq_lens={m: 3 + i % 2 for i, m in enumerate(names)},
                                               width=40, depth=3, heads=4))


def small_mosi_params(folder: Path) -> dict:
    """params.yaml pointed at a small generated MOSI in ``folder`` (48/16/16 samples), one epoch
    of batch 16, no pre-trained checkpoint (pre-training has its own tests)."""
    generate("mosi", folder / "mosi", seed=0, n_train=48, n_valid=16, n_test=16)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"]["tiny"]["mosi"]["path"] = str(folder / "mosi")
    params["profiles"]["tiny"]["train"] = {"epochs": 1, "batch_size": 16}
    params["pretrain"]["use"] = {}
    return params
