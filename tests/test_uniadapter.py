"""Tests for methods.uniadapter (both variants) on the late-fusion backbone.

Parameter counts are written out from first principles (see each test), not read from the module.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
import torch.nn.functional as F

import methods.uniadapter  # noqa: F401  (registers "uniadapter")
from harness.audit import audit_backbone, audit_one, random_batch
from helpers import sized_backbone
from methods import ConfigError, apply_method, count_parameters
from methods.uniadapter import SharedDown, UniAdapterBranch

VARIANTS = ("paper", "code")
AUDIT_OVERRIDES = {"down_dim": 8}  # width-32 audit backbone


def branches(backbone: nn.Module) -> list[UniAdapterBranch]:
    return [m for m in backbone.modules() if isinstance(m, UniAdapterBranch)]


def expected_count(variant: str, M: int, L: int, D: int, r: int) -> int:
    if variant == "paper":
        down = D * r                   # ONE W_down (D x r) for every layer of every modality, no bias
        ups = M * L * (r * D)          # one W_up^m (r x D) per modality per layer, no bias
        return down + ups
    per_depth = 2 * D + (D * r + r)    # LayerNorm (gain, bias) + down (weight, bias), per layer depth
    ups = M * L * (r * D + D)          # one up (weight, bias) per modality per layer
    return L * per_depth + ups


@pytest.mark.parametrize("n", (2, 3, 7))
def test_paper_identity_at_init(n):
    backbone = audit_backbone(n)
    frozen = copy.deepcopy(backbone).eval()
    apply_method(backbone, "uniadapter", "paper", down_dim=8)
    backbone.eval()
    batch = random_batch(backbone)
    with torch.no_grad():
        assert torch.equal(backbone(batch), frozen(batch))


def test_code_is_not_identity_and_only_text_up_is_zero():
    backbone = audit_backbone(3)
    frozen = copy.deepcopy(backbone).eval()
    apply_method(backbone, "uniadapter", "code", down_dim=8)
    backbone.eval()
    batch = random_batch(backbone)
    with torch.no_grad():
        assert not torch.allclose(backbone(batch), frozen(batch), atol=1e-6, rtol=1e-5)
    for depth in range(2):
        text_ffn = backbone.encoders["text"][depth].ffn
        assert not torch.any(text_ffn.uniadapter.up.weight != 0)
        assert not torch.any(text_ffn.uniadapter.up.bias != 0)
        for m in ("audio", "vision"):
            assert torch.any(backbone.encoders[m][depth].ffn.uniadapter.up.weight != 0)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("n", (2, 3, 7))
@pytest.mark.parametrize("size", ("audit", "wide"))
def test_closed_form_count(variant, n, size):
    backbone, D, L = sized_backbone(size, n)
    r = 8 if size == "audit" else 16
    head = sum(p.numel() for p in backbone.head.parameters())
    apply_method(backbone, "uniadapter", variant, down_dim=r)
    counts = count_parameters(backbone)
    assert counts["method"] == expected_count(variant, n, L, D, r)
    assert counts["head"] == head
    if size == "audit" and n == 3:  # worked example: width 32, depth 2, r 8, three modalities
        assert counts["method"] == {"paper": 256 + 6 * 256, "code": 2 * 328 + 6 * 288}[variant]


def test_blip_base_count_by_shapes():
    """The released layout at BLIP-base size (D 768, 12 layers, r 128) with the three ups the code
    builds per layer (text, visual, multimodal) and the cross-modal LayerNorm: the paper's 4.8M."""
    D, L, r = 768, 12, 128
    assert expected_count("code", 3, L, D, r) + L * 2 * D == 4_784_640


@pytest.mark.parametrize("n", (2, 3, 7))
def test_paper_down_is_one_tensor_shared_by_all(n):
    backbone = audit_backbone(n)
    apply_method(backbone, "uniadapter", "paper", down_dim=8)
    found = branches(backbone)
    assert len(found) == n * 2
    assert len({id(b.down.proj.weight) for b in found}) == 1
    assert sum(isinstance(m, SharedDown) for m in backbone.modules()) == 1  # modules() dedups
    assert len({id(b.up.weight) for b in found}) == n * 2  # one up per modality per layer


@pytest.mark.parametrize("n", (2, 3, 7))
def test_code_down_is_shared_per_layer_depth(n):
    backbone = audit_backbone(n)
    apply_method(backbone, "uniadapter", "code", down_dim=8)
    for depth in range(2):
        downs = {id(backbone.encoders[m][depth].ffn.uniadapter.down) for m in backbone.modalities}
        assert len(downs) == 1  # layer i of every modality shares one down (and its LayerNorm)
    assert backbone.encoders["s3d" if n == 7 else "text"][0].ffn.uniadapter.down is not \
        backbone.encoders["s3d" if n == 7 else "text"][1].ffn.uniadapter.down
    assert sum(isinstance(m, SharedDown) for m in backbone.modules()) == 2


