"""Wander's ``code`` variant on the two-tower backbone against an independent statement of the
released Food-101 model (HalfMoon1008/WANDER, also shinnew9/WANDER):

- ``models/foodmodel.py``: FoodModelWander = frozen ViT + BERT -> FoodModel's fusion transformer
  (frozen) over cat([ViT tokens, BERT tokens]) -> split into v_f / t_f -> Adapter([v_f, t_f]) ->
  out_layer(dropout(relu(proj1(fusion[:, 0])))); only the adapter, proj1 and out_layer train;
- ``models/transformer.py`` / ``multihead_attention.py`` / ``position_embedding.py``: the fusion
  transformer is sequence-first but receives the batch-first (B, T, D) tensor, so attention runs
  across the samples of a batch and positions index the sample within the batch;
- ``models/adapter.py``: the Wander adapter (down, GELU, factor sums, product, residual).

The reference below is written from that reading with plain tensor operations in float64 and
takes its weights from our model by parameter NAME (our names -> the released names); it never
calls our modules. The released softmax runs on ``attn_weights.float()``: a no-op at the released
float32, it would round a float64 run to float32, so the reference keeps float64 there (the only
liberty taken). The fairseq position table is computed in float32 and cast, as released.
"""
from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, default_collate

from harness.backbones.two_tower import (ReleasedWanderHead, ReleasedWanderStage,
                                         TwoTowerBackbone, TwoTowerConfig)
from methods import apply_method, count_parameters
from methods.base import RELEASED_WANDER_HEAD

D, HEADS, L_IMAGE, L_TEXT, CLASSES = 64, 4, 17, 16, 7   # the tiny preset: width 64, 17 + 16 tokens
d, R_H, R_T = 8, 8, 12                                  # Wander code defaults (drank 8, trank 12)
B = 5
TOL = 1e-10


def build(variant: str, seed: int = 0) -> TwoTowerBackbone:
    torch.manual_seed(seed)
    backbone = TwoTowerBackbone(TwoTowerConfig.tiny(num_classes=CLASSES))
    apply_method(backbone, "wander", variant, down_dim=d)
    return backbone.double().eval()


def tower_states(seed: int = 1, batch: int = B) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    states = {"image": torch.randn(batch, L_IMAGE, D, generator=g, dtype=torch.float64),
              "text": torch.randn(batch, L_TEXT, D, generator=g, dtype=torch.float64)}
    states["text"][1, 3, 0] = 0.0  # a token whose first feature is exactly 0: the padding position
    return states


def ours_from_towers(backbone: TwoTowerBackbone, states: dict) -> torch.Tensor:
    """Our model from the tower outputs on: the last-depth hook point, then the head (what the
    forward and the feature-cache path both run)."""
    last = str(backbone.depth - 1)
    return backbone.head(backbone.fusion_hooks[last](dict(states)), {})


