"""Tests for methods.aurora (both variants) on the late-fusion backbone.

Parameter counts are written out from first principles (see each test), not read from the module.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import methods.aurora  # noqa: F401  (registers "aurora")
from harness.audit import audit_backbone, audit_one, random_batch
from helpers import sized_backbone
from methods import ConfigError, apply_method, count_parameters
from methods.aurora import AuroraLinear

VARIANTS = ("paper", "code")
AUDIT_OVERRIDES = {"rank": 4}  # width-32 audit backbone


def wrapped(backbone: nn.Module) -> list[AuroraLinear]:
    return [m for m in backbone.modules() if isinstance(m, AuroraLinear)]


def expected_count(variant: str, M: int, L: int, D: int, R: int, ffn_mult: int = 4,
                   text: bool = False) -> int:
    """``text``: one of the M modalities is named "text" (the code variant adapts it as the
    released BERT: q, k, v only)."""
    shared_uv = R * D + D * R                        # U (R x D) and V (D x R), one pair globally
    if variant == "paper":
        matrices = M * L * 3                         # q, k, v: one D x D matrix each
        return shared_uv + matrices * (R + R)        # per matrix: p_j (R) and lambda_j (R)
    # code, as the released ViT: q, k, v, o are one D x D block each; fc1 (D -> 4D) and
    # fc2 (4D -> D) are 4 blocks each; as the released BERT (the "text" modality): q, k, v
    vit_like = M - 1 if text else M
    matrices = vit_like * L * (4 + ffn_mult + ffn_mult) + (L * 3 if text else 0)
    return shared_uv + R ** 3 + matrices * R         # core C (R x R x R) and p_j (R) per block


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("n", (2, 3, 7))
def test_identity_at_init(variant, n):
    backbone = audit_backbone(n)
    frozen = copy.deepcopy(backbone).eval()
    apply_method(backbone, "aurora", variant, rank=4)
    backbone.eval()
    batch = random_batch(backbone)
    with torch.no_grad():
        assert torch.equal(backbone(batch), frozen(batch))
        for module in wrapped(backbone):
            assert not torch.any(module.delta_weight() != 0)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("n", (2, 3, 7))
@pytest.mark.parametrize("size", ("audit", "wide"))
def test_closed_form_count(variant, n, size):
    backbone, D, L = sized_backbone(size, n)
    R = 4 if size == "audit" else 8
    head = sum(p.numel() for p in backbone.head.parameters())
    apply_method(backbone, "aurora", variant, rank=R)
    counts = count_parameters(backbone)
    text = "text" in backbone.modalities  # audit backbones with 2 and 3 modalities have one
    assert counts["method"] == expected_count(variant, n, L, D, R, text=text)
    assert counts["head"] == head
    # worked example: width 32, depth 2, rank 4, three modalities (text, audio, vision):
    # code = U, V 256 + core 64 + (2 non-text x 2 layers x 12 blocks + 2 text layers x 3) x 4
    if size == "audit" and n == 3:
        assert counts["method"] == {"paper": 256 + 18 * 8, "code": 256 + 64 + 54 * 4}[variant]


@pytest.mark.parametrize("variant", VARIANTS)
def test_factors_shared_globally_and_targets(variant):
    backbone = audit_backbone(3)
    apply_method(backbone, "aurora", variant, rank=4)
    modules = wrapped(backbone)
    assert len({id(m.factors) for m in modules}) == 1
    roles = {path.rsplit(".", 1)[1] for path, m in backbone.named_modules() if isinstance(m, AuroraLinear)}
    assert roles == ({"q", "k", "v"} if variant == "paper" else {"q", "k", "v", "o", "fc1", "fc2"})
    # every site of those roles, of every modality and layer, is wrapped; code: the "text"
    # modality (released BERT) has q, k, v only
    text_roles = {path.rsplit(".", 1)[1] for path, m in backbone.named_modules()
                  if isinstance(m, AuroraLinear) and ".text." in f".{path}."}
    assert text_roles == {"q", "k", "v"}
    assert len(modules) == (3 * 2 * 3 if variant == "paper" else 2 * 2 * 6 + 2 * 3)
    trainable = {n for n, p in backbone.named_parameters() if p.requires_grad and not n.startswith("head.")}
    assert all("base" not in n for n in trainable)  # the adapted linears stay frozen


@pytest.mark.parametrize("variant", VARIANTS)
def test_one_step_makes_delta_nonzero_and_matches_explicit_update(variant):
    backbone = audit_backbone(3)
    apply_method(backbone, "aurora", variant, rank=4)
    backbone.eval()  # no dropout, deterministic
    batch = random_batch(backbone)
    target = torch.randn(4, 1)
    optimizer = torch.optim.SGD([p for p in backbone.parameters() if p.requires_grad], lr=0.1)
    nn.functional.mse_loss(backbone(batch), target).backward()
    optimizer.step()
    for module in wrapped(backbone):
        delta = module.delta_weight()
        assert torch.any(delta != 0)
        # the factored forward equals base + x Delta W^T
        x = torch.randn(5, module.base.in_features)
        torch.testing.assert_close(module(x), module.base(x) + x @ delta.T, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("n", (2, 3, 7))
def test_gradient_audit(variant, n):
    report = audit_one("aurora", variant, n, overrides=AUDIT_OVERRIDES)
    assert report["ok"], report
    assert report["dead_tensors"] == []
    assert report["identity_at_init"] is True


@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_backward_seven_modalities(variant):
    backbone = audit_backbone(7)
    apply_method(backbone, "aurora", variant, rank=4)
    backbone.train()
    batch = random_batch(backbone)
    out = backbone(batch)
    assert out.shape == (4, 1)
    out.pow(2).mean().backward()
    grads = [p.grad for p in backbone.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert wrapped(backbone)[0].factors.V.grad.abs().sum() > 0  # V (zero at init) is learning


@pytest.mark.parametrize("overrides, field", [
    ({"rank": 0}, "rank"),
    ({"rank": -3}, "rank"),
    ({"rank": 33}, "rank"),          # larger than the width 32
    ({"dropout": -0.1}, "dropout"),
    ({"dropout": 1.0}, "dropout"),
    ({"targets": ("q", "x")}, "targets"),
    ({"targets": ()}, "targets"),
    ({"form": "svd"}, "form"),
    ({"scale": 0.0}, "scale"),
])
def test_invalid_configs(overrides, field):
    with pytest.raises(ConfigError, match=rf"AuroraConfig\.{field} ="):
        apply_method(audit_backbone(2), "aurora", "paper", **{"rank": 4, **overrides})


def test_unknown_field_and_mixed_widths_refused():
    with pytest.raises(ConfigError, match="rnak"):
        apply_method(audit_backbone(2), "aurora", "paper", rnak=4)
    backbone = audit_backbone(2)
    backbone.hidden_size = lambda m: 32 if m == "text" else 48  # pretend the widths differ
    with pytest.raises(ConfigError, match="one width"):
        apply_method(backbone, "aurora", "code", rank=4)


def test_variant_defaults():
    from methods import get_method
    spec = get_method("aurora")
    paper, code = spec.make_config("paper"), spec.make_config("code")
    assert (paper.rank, paper.form, tuple(paper.targets), paper.dropout) == (64, "cp", ("q", "k", "v"), 0.0)
    assert (code.form, code.dropout, code.scale, code.layout) == ("tucker", 0.1, 1.0, "released")
    assert paper.layout == "block"
    assert set(code.targets) == {"q", "k", "v", "o", "fc1", "fc2"}