@pytest.mark.parametrize("variant", VARIANTS)
def test_parallel_placement_formula_and_sites_intact(variant):
    backbone = audit_backbone(2)
    apply_method(backbone, "uniadapter", variant, down_dim=8)
    backbone.eval()
    for site in backbone.linear_sites():  # the FFN linears keep their paths
        assert isinstance(backbone.get_submodule(site.path), nn.Linear)
    ffn = backbone.encoders["vision"][1].ffn
    adapter = ffn.uniadapter
    with torch.no_grad():
        adapter.up.weight.normal_()  # make the adapter visible
        y = torch.randn(3, 5, 32)
        base = ffn.fc2(F.relu(ffn.fc1(y)))
        x = adapter.down.norm(y) if variant == "code" else y
        expected = base + 0.1 * adapter.up(F.relu(adapter.down.proj(x)))
        torch.testing.assert_close(ffn(y), expected)


@pytest.mark.parametrize("placement", ("attn", "ffn"))
def test_sequential_placements(placement):
    backbone = audit_backbone(3)
    frozen = copy.deepcopy(backbone).eval()
    apply_method(backbone, "uniadapter", "paper", down_dim=8, placement=placement)
    backbone.eval()
    batch = random_batch(backbone)
    with torch.no_grad():
        assert torch.equal(backbone(batch), frozen(batch))
    layer = backbone.encoders["audio"][0]
    assert isinstance(getattr(layer, f"{placement}_adapter"), UniAdapterBranch)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("n", (2, 3, 7))
def test_gradient_audit(variant, n):
    report = audit_one("uniadapter", variant, n, overrides=AUDIT_OVERRIDES)
    assert report["ok"], report
    assert report["dead_tensors"] == []
    assert report["identity_at_init"] is (variant == "paper")


@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_backward_seven_modalities(variant):
    backbone = audit_backbone(7)
    apply_method(backbone, "uniadapter", variant, down_dim=8)
    backbone.train()
    out = backbone(random_batch(backbone))
    assert out.shape == (4, 1)
    out.pow(2).mean().backward()
    grads = {n: p.grad for n, p in backbone.named_parameters() if p.requires_grad}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert all(g.abs().sum() > 0 for n, g in grads.items() if ".up." in n)


@pytest.mark.parametrize("overrides, field", [
    ({"down_dim": 0}, "down_dim"),
    ({"down_dim": -8}, "down_dim"),
    ({"down_dim": 33}, "down_dim"),   # larger than the width 32
    ({"dropout": -0.1}, "dropout"),
    ({"scale": -0.1}, "scale"),
    ({"placement": "prefix"}, "placement"),
    ({"share_down": "modality"}, "share_down"),
])
def test_invalid_configs(overrides, field):
    with pytest.raises(ConfigError, match=rf"UniAdapterConfig\.{field} ="):
        apply_method(audit_backbone(2), "uniadapter", "code", **{"down_dim": 8, **overrides})


def test_mixed_widths_refused():
    backbone = audit_backbone(2)
    backbone.hidden_size = lambda m: 32 if m == "text" else 48
    with pytest.raises(ConfigError, match="one width"):
        apply_method(backbone, "uniadapter", "paper", down_dim=8)


def test_variant_defaults():
    from methods import get_method
    spec = get_method("uniadapter")
    paper, code = spec.make_config("paper"), spec.make_config("code")
    assert (paper.down_dim, paper.scale, paper.share_down, paper.zero_up) == (128, 0.1, "global", "all")
    assert (code.share_down, code.layer_norm, code.down_init, code.zero_up, code.activation) == \
        ("layer", True, "kaiming_uniform", "text", "relu")
    assert (code.up_std, code.train_cross_norm, paper.up_std, paper.train_cross_norm) == \
        (0.02, False, None, True)


def test_code_zeroes_the_up_of_the_modality_named_text_only():
    """By name, not position: with no modality called "text" no up is zeroed; the other ups are
    N(0, 0.02) with zero bias (the released init), and the cross-modal LayerNorm is frozen."""
    from methods.uniadapter import CrossModalUniAdapter, make_up

    backbone = audit_backbone(7)  # s3d, vggish, ...: no "text"
    apply_method(backbone, "uniadapter", "code", down_dim=8)
    for m in backbone.modalities:
        up = backbone.encoders[m][0].ffn.uniadapter.up
        assert torch.any(up.weight != 0) and not torch.any(up.bias != 0)
    spec_config = __import__("methods").get_method("uniadapter").make_config("code", down_dim=8)
    text = UniAdapterBranch(SharedDown(32, spec_config), make_up(32, spec_config, True), spec_config)
    cross = CrossModalUniAdapter(text, make_up(32, spec_config, False), 32, spec_config)
    assert not any(p.requires_grad for p in cross.norm.parameters())
    assert cross.fusion_up.weight.requires_grad