# --- the released model, written out -------------------------------------------------------------
def released_state(backbone: TwoTowerBackbone) -> dict[str, torch.Tensor]:
    """Our parameters under the released FoodModelWander names (q, k, v stacked into in_proj)."""
    modality_index = {m: i for i, m in enumerate(backbone.modalities)}
    out, qkv = {}, {}
    for name, value in backbone.named_parameters():
        value = value.detach()
        parts = name.split(".")
        if name.startswith("encoders."):
            continue  # the towers: the reference starts from their outputs
        if name.startswith("head."):
            out[f"basemodel.{parts[1]}.{parts[2]}"] = value       # proj1 / out_layer
        elif parts[2] == "adapter":
            kind, leaf = parts[3], parts[4]
            if kind == "down":                                    # down.<m>.weight|bias
                out[f"adapter.down.{modality_index[leaf]}.{parts[5]}"] = value
            elif kind == "w_h":                                   # (R_h, D, d) -> (drank, rank, dim)
                out[f"adapter.factor_dim_list.{modality_index[leaf]}"] = value.transpose(1, 2)
            elif kind == "w_t":                                   # (R_t, d_t, l) -> (trank, l, rank)
                out[f"adapter.factor_t_list.{modality_index[leaf]}"] = value.transpose(1, 2)
        elif parts[2] == "fusion" and parts[3] == "norm":
            out[f"basemodel.fusion.layer_norm.{parts[4]}"] = value
        elif parts[2] == "fusion":                                # fusion.layers.<i>.<sub>...
            prefix = f"basemodel.fusion.layers.{parts[4]}"
            sub = ".".join(parts[5:])
            if sub.startswith("attn.") and parts[6] in "qkv":
                qkv.setdefault(f"{prefix}.self_attn.in_proj_{parts[7]}", {})[parts[6]] = value
            else:
                released = {"attn.o": "self_attn.out_proj", "attn_norm": "layer_norms.0",
                            "ffn_norm": "layer_norms.1", "ffn.fc1": "fc1", "ffn.fc2": "fc2"}
                module, leaf = sub.rsplit(".", 1)
                out[f"{prefix}.{released[module]}.{leaf}"] = value
        else:
            raise KeyError(name)
    for key, parts in qkv.items():
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def released_positions(x_in: torch.Tensor) -> torch.Tensor:
    """position_embedding.py on ``x_in.transpose(0, 1)[:, :, 0]`` (read as (bsz, seq_len)),
    transposed back: (B, T, D)."""
    tokens = x_in.transpose(0, 1)[:, :, 0]
    bsz, seq_len = tokens.shape
    padding_idx = 0
    max_pos = padding_idx + 1 + seq_len
    half_dim = D // 2
    emb = math.log(10000) / (half_dim - 1)
    emb = torch.exp(torch.arange(half_dim, dtype=torch.float) * -emb)
    emb = torch.arange(max_pos, dtype=torch.float).unsqueeze(1) * emb.unsqueeze(0)
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1).view(max_pos, -1)
    emb[padding_idx, :] = 0
    weights = emb.type_as(x_in)
    mask = tokens.ne(padding_idx)
    positions = torch.arange(padding_idx + 1, max_pos).type_as(tokens)[:seq_len].expand_as(tokens)
    positions = tokens.clone().masked_scatter_(mask, positions[mask]).long()
    table = weights.index_select(0, positions.contiguous().view(-1)).view(bsz, seq_len, -1)
    return table.transpose(0, 1)


def released_attention(x, P, prefix):
    tgt_len, bsz, embed_dim = x.size()  # the batch-first tensor read as (tgt_len = B, bsz = T)
    head_dim = embed_dim // HEADS
    q, k, v = F.linear(x, P[f"{prefix}.in_proj_weight"], P[f"{prefix}.in_proj_bias"]).chunk(3, dim=-1)
    q = q * head_dim ** -0.5
    q = q.contiguous().view(tgt_len, bsz * HEADS, head_dim).transpose(0, 1)
    k = k.contiguous().view(-1, bsz * HEADS, head_dim).transpose(0, 1)
    v = v.contiguous().view(-1, bsz * HEADS, head_dim).transpose(0, 1)
    weights = F.softmax(torch.bmm(q, k.transpose(1, 2)), dim=-1)
    attn = torch.bmm(weights, v).transpose(0, 1).contiguous().view(tgt_len, bsz, embed_dim)
    return F.linear(attn, P[f"{prefix}.out_proj.weight"], P[f"{prefix}.out_proj.bias"])


def released_fusion(x_in, P):
    def norm(x, name):
        return F.layer_norm(x, (D,), P[f"{name}.weight"], P[f"{name}.bias"])

    x = math.sqrt(D) * x_in
    x = x + released_positions(x_in)
    for i in range(2):
        p = f"basemodel.fusion.layers.{i}"
        residual = x
        x = residual + released_attention(norm(x, f"{p}.layer_norms.0"), P, f"{p}.self_attn")
        residual = x
        x = F.relu(F.linear(norm(x, f"{p}.layer_norms.1"), P[f"{p}.fc1.weight"], P[f"{p}.fc1.bias"]))
        x = residual + F.linear(x, P[f"{p}.fc2.weight"], P[f"{p}.fc2.bias"])
    return norm(x, "basemodel.fusion.layer_norm")


