"""Gradient-health and identity-at-init audit of every method x variant (contract: methods.base).

A trainable tensor is *dead* when its gradient is exactly zero at the initial state AND still zero
after one SGD step on every trainable tensor. Zero-initialised up-projections (LoRA's B, adapters'
up, Aurora's V) give their partner factor a zero gradient at step 0 only; that is not dead, and is
listed in ``zero_grad_at_init`` for information. The released Wander init stays at zero forever.
Identity at init compares with the frozen backbone under the same head: where a method switches the
backbone to an alternative head (``use_head``), the frozen copy gets that head with the same weights.

Batch dependence: every audited model is also run on each sample of the batch alone (eval mode);
``batch_dependence`` is the largest |output in the batch - output alone|. A model whose backbone
declares ``mixes_batch`` (the released Wander Food-101 model: its fusion transformer attends across
the samples of a batch) is expected to depend on its batch (``batch_mixing_expected``: reported, not
a failure); for every other model a dependence above ``BATCH_ATOL`` fails the audit.

Backbones: the small late-fusion backbone with 2, 3 and 7 modalities for every method
(``audit_one``), and the tiny two-tower backbone for the methods in ``TWO_TOWER_AUDITS``
(``audit_two_tower``: Wander, whose ``code`` variant switches that backbone to the released head).
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from tqdm import tqdm

from harness.backbones.late_fusion import LateFusionBackbone, LateFusionConfig
from methods import apply_method, count_parameters, get_method, method_names

MODALITY_NAMES = {2: ("text", "vision"), 3: ("text", "audio", "vision"),
                  7: ("s3d", "vggish", "face", "rgb", "speech", "ocr", "scene")}
AUDIT_MODALITIES = (2, 3, 7)
# Sizes that fit the small audit backbone (width 32, 5-7 tokens per modality); everything else
# keeps the method's defaults.
AUDIT_OVERRIDES: dict[str, dict] = {
    "wander": {"down_dim": 8},
    "lora": {"rank": 4},
    "adapter": {"down_dim": 8},
    "aurora": {"rank": 4},
    "uniadapter": {"down_dim": 8},
    "pmf": {"translator_hidden": 16},
}


# Methods also audited on the tiny two-tower backbone, with sizes that fit it (width 64, 17 + 16
# tokens): Wander's code variant runs the released Food-101 model there (batch-mixing fusion).
TWO_TOWER_AUDITS: dict[str, dict] = {"wander": {"down_dim": 8}}
BATCH_ATOL = 1e-5  # float32: a batch-independent model agrees with its one-sample runs far closer


def audit_backbone(n_modalities: int, seed: int = 0) -> LateFusionBackbone:
    """A small late-fusion backbone with ``n_modalities`` modalities of different input dims."""
    names = MODALITY_NAMES.get(n_modalities) or tuple(f"m{i}" for i in range(n_modalities))
    torch.manual_seed(seed)
    config = LateFusionConfig(input_dims={m: 6 + 3 * i for i, m in enumerate(names)},
                              seq_lens={m: 5 + i % 3 for i, m in enumerate(names)},
                              width=32, depth=2, heads=4)
    return LateFusionBackbone(config)


def random_batch(backbone: LateFusionBackbone, batch_size: int = 4, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {m: torch.randn(batch_size, backbone.config.seq_lens[m], d, generator=generator)
            for m, d in backbone.config.input_dims.items()}


def _zero_grad_names(model: nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters()
            if p.requires_grad and (p.grad is None or not torch.any(p.grad != 0))}


def audit_one(method: str, variant: str, n_modalities: int, seed: int = 0,
              overrides: dict | None = None) -> dict:
    """The audit of ``method`` / ``variant`` on the small late-fusion backbone."""
    backbone = audit_backbone(n_modalities, seed)
    if overrides is None:
        overrides = AUDIT_OVERRIDES.get(method, {})
    report = audit_model(backbone, random_batch(backbone, seed=seed), method, variant, overrides)
    return {"method": method, "variant": variant, "modalities": n_modalities,
            "backbone": "late_fusion", **report}


def audit_two_tower(method: str, variant: str, seed: int = 0, overrides: dict | None = None) -> dict:
    """The audit of ``method`` / ``variant`` on the tiny two-tower backbone (4 samples)."""
    from harness.backbones.two_tower import TwoTowerBackbone, TwoTowerConfig

    torch.manual_seed(seed)
    backbone = TwoTowerBackbone(TwoTowerConfig.tiny())
    if overrides is None:
        overrides = TWO_TOWER_AUDITS.get(method, {})
    report = audit_model(backbone, backbone.example_batch(4, seed=seed), method, variant, overrides)
    return {"method": method, "variant": variant, "modalities": len(backbone.modalities),
            "backbone": "two_tower", **report}


def batch_dependence(model: nn.Module, batch: dict) -> float | None:
    """max |model(batch)[i] - model(sample i alone)| over the samples (eval mode, no grad); None
    where the output is not one row per sample (retrieval similarity matrices)."""
    with torch.no_grad():
        batched = model(batch)
        if not isinstance(batched, torch.Tensor) or batched.dim() == 0:
            return None
        size = batched.shape[0]
        worst = 0.0
        for i in range(size):
            alone = model({k: v[i:i + 1] if isinstance(v, torch.Tensor) and v.dim() > 0
                           and v.shape[0] == size else v for k, v in batch.items()})
            if not isinstance(alone, torch.Tensor) or alone.shape != batched[i:i + 1].shape:
                return None
            worst = max(worst, (alone - batched[i:i + 1]).abs().max().item())
    return worst


def audit_model(backbone: nn.Module, batch: dict, method: str, variant: str, overrides: dict) -> dict:
    """Attach ``method`` to ``backbone`` (any backbone of the method contract), then check identity
    at init (where the variant declares it) and dead tensors over one SGD step on ``batch``."""
    spec = get_method(method).variant(variant)
    frozen = copy.deepcopy(backbone).eval()
    apply_method(backbone, method, variant, **overrides)
    choice = getattr(backbone, "head_choice", "default")
    if choice != "default":  # the method chose another head: compare under that same head
        frozen.set_head(choice)
        frozen.head.load_state_dict(backbone.head.state_dict())
        frozen.eval()
    backbone.eval()  # no dropout: the identity comparison must be exact
    identity = None
    if spec.starts_as_identity is not None:
        with torch.no_grad():
            identity = torch.allclose(backbone(batch), frozen(batch), atol=1e-6, rtol=1e-5)

    dependence = batch_dependence(backbone, batch)
    mixing_expected = bool(getattr(backbone, "mixes_batch", None))
    target = torch.randn_like(frozen(batch))
    trainable = [p for p in backbone.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.1)

    def backward() -> set[str]:
        optimizer.zero_grad(set_to_none=True)
        nn.functional.mse_loss(backbone(batch), target).backward()
        return _zero_grad_names(backbone)

    zero_at_init = backward()
    optimizer.step()
    dead = sorted(zero_at_init & backward())
    counts = count_parameters(backbone)
    batch_ok = dependence is None or mixing_expected or dependence <= BATCH_ATOL
    ok = batch_ok and (spec.flag is not None or (not dead and (spec.starts_as_identity is None
                                                               or identity == spec.starts_as_identity)))
    return {"trainable_method": counts["method"], "trainable_head": counts["head"],
            "dead_tensors": dead, "zero_grad_at_init": sorted(zero_at_init),
            "identity_at_init": identity, "identity_expected": spec.starts_as_identity,
            "batch_dependence": dependence, "batch_mixing_expected": mixing_expected,
            "flag": spec.flag, "ok": ok}


def audit_grads(methods: list[str] | None = None, modalities=AUDIT_MODALITIES) -> list[dict]:
    names = methods or method_names()
    jobs = [(audit_one, (m, v, n)) for m in names for v in get_method(m).variants for n in modalities]
    jobs += [(audit_two_tower, (m, v)) for m in names if m in TWO_TOWER_AUDITS
             for v in get_method(m).variants]
    return [run(*args) for run, args in tqdm(jobs, desc="audit grads", unit="check")]
