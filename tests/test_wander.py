"""Wander against the paper: Eq. 13 is an identity, the forms agree, the released init is dead."""

import pytest
import torch

from harness.audit import audit_backbone, audit_one, random_batch
from methods import ConfigError, apply_method, count_parameters
from methods.wander import Wander, WanderConfig

D, d = 6, 3


def make(form, lengths, rank_mode="cp", seed=0, width_in=None, fused_length=4):
    torch.manual_seed(seed)
    dims = {f"m{i}": width_in or 4 + i for i in range(len(lengths))}
    config = WanderConfig(down_dim=d, rank_h=3, rank_t=2, form=form, rank_mode=rank_mode,
                          fused_length=fused_length)
    config.validate()
    module = Wander(dims, dict(zip(dims, lengths)), D, config, "gelu").double()
    return module, dims


def inputs(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, l, d, generator=g, dtype=torch.float64) for l in lengths]


def outer_weights(factors_t, factors_h):
    """Full W_t (d_t, l_1..l_M) and W_h (d..d, D) from per-modality matrices, written out with
    explicit outer products: W_t[t, i1..iM] = prod_m A_m[t, i_m]; W_h[j1..jM, h] = prod_m B_m[h, j_m]."""
    M = len(factors_t)
    W_t = factors_t[0]
    for A in factors_t[1:]:
        W_t = W_t.unsqueeze(-1) * A.view(A.shape[0], *([1] * (W_t.dim() - 1)), A.shape[1])
    W_h = factors_h[0].T  # (d, D)
    for B in factors_h[1:]:
        W_h = W_h.unsqueeze(-2) * B.T.view(*([1] * (W_h.dim() - 1)), B.shape[1], B.shape[0])
    assert W_t.dim() == M + 1 and W_h.dim() == M + 1
    return W_t, W_h


def relative_error(a, b):
    return ((a - b).norm() / b.norm()).item()


def outer_product_error(model, op, W_t, W_h, lengths):
    """Relative error between ``model``'s fusion and SF-OP ``op`` set to the weights W_t, W_h."""
    with torch.no_grad():
        op.W_t.copy_(W_t)
        op.W_h.copy_(W_h)
    xs = inputs(lengths)
    return relative_error(model.fuse(xs), op.fuse(xs))


@pytest.mark.parametrize("lengths", [(3, 4), (2, 3, 4)])
def test_eq13_sf_equals_outer_product_form(lengths):
    sf, dims = make("sf", lengths)
    op, _ = make("sf_op", lengths)
    names = list(dims)
    # SF sums the ranks inside the product, so its W_t, W_h are outer products of the summed factors.
    W_t, W_h = outer_weights([sf.w_t[m].sum(0) for m in names], [sf.w_h[m].sum(0) for m in names])
    assert outer_product_error(sf, op, W_t, W_h, lengths) < 1e-6


@pytest.mark.parametrize("lengths", [(3, 4), (2, 3, 4)])
def test_lmf_mode_equals_outer_product_of_true_cp_tensors(lengths):
    lmf, dims = make("sf", lengths, rank_mode="lmf")
    op, _ = make("sf_op", lengths)
    names = list(dims)
    W_t = sum(outer_weights([lmf.w_t[m][r] for m in names], [lmf.w_h[m][0] for m in names])[0]
              for r in range(2))
    W_h = sum(outer_weights([lmf.w_t[m][0] for m in names], [lmf.w_h[m][r] for m in names])[1]
              for r in range(3))
    assert outer_product_error(lmf, op, W_t, W_h, lengths) < 1e-6


@pytest.mark.parametrize("lengths", [(3, 4), (2, 3, 4)])
def test_sf_vf_agrees_with_sf(lengths):
    sf, dims = make("sf", lengths)
    vf, _ = make("sf_vf", lengths)
    names = list(dims)
    with torch.no_grad():
        for m in names:
            vf.w_h[m].copy_(sf.w_h[m])
        vf.W_t.copy_(outer_weights([sf.w_t[m].sum(0) for m in names],
                                   [sf.w_h[m].sum(0) for m in names])[0])
    xs = inputs(lengths)
    assert relative_error(sf.fuse(xs), vf.fuse(xs)) < 1e-6


@pytest.mark.parametrize("lengths", [(1, 1), (1, 1, 1)])
def test_sf_equals_vf_for_length_one(lengths):
    sf, _ = make("sf", lengths, width_in=D, fused_length=1)
    vf, _ = make("vf", lengths, width_in=D, fused_length=1)
    vf.load_state_dict(sf.state_dict())
    states = {m: torch.randn(2, 1, D, dtype=torch.float64) for m in sf.modalities}
    out_sf, out_vf = sf(states), vf(states)
    for m in states:
        assert torch.allclose(out_sf[m], out_vf[m], rtol=1e-12)


def test_fusion_is_multiplicative_across_modalities():
    """Scaling one modality's features by s scales the (nonlinearity-free) fusion by s."""
    sf, _ = make("sf", (3, 4))
    xs = inputs((3, 4))
    assert torch.allclose(sf.fuse([2.5 * xs[0], xs[1]]), 2.5 * sf.fuse(xs))