def released_adapter(x, P):
    original = torch.cat(x, dim=1)
    x = [F.gelu(F.linear(x[i], P[f"adapter.down.{i}.weight"], P[f"adapter.down.{i}.bias"]))
         for i in range(2)]
    fusion_feat = []
    for i in range(2):
        tmp = torch.matmul(x[i], P[f"adapter.factor_dim_list.{i}"].sum(dim=0)).permute(0, 2, 1)
        fusion_feat.append(torch.matmul(tmp, P[f"adapter.factor_t_list.{i}"].sum(dim=0)))
    fusion = fusion_feat[0] * fusion_feat[1]
    fusion = fusion.permute(0, 2, 1)
    return fusion + original[:, : fusion.shape[1], :]


def released_model(v, t, P):
    """FoodModelWander.forward from the tower outputs (last_hidden_state) on, eval mode."""
    fusion = released_fusion(torch.cat([v, t], dim=1), P)
    v_f, t_f = fusion[:, : v.shape[1], :], fusion[:, v.shape[1]:, :]
    fusion = released_adapter([v_f, t_f], P)
    hidden = F.relu(F.linear(fusion[:, 0, :], P["basemodel.proj1.weight"], P["basemodel.proj1.bias"]))
    return F.linear(hidden, P["basemodel.out_layer.weight"], P["basemodel.out_layer.bias"])


RELEASED_TRAINABLE = {"adapter.down.0.weight", "adapter.down.0.bias", "adapter.down.1.weight",
                      "adapter.down.1.bias", "adapter.factor_dim_list.0", "adapter.factor_dim_list.1",
                      "adapter.factor_t_list.0", "adapter.factor_t_list.1", "basemodel.proj1.weight",
                      "basemodel.proj1.bias", "basemodel.out_layer.weight", "basemodel.out_layer.bias"}


