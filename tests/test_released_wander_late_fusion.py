"""The Wander ``code`` variant on the late-fusion backbone against the released model.

``released_forward`` below is an independent statement of the released model's forward pass,
written from reading HalfMoon1008/WANDER (models/model.py ``Latefusion.get_emb`` / ``get_res`` and
``AdapterModel.forward``, models/transformer.py ``TransformerEncoder`` / ``TransformerEncoderLayer``,
models/multihead_attention.py, models/position_embedding.py, models/adapter.py): it works on a
dict of tensors with the released parameter names and the released (T, B, D) layout, and calls
none of our modules. Our model's parameters are copied into it by name (``ours_to_released``, the
inverse mapping written out here), and output and gradients must agree to 1e-10 in float64.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from harness.backbones.late_fusion import (PAPER_MOSI, LateFusionBackbone, LateFusionConfig,
                                           released_to_ours)
from methods import apply_method, count_parameters
from methods.base import RELEASED_WANDER_HEAD

TOL = 1e-10


# --- the released model, restated ---------------------------------------------------------------
def released_position_table(rows: int, width: int) -> torch.Tensor:
    """fairseq ``get_embedding(rows, width, padding_idx=0)``, float32 as released."""
    half = width // 2
    step = math.log(10000) / (half - 1)
    freqs = torch.exp(torch.arange(half, dtype=torch.float) * -step)
    angles = torch.arange(rows, dtype=torch.float).unsqueeze(1) * freqs.unsqueeze(0)
    table = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1).view(rows, -1)
    if width % 2 == 1:
        table = torch.cat([table, torch.zeros(rows, 1)], dim=1)
    table[0, :] = 0
    return table


def released_positions(tokens: torch.Tensor, width: int) -> torch.Tensor:
    """``SinusoidalPositionalEmbedding.forward`` on ``tokens`` (B, T): padding_idx 0, right pad."""
    bsz, seq_len = tokens.shape
    table = released_position_table(seq_len + 1, width).to(tokens.dtype)
    numbers = torch.arange(1, seq_len + 1).expand(bsz, seq_len)
    not_pad = tokens.ne(0)
    positions = torch.zeros(bsz, seq_len, dtype=torch.long)
    positions[not_pad] = numbers[not_pad]
    return table.index_select(0, positions.reshape(-1)).view(bsz, seq_len, -1)


def layer_norm(p, name, x):
    return F.layer_norm(x, x.shape[-1:], p[f"{name}.weight"], p[f"{name}.bias"])


def linear(p, name, x):
    return F.linear(x, p[f"{name}.weight"], p[f"{name}.bias"])


def self_attention(p, name, x, heads):
    """fairseq MultiheadAttention, query = key = value = x (T, B, D), no mask, eval mode."""
    tgt_len, bsz, dim = x.shape
    head_dim = dim // heads
    q, k, v = F.linear(x, p[f"{name}.in_proj_weight"], p[f"{name}.in_proj_bias"]).chunk(3, dim=-1)
    q = q * head_dim ** -0.5
    q, k, v = (t.contiguous().view(tgt_len, bsz * heads, head_dim).transpose(0, 1) for t in (q, k, v))
    weights = torch.softmax(torch.bmm(q, k.transpose(1, 2)), dim=-1)
    attn = torch.bmm(weights, v).transpose(0, 1).contiguous().view(tgt_len, bsz, dim)
    return linear(p, f"{name}.out_proj", attn)


def encoder(p, i, x_in, layers, heads):
    """TransformerEncoder i on x_in (T, B, D): scale, positions, pre-LN layers, final LayerNorm."""
    width = x_in.shape[-1]
    x = math.sqrt(width) * x_in
    x = x + released_positions(x_in.transpose(0, 1)[:, :, 0], width).transpose(0, 1)
    for j in range(layers):
        name = f"encoders.{i}.layers.{j}"
        residual = x
        x = residual + self_attention(p, f"{name}.self_attn", layer_norm(p, f"{name}.layer_norms.0", x), heads)
        residual = x
        x = layer_norm(p, f"{name}.layer_norms.1", x)
        x = linear(p, f"{name}.fc2", F.relu(linear(p, f"{name}.fc1", x)))
        x = residual + x
    return layer_norm(p, f"encoders.{i}.layer_norm", x)


def released_forward(p, inputs, layers, heads):
    """``AdapterModel.forward``: inputs is the released list [text, audio, vision, ...] of (B, T, d)."""
    n_mod = len(inputs)
    hs = []
    for i, x in enumerate(inputs):  # Latefusion.get_emb
        x = F.conv1d(x.transpose(1, 2), p[f"proj.{i}.weight"], p[f"proj.{i}.bias"])
        hs.append(encoder(p, i, x.permute(2, 0, 1), layers, heads).permute(1, 0, 2))
    original = torch.cat(hs, dim=1)  # Adapter.forward
    fusion = None
    for i, h in enumerate(hs):
        x = F.gelu(linear(p, f"adapter.down.{i}", h))
        feat = torch.matmul(x, p[f"adapter.factor_dim_list.{i}"].sum(dim=0)).permute(0, 2, 1)
        feat = torch.matmul(feat, p[f"adapter.factor_t_list.{i}"].sum(dim=0))
        fusion = feat if fusion is None else fusion * feat
    fusion = fusion.permute(0, 2, 1)
    fusion = fusion + original[:, : fusion.shape[1], :]
    fusion = fusion.permute(0, 2, 1)
    z = torch.cat([fusion[:, :, 0] for _ in range(n_mod)], dim=-1)
    hidden = F.relu(linear(p, "out_layer_proj0", z))  # Latefusion.get_res
    proj = linear(p, "out_layer_proj2", F.relu(linear(p, "out_layer_proj1", hidden)))
    return linear(p, "out_layer", proj + hidden)


RELEASED_TRAINABLE = ("adapter.", "out_layer")  # AdapterModel: basemodel frozen but its head


# --- our names -> released names (written out here, independently of released_to_ours) ----------
def ours_to_released(state: dict[str, torch.Tensor], modalities, depth) -> dict[str, torch.Tensor]:
    """Our parameter names (``state``: any tensors keyed by them) -> the released names."""
    index = {m: i for i, m in enumerate(modalities)}
    hook = f"fusion_hooks.{depth - 1}."
    out = {}
    for name, value in state.items():
        parts = name.split(".")
        if parts[0] == "projections":
            out[f"proj.{index[parts[1]]}.{parts[2]}"] = value
        elif parts[0] == "final_norms":
            out[f"encoders.{index[parts[1]]}.layer_norm.{parts[2]}"] = value
        elif parts[0] == "encoders":
            i, j, module, rest = index[parts[1]], parts[2], parts[3], parts[4:]
            prefix = f"encoders.{i}.layers.{j}"
            if module == "attn" and rest[0] == "o":
                out[f"{prefix}.self_attn.out_proj.{rest[1]}"] = value
            elif module == "attn":
                continue  # q, k, v: stacked below
            elif module == "ffn":
                out[f"{prefix}.{rest[0]}.{rest[1]}"] = value
            else:
                out[f"{prefix}.layer_norms.{ {'attn_norm': 0, 'ffn_norm': 1}[module] }.{rest[0]}"] = value
        elif parts[0] == "head":
            out[{"proj0": "out_layer_proj0", "proj1": "out_layer_proj1", "proj2": "out_layer_proj2",
                 "out": "out_layer"}[parts[1]] + f".{parts[2]}"] = value
        elif name.startswith(hook + "down."):
            out[f"adapter.down.{index[parts[3]]}.{parts[4]}"] = value
        elif name.startswith(hook + "w_h."):
            out[f"adapter.factor_dim_list.{index[parts[3]]}"] = value.transpose(1, 2)
        elif name.startswith(hook + "w_t."):
            out[f"adapter.factor_t_list.{index[parts[3]]}"] = value.transpose(1, 2)
        else:
            raise AssertionError(f"unmapped parameter {name}")
    for m, i in index.items():
        for j in range(depth):
            for kind in ("weight", "bias"):
                stacked = [state[f"encoders.{m}.{j}.attn.{r}.{kind}"] for r in "qkv"]
                out[f"encoders.{i}.layers.{j}.self_attn.in_proj_{kind}"] = torch.cat(stacked, dim=0)
    return out


# --- fixtures -----------------------------------------------------------------------------------
CASES = {  # (input dims, lengths, down_dim d); width 8
    "3 modalities, d < width": ((7, 5, 6), (6, 5, 4), 4),
    "3 modalities, d > width": ((7, 5, 6), (6, 5, 4), 12),  # 12 fused tokens span text + audio
    "2 modalities": ((9, 3), (5, 7), 5),
}
NAMES = ("text", "audio", "vision")
WIDTH, DEPTH, HEADS, RANK_H, RANK_T = 8, 2, 2, 3, 2


def build(dims, lengths, d, seed=0, randomize=True):
    torch.manual_seed(seed)
    names = NAMES[: len(dims)]
    config = LateFusionConfig(input_dims=dict(zip(names, dims)), seq_lens=dict(zip(names, lengths)),
                              width=WIDTH, depth=DEPTH, heads=HEADS, output_dim=2)
    model = LateFusionBackbone(config)
    apply_method(model, "wander", "code", down_dim=d, rank_h=RANK_H, rank_t=RANK_T)
    model.double()
    if randomize:  # the released w_t = 0 would hide the adapter's computation; draw every tensor
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn_like(p) * 0.3)
    return model.eval()


def batch_for(model, seed=1, pad_steps=0):
    g = torch.Generator().manual_seed(seed)
    batch = {m: torch.randn(3, model.config.seq_lens[m], model.config.input_dims[m], generator=g,
                            dtype=torch.float64) for m in model.modalities}
    if pad_steps:  # zero steps whose first projected channel is exactly 0: released padding
        m = model.modalities[1]
        batch[m][:, -pad_steps:] = 0
        with torch.no_grad():
            model.projections[m].bias[0] = 0
    return batch


def released_names(model, what=lambda p: p):
    """``what(parameter)`` for each of our parameters, under the released names."""
    return ours_to_released({n: what(p) for n, p in model.named_parameters()}, model.modalities,
                            model.depth)


def gradients(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: torch.zeros_like(p) if p.grad is None else p.grad for n, p in params.items()}


# --- tests ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("pad_steps", [0, 2])
def test_same_output_and_gradients_as_the_released_model(case, pad_steps):
    dims, lengths, d = CASES[case]
    ours = build(dims, lengths, d)
    batch = batch_for(ours, pad_steps=pad_steps)
    for p in ours.parameters():  # gradients of the whole model, frozen parts included
        p.requires_grad_(True)
    released = {n: p.detach().clone().requires_grad_(True) for n, p in released_names(ours).items()}
    assert len(released) == sum(1 for _ in ours.parameters()) - 2 * 2 * DEPTH * len(dims)  # q,k,v -> 1

    out_ours = ours(batch)
    out_released = released_forward(released, [batch[m] for m in ours.modalities], DEPTH, HEADS)
    assert out_ours.shape == out_released.shape == (3, 2)
    assert (out_ours - out_released).abs().max().item() <= TOL

    target = torch.randn(3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    F.mse_loss(out_ours, target).backward()
    F.mse_loss(out_released, target).backward()
    ours_grads = released_names(ours, lambda p: p.grad)
    theirs = gradients(released)
    assert set(ours_grads) == set(theirs)
    for name, grad in theirs.items():
        assert grad.abs().max() > 0, name  # every tensor is exercised
        assert (ours_grads[name] - grad).abs().max().item() <= TOL, name


def test_padding_steps_get_the_zero_position_row():
    """With pad_steps the released rule marks steps padding; check the case is really exercised."""
    dims, lengths, d = CASES["3 modalities, d < width"]
    ours = build(dims, lengths, d)
    batch = batch_for(ours, pad_steps=2)
    m = ours.modalities[1]
    projected = ours.projections[m](batch[m].transpose(1, 2)).transpose(1, 2)
    table = released_positions(projected[..., 0], WIDTH)
    assert (projected[:, -2:, 0] == 0).all() and (table[:, -2:] == 0).all()
    assert (table[:, :-2].abs().sum(-1) > 0).all()


@pytest.mark.parametrize("case", CASES)
def test_released_state_dict_loads_and_runs_identically(case):
    """A state dict with the released names (random values) -> ``released_to_ours`` -> our model."""
    dims, lengths, d = CASES[case]
    ours = build(dims, lengths, d, randomize=False)
    g = torch.Generator().manual_seed(7)
    released = {n: torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.3
                for n, p in released_names(ours).items()}
    # the released buffers, which carry no computation
    buffers = {"basemodel.encoders.0.version": torch.tensor([2.0]),
               "basemodel.encoders.0.embed_positions._float_tensor": torch.zeros(1)}
    document = {**{(n if n.startswith("adapter.") else f"basemodel.{n}"): v for n, v in released.items()},
                **buffers}
    converted = released_to_ours(document, ours.modalities, ours.depth)
    result = ours.load_state_dict(converted, strict=False)
    assert result.unexpected_keys == [] and result.missing_keys == []
    batch = batch_for(ours)
    with torch.no_grad():
        out = ours(batch)
        expected = released_forward(released, [batch[m] for m in ours.modalities], DEPTH, HEADS)
    assert (out - expected).abs().max().item() <= TOL


@pytest.mark.parametrize("case", CASES)
def test_trainable_set_is_the_released_one(case):
    dims, lengths, d = CASES[case]
    ours = build(dims, lengths, d)
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    flags = released_names(ours, lambda p: torch.full(p.shape, p.requires_grad))
    assert all(bool(f.all()) == bool(f.any()) for f in flags.values())
    mapped_trainable = {n for n, f in flags.items() if f.all()}
    assert mapped_trainable == {n for n in flags if n.startswith(RELEASED_TRAINABLE)}
    counts = count_parameters(ours)
    released_count = sum(flags[n].numel() for n in mapped_trainable)
    assert counts["method"] + counts["head"] == released_count
    M, D = len(dims), WIDTH
    head = (M * D * D + D) + 2 * (D * D + D) + (D * 2 + 2)  # proj0 + proj1, proj2 + out (2 outputs)
    adapter = sum(D * d + d + RANK_H * d * D + RANK_T * l * d for l in lengths)  # down, dim, t factors
    assert counts == {"method": adapter, "head": head}
    assert {n.split(".")[0] for n in trainable} == {"fusion_hooks", "head"}


def test_paper_variant_keeps_the_backbone_head():
    dims, lengths, d = CASES["3 modalities, d < width"]
    torch.manual_seed(0)
    names = NAMES[: len(dims)]
    model = LateFusionBackbone(LateFusionConfig(input_dims=dict(zip(names, dims)),
                                                seq_lens=dict(zip(names, lengths)),
                                                width=WIDTH, depth=DEPTH, heads=HEADS))
    head = model.head
    apply_method(model, "wander", "paper", down_dim=d)
    assert model.head is head and model.head_choice == "default"
    assert hasattr(model.head, "proj1") and not hasattr(model.head, "proj0")


def test_released_sizes_counts():
    """Released MOSI sizes (width 40, 32 layers, dims 768 / 5 / 20, 50 tokens, 1 output)."""
    D, L, M, T = 40, 32, 3, 50
    layer = (3 * D * D + 3 * D) + (D * D + D) + (D * 4 * D + 4 * D) + (4 * D * D + D) + 2 * 2 * D
    convs = sum((dim + 1) * D for dim in (768, 5, 20))  # Conv1d k=1 with bias
    head = (M * D * D + D) + 2 * (D * D + D) + (D + 1)  # 4,840 + 3,280 + 41 = 8,161
    base = M * L * layer + M * 2 * D + convs + head  # = 1,933,361 (the released base model)

    def adapter(d, r_h=8, r_t=12):  # released defaults drank 8, trank 12
        return M * ((D * d + d) + r_h * d * D + r_t * T * d)

    model = LateFusionBackbone(LateFusionConfig(**PAPER_MOSI))
    model.set_head(RELEASED_WANDER_HEAD)
    assert sum(p.numel() for p in model.parameters()) == base == 1_933_361
    for d, expected in ((16, 54_289), (64, 192_673)):
        model = LateFusionBackbone(LateFusionConfig(**PAPER_MOSI))
        apply_method(model, "wander", "code", down_dim=d, rank_h=8)
        counts = count_parameters(model)
        assert counts == {"method": adapter(d), "head": head}
        assert counts["method"] + counts["head"] == expected
    assert adapter(16) + head == 54_289 and adapter(64) == 184_512


def test_released_init_starts_as_the_frozen_model_under_the_released_head():
    """w_t = 0: the fused token 0 is text token 0, so the model is the frozen encoders + head."""
    dims, lengths, d = CASES["3 modalities, d > width"]
    model = build(dims, lengths, d, randomize=False)
    batch = batch_for(model)
    with torch.no_grad():
        released = released_names(model)
        out = model(batch)
        for i in range(len(dims)):
            released[f"adapter.factor_dim_list.{i}"] = torch.randn_like(released[f"adapter.factor_dim_list.{i}"])
        again = released_forward(released, [batch[m] for m in model.modalities], DEPTH, HEADS)
    assert (out - again).abs().max().item() <= TOL