def test_sum_over_ranks_inside_product_changes_only_count():
    """cp mode: replacing the R_t factors by one factor equal to their sum leaves the output unchanged."""
    sf, dims = make("sf", (3, 4))
    single = Wander(dims, dict(zip(dims, (3, 4))), D,
                    WanderConfig(down_dim=d, rank_h=1, rank_t=1, fused_length=4), "gelu").double()
    with torch.no_grad():
        for m in dims:
            single.w_t[m].copy_(sf.w_t[m].sum(0, keepdim=True))
            single.w_h[m].copy_(sf.w_h[m].sum(0, keepdim=True))
    xs = inputs((3, 4))
    assert relative_error(single.fuse(xs), sf.fuse(xs)) < 1e-12


@pytest.mark.parametrize("n", [2, 3, 7])
def test_trainable_count_closed_form(n):
    backbone = audit_backbone(n)
    dk, R_h, R_t = 8, 8, 8
    apply_method(backbone, "wander", "paper", down_dim=dk)
    width = backbone.config.width
    lengths = backbone.config.seq_lens.values()
    # per modality: Down (width*d + d) + w_h (R_h*width*d) + w_t (R_t*d_t*l_m), with d_t = d
    expected = sum(width * dk + dk + R_h * width * dk + R_t * dk * l for l in lengths)
    assert count_parameters(backbone)["method"] == expected


@pytest.mark.parametrize("n", [2, 3, 7])
def test_released_init_is_dead_and_flagged(n):
    row = audit_one("wander", "code", n)
    wander_tensors = {name for name in row["zero_grad_at_init"] if name.startswith("fusion_hooks.")}
    assert row["flag"] and row["ok"]
    assert set(row["dead_tensors"]) == wander_tensors
    assert len(wander_tensors) == 4 * n  # down weight+bias, w_h, w_t per modality
    assert row["identity_at_init"] is True


@pytest.mark.parametrize("n", [2, 3, 7])
def test_paper_variant_trains_every_tensor(n):
    row = audit_one("wander", "paper", n)
    assert row["flag"] is None and row["ok"]
    assert row["dead_tensors"] == [] and row["zero_grad_at_init"] == []


@pytest.mark.parametrize("form", ["sf", "sf_op", "sf_vf", "vf"])
def test_every_form_and_option_runs_on_three_modalities(form):
    for options in ({}, {"nonlinearity": False}, {"residual": False}, {"insert": "every"}):
        backbone = audit_backbone(3)
        apply_method(backbone, "wander", "paper", down_dim=4, form=form, **options)
        batch = {m: torch.randn(2, backbone.config.seq_lens[m], dim)
                 for m, dim in backbone.config.input_dims.items()}
        backbone(batch).sum().backward()
        assert all(p.grad is not None for p in backbone.parameters() if p.requires_grad)


@pytest.mark.parametrize("overrides, field", [
    ({"rank_h": 0}, "rank_h"), ({"rank_t": -2}, "rank_t"), ({"down_dim": 0}, "down_dim"),
    ({"form": "tucker"}, "form"), ({"rank_mode": "lmf", "form": "sf_op"}, "rank_mode"),
    ({"insert": "middle"}, "insert"),
])
def test_invalid_config_names_field_and_value(overrides, field):
    with pytest.raises(ConfigError, match=rf"{field} = {overrides[field]!r}"):
        apply_method(audit_backbone(2), "wander", "paper", **overrides)


@pytest.mark.parametrize("variant", ["paper", "code"])
def test_down_dim_larger_than_hidden_is_accepted(variant):
    backbone = audit_backbone(2)  # width 32, 5 + 6 tokens
    apply_method(backbone, "wander", variant, down_dim=64, fused_length=8)
    hook = backbone.fusion_hooks[str(backbone.depth - 1)]
    assert hook.down["text"].out_features == 64 > backbone.config.width
    backbone(random_batch(backbone)).sum().backward()


def test_fused_length_beyond_the_tokens_is_refused():
    # d_t defaults to d: 64 fused tokens cannot be added to 5 + 6 tokens
    with pytest.raises(ConfigError, match=r"fused_length = None .*total number of tokens \(11\)"):
        apply_method(audit_backbone(2), "wander", "paper", down_dim=64)


def test_sf_op_at_full_size_is_refused_with_the_needed_size():
    backbone = audit_backbone(7)
    with pytest.raises(ConfigError, match="only feasible at reduced dimensions"):
        apply_method(backbone, "wander", "paper", down_dim=16, form="sf_op")


def test_vf_fuses_only_the_first_token():
    """VF on long sequences equals SF on the sequences cut to their first (CLS) token."""
    sf, _ = make("sf", (1, 1), width_in=D, fused_length=1)
    vf, _ = make("vf", (5, 7), width_in=D, fused_length=1)
    vf.load_state_dict(sf.state_dict())
    g = torch.Generator().manual_seed(3)
    long = {m: torch.randn(2, l, D, generator=g, dtype=torch.float64) for m, l in zip(vf.modalities, (5, 7))}
    first = {m: x[:, :1] for m, x in long.items()}
    fused_vf = vf(long)[vf.modalities[0]][:, 0] - long[vf.modalities[0]][:, 0]
    fused_sf = sf(first)[sf.modalities[0]][:, 0] - first[sf.modalities[0]][:, 0]
    assert torch.allclose(fused_vf, fused_sf, rtol=1e-12)