def randomise_adapter(backbone: TwoTowerBackbone, seed: int = 3) -> None:
    """Replace the released dead init (w_t = 0) by random values so gradients are not all zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in backbone.named_parameters():
            if ".adapter." in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def compare(backbone: TwoTowerBackbone, states: dict) -> None:
    P = {k: v.clone().requires_grad_(k in RELEASED_TRAINABLE) for k, v in released_state(backbone).items()}
    ref = released_model(states["image"], states["text"], P)
    backbone.zero_grad(set_to_none=True)
    ours = ours_from_towers(backbone, states)
    assert ours.shape == ref.shape == (B, CLASSES)
    assert (ours - ref).abs().max().item() <= TOL
    weights = torch.randn(B, CLASSES, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    (ref * weights).sum().backward()
    (ours * weights).sum().backward()
    released = released_state(backbone)  # names only (values are our parameters)
    ours_to_released = {}
    for name, p in backbone.named_parameters():
        if p.requires_grad:
            ours_to_released[name] = [k for k, v in released.items() if v.data_ptr() == p.data_ptr()]
    for name, p in backbone.named_parameters():
        if not p.requires_grad:
            continue
        (key,) = ours_to_released[name]
        grad = P[key].grad
        if "w_h" in name or "w_t" in name:
            grad = grad.transpose(1, 2)
        assert (p.grad - grad).abs().max().item() <= TOL, name
    return ours, ref


# --- the tests -------------------------------------------------------------------------------------
def test_code_variant_computes_the_released_model_output_and_gradients():
    backbone = build("code")
    assert backbone.head_choice == RELEASED_WANDER_HEAD
    assert isinstance(backbone.head, ReleasedWanderHead)
    assert isinstance(backbone.fusion_hooks[str(backbone.depth - 1)], ReleasedWanderStage)
    randomise_adapter(backbone)
    ours, ref = compare(backbone, tower_states())
    assert ref.abs().max() > 1e-3  # not a vacuous comparison
    # The released init (w_t = 0): the adapter is the identity and gets zero gradient in both.
    dead = build("code")
    compare(dead, tower_states())
    for name, p in dead.named_parameters():
        if ".adapter." in name:
            assert p.grad is not None and not torch.any(p.grad != 0), name


def test_full_forward_and_feature_cache_run_the_released_pipeline(tmp_path):
    from harness.features import FromCache, cacheable, extract_features

    torch.manual_seed(0)
    backbone = TwoTowerBackbone(TwoTowerConfig.tiny(num_classes=CLASSES))
    apply_method(backbone, "wander", "code", down_dim=d)
    randomise_adapter(backbone)
    backbone.eval()
    batch = backbone.example_batch(B, seed=2)
    # Tower outputs from a copy without the stage; then the reference on them.
    bare = copy.deepcopy(backbone).double()
    del bare.fusion_hooks[str(bare.depth - 1)]
    model64 = copy.deepcopy(backbone).double()
    with torch.no_grad():
        towers = bare.encode(batch)
        full = model64(batch)
        ref = released_model(towers["image"], towers["text"], released_state(model64))
    assert (full - ref).abs().max().item() <= TOL

    # Fine-tuning from cached tower outputs reproduces the full forward (same batch, fp16 cache).
    assert cacheable(backbone)

    class Items(Dataset):
        def __len__(self):
            return B

        def __getitem__(self, i):
            return {"image": batch["image"][i], "text": batch["text"][i],
                    "mask_text": batch["mask_text"][i], "label": torch.tensor(i % CLASSES),
                    "index": torch.tensor(i)}

    features = extract_features(backbone, Items(), tmp_path / "train.h5", "data-v1", batch_size=2,
                                progress=False)
    model = FromCache(backbone).eval()
    with torch.no_grad():
        cached = model(default_collate([features[i] for i in range(B)]))
        direct = backbone(batch)
    assert torch.allclose(cached, direct, atol=5e-3, rtol=1e-2), (cached - direct).abs().max()


def test_trainable_set_and_count_are_the_released_ones():
    backbone = build("code")
    released = released_state(backbone)
    trainable = {k for k, v in released.items()
                 for name, p in backbone.named_parameters()
                 if p.requires_grad and p.data_ptr() == v.data_ptr()}
    assert trainable == RELEASED_TRAINABLE
    counts = count_parameters(backbone)
    # Adapter: down 2 (D d + d), factor_dim 2 R_h d D, factor_t R_t d (L_image + L_text);
    # head: proj1 D D + D, out_layer D C + C. The fusion transformer (2 layers) trains nothing.
    assert counts["method"] == 2 * (D * d + d) + 2 * R_H * d * D + R_T * d * (L_IMAGE + L_TEXT)
    assert counts["head"] == D * D + D + D * CLASSES + CLASSES
    frozen = sum(p.numel() for n, p in backbone.named_parameters() if ".fusion." in n)
    assert frozen == 2 * (4 * (D * D + D) + 2 * 2 * D + 2 * 4 * D * D + 4 * D + D) + 2 * D
    assert not any(p.requires_grad for n, p in backbone.named_parameters() if ".fusion." in n)


def test_released_sizes_count():
    """At the released sizes (ViT-B/16 197 tokens, BERT 50 tokens, 768 wide, d = 64, drank 8,
    trank 12, 101 classes), built on the meta device."""
    from harness.audit_params import building

    with building("meta"):
        backbone = TwoTowerBackbone(TwoTowerConfig.paper())
        apply_method(backbone, "wander", "code")
    counts = count_parameters(backbone)
    # 2 (768 * 64 + 64) + 2 * 8 * 64 * 768 + 12 * 64 * (197 + 50) = 98,432 + 786,432 + 189,696
    assert counts["method"] == 1_074_560
    assert counts["head"] == 768 * 768 + 768 + 768 * 101 + 101 == 668_261
    fusion = [p for n, p in backbone.named_parameters() if ".fusion." in n]
    assert sum(p.numel() for p in fusion) == 14_177_280 and not any(p.requires_grad for p in fusion)


def _alone_vs_batched(backbone, states):
    with torch.no_grad():
        batched = ours_from_towers(backbone, states)
        alone = torch.cat([ours_from_towers(backbone, {m: s[i:i + 1] for m, s in states.items()})
                           for i in range(B)])
    return (batched - alone).abs().max().item()


def test_code_variant_mixes_the_batch_paper_variant_does_not():
    code, paper = build("code"), build("paper")
    states = tower_states()
    assert code.mixes_batch and paper.mixes_batch is None
    assert _alone_vs_batched(code, states) > 1e-4
    assert _alone_vs_batched(paper, states) <= TOL
    # Changing sample 0's batch-mates changes sample 0's output (code) and does not (paper).
    others = tower_states(seed=9)
    swapped = {m: torch.cat([s[:1], others[m][1:]]) for m, s in states.items()}
    for backbone, changes in ((code, True), (paper, False)):
        with torch.no_grad():
            first = ours_from_towers(backbone, states)[0]
            second = ours_from_towers(backbone, swapped)[0]
        assert ((first - second).abs().max().item() > 1e-4) == changes


def test_audit_reports_batch_dependence():
    from harness.audit import audit_two_tower

    code, paper = audit_two_tower("wander", "code"), audit_two_tower("wander", "paper")
    assert code["backbone"] == paper["backbone"] == "two_tower"
    assert code["batch_dependence"] > 1e-4 and code["batch_mixing_expected"] and code["ok"]
    assert "batch" in code["flag"]
    assert paper["batch_dependence"] < 1e-5 and not paper["batch_mixing_expected"] and paper["ok"]
    assert code["identity_at_init"] is True  # the released init: the adapter is the identity
    assert code["trainable_head"] == D * D + D + D * 101 + 101


def test_audit_params_reports_the_released_count_beside_the_paper_variant():
    from harness.audit_params import PAPER_ROWS, audit_row

    rows = {row.variant: audit_row(row) for row in PAPER_ROWS
            if row.table == "Wander Table 1" and row.row == "Wander (d=64)"}
    code, paper = rows["code"], rows["paper"]
    # adapter at d = 64 (see test_released_sizes_count) + head 668,261; nothing of the fusion layers
    assert (code["ours_method"], code["ours_head"]) == (1_074_560, 668_261)
    assert paper["ours_head"] > 14_177_280  # our paper variant trains the fusion transformer
    assert "FROZEN" in code["explanation"]
    assert f"the paper variant counts {paper['ours_method']:,} + head {paper['ours_head']:,}" \
        in code["explanation"]
    assert "below our head alone" not in code["explanation"]  # 3.1M > 1.74M: no such claim


def test_fine_tuning_from_the_feature_cache_trains_only_adapter_and_head(tmp_path):
    from harness.features import cached_splits
    from harness.tasks.tasks import TASKS
    from harness.train import TrainSettings, fine_tune

    torch.manual_seed(0)
    backbone = TwoTowerBackbone(TwoTowerConfig.tiny(num_classes=CLASSES))
    apply_method(backbone, "wander", "code", down_dim=d)
    batch = backbone.example_batch(20, seed=4)
    items = [{"image": batch["image"][i], "text": batch["text"][i], "mask_text": batch["mask_text"][i],
              "label": torch.tensor(i % CLASSES), "index": torch.tensor(i)} for i in range(20)]

    class Items(Dataset):
        def __init__(self, rows):
            self.rows = rows

        def __len__(self):
            return len(self.rows)

        def __getitem__(self, i):
            return self.rows[i]

    splits = {"train": Items(items), "valid": Items(items[:8]), "test": Items(items[8:])}
    hashes = {name: f"h-{name}" for name in splits}
    model, cached, _ = cached_splits(backbone, splits, tmp_path, hashes, batch_size=8, progress=False)
    before = {n: p.clone() for n, p in backbone.named_parameters()}
    settings = TrainSettings(optimizer="adamw", lr=1e-3, batch_size=8, epochs=1)
    fine_tune(model, TASKS["classification"], cached, settings, seed=0, progress=False)
    changed = {n for n, p in backbone.named_parameters() if not torch.equal(p, before[n])}
    assert {n for n in changed if n.startswith("head.")}  # proj1 / out_layer trained
    assert all(n.startswith(("head.", "fusion_hooks.1.adapter.")) for n in changed), changed
    _, _, again = cached_splits(backbone, splits, tmp_path, hashes, batch_size=8, progress=False)
    assert {s["status"] for s in again["splits"].values()} == {"reused"}
