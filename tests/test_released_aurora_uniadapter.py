"""The ``code`` variants of Aurora and UniAdapter against an independent statement of the RELEASED
models on the two-tower (ViT + BERT) backbone, end to end through both towers, in float64.

The reference below is written from a reading of the released repositories and computes with
plain tensors and ``torch.nn.functional`` (it never calls ``methods.aurora`` / ``methods.uniadapter``
modules). It takes the frozen tower weights from an untouched copy of the backbone, the adapter
weights under their RELEASED names (mapped from ours by name, element by element), and shares only
the task head (the Wander fusion transformer + MLP, not part of either released model).

Aurora, WillDreamer/Aurora (``CP/vit.py`` Attention / Mlp / Block, ``CP/med.py``
BertSelfAttention, ``CP/blip_retrieval.py`` for ``CP_U`` / ``CP_V`` / ``CP_C``,
``train_retrieval.py`` for the trainable set):

- ViT attention: ``CPc = CP_C @ CP_attention`` (R, R, 4); q/k/v/proj get
  ``CP_V(dp(CP_U(x) @ CPc[:, :, j]))`` (dropout AFTER the core mixing);
- ViT MLP: ``CPc = CP_C @ mlp_CP`` (R, R, 8); fc1 gets ``CP_V(dp(CP_U(x) @ fc1_cp).reshape(.., 4,
  R))`` with ``fc1_cp = CPc[:, :, :4].reshape(R, 4R)``; fc2 gets ``CP_V(dp(CP_U(x_chunks).reshape(..,
  4R) @ fc2_cp.t()))`` with ``fc2_cp = CPc[:, :, 4:].reshape(R, 4R)``;
- BERT self-attention: q, k, v get ``CP_V(dp(CP_U(h)) @ (CP_C @ q_CP)[:, :, 0])`` (dropout after U),
  ``q_CP`` (R, 1); nothing else in the BERT layer is adapted;
- trainable: ``'CP' in name and '_m' not in name``.

UniAdapter, RERV/UniAdapter (``models/adapter.py`` UniAdapter, ``models/vit.py`` Block,
``models/med.py`` BertLayer, ``models/blip_retrieval.py``, ``train_retrieval.py``):

- one adapter per depth i (``adapters[i]``) shared by ViT block i and BERT layer i:
  ``scale * up(dropout(relu(down_proj(adapter_layer_norm_before(x)))))``, scale 0.1, ``up`` =
  ``visual_up_proj`` (image) or ``up_proj`` (text);
- ViT: ``x = x + attn(norm1(x)); out = x + mlp(norm2(x)) + adapter(x)`` (raw stream);
- BERT: ``h = attention_output; out = BertOutput(FFN(h), h) + adapter(h)`` (after the post-FFN
  LayerNorm);
- trainable: ``'adapter' in name and '_m' not in name``.

Parameters read only in BLIP's ``multimodal`` mode (the fusion encoder: Aurora's cross-attention
``*_CP`` and gates ``CP_scale*`` / ``CP_shift*``; UniAdapter's ``multi_up_proj``,
``adapter_layer_norm_cross_modal`` and the text encoder's ``video_key_adapter`` /
``video_value_adapter``) have no counterpart in a two-tower backbone without cross-attention; the
reference lists them (``*_FUSION_ONLY``) and leaves them out of the two-tower model.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

import methods.aurora  # noqa: F401  (registers "aurora")
import methods.uniadapter  # noqa: F401  (registers "uniadapter")
from harness.backbones.two_tower import two_tower
from methods import apply_method, count_parameters

TOL = 1e-10
R = 8          # Aurora rank
DOWN = 8       # UniAdapter r
CHUNKS = 4     # the released MLP ratio (hidden = 4 D)


# --- helpers ----------------------------------------------------------------------------------
def small_backbone(seed: int = 0):
    """Tiny two-tower in float64 with the towers' and head's own dropout off (so the only
    stochastic op left is the adapter's, replaced by a fixed mask where it matters)."""
    torch.manual_seed(seed)
    backbone = two_tower("tiny", num_classes=5, dropout=0.0, fusion_dropout=0.0).double()
    with torch.no_grad():  # non-identity LayerNorm affines, as in pretrained towers (else LN_a(LN2(h))
        for module in backbone.encoders.modules():  # would equal LN_a(h) and hide the placement)
            if isinstance(module, nn.LayerNorm):
                module.weight.add_(0.3 * torch.randn_like(module.weight))
                module.bias.add_(0.1 * torch.randn_like(module.bias))
    return backbone


class FixedMask(nn.Module):
    """A deterministic stand-in for dropout: multiplies the last axis by a fixed non-uniform
    pattern. Applied at a different position (before instead of after a mixing matrix) it gives a
    different result, so it pins down WHERE the released code drops out."""

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return t * fixed_pattern(t.shape[-1], t)


def fixed_pattern(n: int, like: torch.Tensor) -> torch.Tensor:
    return 1.0 + 0.5 * torch.cos(1.3 * torch.arange(n, dtype=like.dtype, device=like.device))


def frozen_weights(backbone: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in backbone.state_dict().items()}


def linear(x, W, name):
    return F.linear(x, W[name + ".weight"], W[name + ".bias"])


def layer_norm(x, W, name, eps):
    return F.layer_norm(x, x.shape[-1:], W[name + ".weight"], W[name + ".bias"], eps)


def attend(q, k, v, heads, key_mask=None):
    B, N, D = q.shape
    split = lambda t: t.reshape(B, t.shape[1], heads, D // heads).transpose(1, 2)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    scores = q @ k.transpose(-1, -2) / math.sqrt(D // heads)
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, N, D)


# --- the released towers, written out ---------------------------------------------------------
def vit_embed(W, config, image):
    p = "encoders.image.embeddings."
    patches = F.conv2d(image, W[p + "patch_embeddings.projection.weight"],
                       W[p + "patch_embeddings.projection.bias"], stride=config.patch_size)
    patches = patches.flatten(2).transpose(1, 2)
    cls = W[p + "cls_token"].expand(image.shape[0], -1, -1)
    return torch.cat([cls, patches], dim=1) + W[p + "position_embeddings"]


def bert_embed(W, ids):
    p = "encoders.text.embeddings."
    positions = torch.arange(ids.shape[1])
    x = (W[p + "word_embeddings.weight"][ids] + W[p + "position_embeddings.weight"][positions]
         + W[p + "token_type_embeddings.weight"][0])
    return layer_norm(x, W, p + "LayerNorm", 1e-12)  # BertConfig.layer_norm_eps (default)


def run_released(backbone, W, batch, vit_block, bert_layer):
    """Both towers with the given released layer functions, then the (shared) task head."""
    c = backbone.config
    eps_image = backbone.encoders["image"].config.layer_norm_eps
    ids, mask = backbone.text_inputs(batch)
    x = vit_embed(W, c, batch["image"].to(torch.float64))
    h = bert_embed(W, ids)
    for i in range(c.image_layers):
        x = vit_block(i, x)
        h = bert_layer(i, h, mask)
    x = layer_norm(x, W, "encoders.image.layernorm", eps_image)
    return backbone.head({"image": x, "text": h}, {"image": None, "text": mask})


def vit_block_frozen(W, i, x, heads, eps, adapt_qkvo=None, adapt_fc1=None, adapt_fc2=None,
                     parallel=None):
    """A ViT block (pre-LN) with optional additive updates on its linears and a parallel branch."""
    p = f"encoders.image.layers.{i}."
    zero = lambda t: 0  # noqa: E731
    qkvo = adapt_qkvo or (lambda role, t: 0)
    y = layer_norm(x, W, p + "layernorm_before", eps)
    q = linear(y, W, p + "attention.q_proj") + qkvo(0, y)
    k = linear(y, W, p + "attention.k_proj") + qkvo(1, y)
    v = linear(y, W, p + "attention.v_proj") + qkvo(2, y)
    ctx = attend(q, k, v, heads)
    x = x + linear(ctx, W, p + "attention.o_proj") + qkvo(3, ctx)
    y = layer_norm(x, W, p + "layernorm_after", eps)
    hidden = F.gelu(linear(y, W, p + "mlp.fc1") + (adapt_fc1 or zero)(y))
    out = x + linear(hidden, W, p + "mlp.fc2") + (adapt_fc2 or zero)(hidden)
    return out + (parallel(x) if parallel is not None else 0)


def bert_layer_frozen(W, i, h, mask, heads, adapt_qkv=None, parallel=None):
    """A BERT layer (post-LN) with optional additive updates on q, k, v and a parallel branch."""
    p = f"encoders.text.encoder.layer.{i}."
    qkv = adapt_qkv or (lambda role, t: 0)
    q = linear(h, W, p + "attention.self.query") + qkv(0, h)
    k = linear(h, W, p + "attention.self.key") + qkv(1, h)
    v = linear(h, W, p + "attention.self.value") + qkv(2, h)
    ctx = attend(q, k, v, heads, mask)
    a = layer_norm(linear(ctx, W, p + "attention.output.dense") + h, W,
                   p + "attention.output.LayerNorm", 1e-12)
    ffn = linear(F.gelu(linear(a, W, p + "intermediate.fc1")), W, p + "intermediate.fc2")
    out = layer_norm(ffn + a, W, p + "output.LayerNorm", 1e-12)
    return out + (parallel(a) if parallel is not None else 0)


# --- Aurora: the released model ---------------------------------------------------------------
AURORA_FUSION_ONLY = ("text_encoder.encoder.layer.{i}.crossattention.self.q_CP",
                      "text_encoder.encoder.layer.{i}.crossattention.self.k_CP",
                      "text_encoder.encoder.layer.{i}.crossattention.self.v_CP",
                      "text_encoder.encoder.layer.{i}.CP_scaleself",
                      "text_encoder.encoder.layer.{i}.CP_shiftself",
                      "text_encoder.encoder.layer.{i}.CP_scalecross",
                      "text_encoder.encoder.layer.{i}.CP_shiftcross")


def aurora_released_filter(name: str) -> bool:
    return "CP" in name and "_m" not in name  # train_retrieval.py


def aurora_released_forward(backbone, W, P, batch, drop):
    """The released Aurora on the two towers. ``P``: adapter tensors under released names;
    ``drop``: the dropout stand-in (``self.dp`` in the released modules)."""
    c = backbone.config
    U, V, C = P["CP_U.weight"], P["CP_V.weight"], P["CP_C"]
    eps = backbone.encoders["image"].config.layer_norm_eps
    cpU = lambda t: t @ U.T  # noqa: E731  (nn.Linear(D, R, bias=False))
    cpV = lambda t: t @ V.T  # noqa: E731  (nn.Linear(R, D, bias=False))

    def vit_block(i, x):
        cpc = C @ P[f"visual_encoder.blocks.{i}.attn.CP_attention"]        # (R, R, 4)
        mlp = C @ P[f"visual_encoder.blocks.{i}.mlp.mlp_CP"]               # (R, R, 8)
        fc1_cp = mlp[:, :, :CHUNKS].reshape(R, R * CHUNKS)
        fc2_cp = mlp[:, :, CHUNKS:].reshape(R, R * CHUNKS)

        def qkvo(j, t):
            return cpV(drop(cpU(t) @ cpc[:, :, j]))

        def fc1(t):
            B, N, D = t.shape
            return cpV(drop(cpU(t) @ fc1_cp).reshape(B, N, CHUNKS, R)).reshape(B, N, CHUNKS * D)

        def fc2(t):
            B, N, _ = t.shape
            chunks = t.reshape(B, N, CHUNKS, -1)
            return cpV(drop(cpU(chunks).reshape(B, N, CHUNKS * R) @ fc2_cp.t()))

        return vit_block_frozen(W, i, x, c.image_heads, eps, qkvo, fc1, fc2)

    def bert_layer(i, h, mask):
        p = f"text_encoder.encoder.layer.{i}.attention.self."
        cps = [P[p + n] for n in ("q_CP", "k_CP", "v_CP")]

        def qkv(j, t):
            return cpV(drop(cpU(t)) @ (C @ cps[j])[:, :, 0])

        return bert_layer_frozen(W, i, h, mask, c.text_heads, qkv)

    return run_released(backbone, W, batch, vit_block, bert_layer)


def aurora_to_released(backbone) -> tuple[dict, list]:
    """Our Aurora parameters under the released names, and the (ours, released, index) links
    (ours[index_ours] is released[index_released]) for mapping gradients back."""
    links = []
    L = backbone.config.image_layers
    image = "encoders.image.layers.{i}."
    text = "encoders.text.encoder.layer.{i}."
    ours = dict(backbone.named_parameters())
    factors = "encoders.image.layers.0.attention.q_proj.factors."
    links += [(factors + "U", "CP_U.weight", ...), (factors + "V", "CP_V.weight", ...),
              (factors + "core", "CP_C", ...)]
    for i in range(L):
        for j, role in enumerate(("q_proj", "k_proj", "v_proj", "o_proj")):
            links.append((image.format(i=i) + f"attention.{role}.p",
                          f"visual_encoder.blocks.{i}.attn.CP_attention", ((0, 0), (slice(None), j))))
        for c in range(CHUNKS):
            links.append((image.format(i=i) + "mlp.fc1.p", f"visual_encoder.blocks.{i}.mlp.mlp_CP",
                          ((0, c), (slice(None), c))))
            links.append((image.format(i=i) + "mlp.fc2.p", f"visual_encoder.blocks.{i}.mlp.mlp_CP",
                          ((c, 0), (slice(None), CHUNKS + c))))
        for role, name in (("query", "q_CP"), ("key", "k_CP"), ("value", "v_CP")):
            links.append((text.format(i=i) + f"attention.self.{role}.p",
                          f"text_encoder.encoder.layer.{i}.attention.self.{name}",
                          ((0, 0), (slice(None), 0))))
    shapes = {"CP_U.weight": (R, 64), "CP_V.weight": (64, R), "CP_C": (R, R, R)}
    for i in range(L):
        shapes[f"visual_encoder.blocks.{i}.attn.CP_attention"] = (R, 4)
        shapes[f"visual_encoder.blocks.{i}.mlp.mlp_CP"] = (R, 2 * CHUNKS)
        for name in ("q_CP", "k_CP", "v_CP"):
            shapes[f"text_encoder.encoder.layer.{i}.attention.self.{name}"] = (R, 1)
    released = {n: torch.full(s, float("nan"), dtype=torch.float64) for n, s in shapes.items()}
    with torch.no_grad():
        for our, name, index in links:
            if index is ...:
                released[name].copy_(ours[our])
            else:
                released[name][index[1]] = ours[our][index[0]]
    return {n: t.requires_grad_(True) for n, t in released.items()}, links


def test_aurora_code_is_the_released_model_end_to_end():
    backbone = small_backbone()
    W = frozen_weights(backbone)
    apply_method(backbone, "aurora", "code", rank=R)
    backbone.double()
    assert backbone.config.image_intermediate is None  # 4 D: the released MLP ratio
    modules = [m for m in backbone.modules() if isinstance(m, methods.aurora.AuroraLinear)]
    # Make every factor visible (V = 0 at init would hide everything but U's zero gradient).
    with torch.no_grad():
        modules[0].factors.V.normal_(0.0, 0.3)
    for m in modules:
        m.dropout = FixedMask()
    backbone.train()
    batch = backbone.example_batch(batch_size=3, seed=1)
    P, links = aurora_to_released(backbone)
    assert not any(torch.isnan(t).any() for t in P.values())  # every released entry is mapped

    out = backbone(batch)
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)).sum().backward()
    ours = {n: p.grad.clone() for n, p in backbone.named_parameters() if p.requires_grad}
    backbone.zero_grad(set_to_none=True)
    ref = aurora_released_forward(backbone, W, P, batch, FixedMask())
    (ref * torch.linspace(-1, 1, ref.numel(), dtype=ref.dtype).reshape(ref.shape)).sum().backward()

    assert (out - ref).abs().max().item() <= TOL
    for our, name, index in links:
        mine = ours[our] if index is ... else ours[our][index[0]]
        theirs = P[name].grad if index is ... else P[name].grad[index[1]]
        assert (mine - theirs).abs().max().item() <= TOL, (our, name)
        assert theirs.abs().max() > 0, name  # the comparison is not vacuous
    for n, p in backbone.head.named_parameters():
        assert (ours["head." + n] - p.grad).abs().max().item() <= TOL, n


def test_aurora_code_trainable_set_and_count_are_the_released_ones():
    backbone = small_backbone()
    apply_method(backbone, "aurora", "code", rank=R)
    backbone.double()
    P, links = aurora_to_released(backbone)
    L, D = backbone.config.image_layers, backbone.hidden_size("image")
    released_trainable = {n for n in P if aurora_released_filter(n)}
    assert released_trainable == set(P)
    fusion_only = {t.format(i=i) for t in AURORA_FUSION_ONLY for i in range(L)}
    assert all(aurora_released_filter(n) for n in fusion_only)  # trained there, absent here
    # Every one of our trainable method tensors maps onto released entries, each exactly once.
    mapped = {our for our, _, _ in links}
    trainable = {n for n, p in backbone.named_parameters() if p.requires_grad and not n.startswith("head.")}
    # Shared factors are registered in every wrapper; named_parameters lists them once.
    assert trainable == mapped
    cover = {n: torch.zeros(t.shape, dtype=torch.long) for n, t in P.items()}
    for our, name, index in links:
        if index is ...:
            cover[name] += 1
        else:
            cover[name][index[1]] += 1
    assert all(bool((c == 1).all()) for c in cover.values())
    # Count by hand: U (R x D) + V (D x R) + C (R^3) + per depth the ViT's (R, 4) and (R, 8) and the
    # BERT's three (R, 1): 2 * 64 * 8 + 512 + 2 * (32 + 64 + 24) = 1024 + 512 + 240 = 1776.
    count = count_parameters(backbone)["method"]
    assert count == sum(t.numel() for t in P.values()) == 2 * D * R + R ** 3 + L * (4 * R + 8 * R + 3 * R)
    assert count == 1776
    # the text tower adapts q, k, v only; the image tower all six
    roles = {(n.split(".")[1], n.rsplit(".", 2)[-2]) for n in trainable if n.endswith(".p")}
    assert {r for m, r in roles if m == "text"} == {"query", "key", "value"}
    assert {r for m, r in roles if m == "image"} == {"q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"}


def test_aurora_code_interleaving_is_not_block_wise():
    """The released fc1 mixes every core slice into every output block: block a is not slice a."""
    backbone = small_backbone()
    apply_method(backbone, "aurora", "code", rank=R)
    backbone.double()
    fc1 = backbone.get_submodule("encoders.image.layers.0.mlp.fc1")
    with torch.no_grad():
        slices = torch.einsum("rsk,iok->iors", fc1.factors.core, fc1.p)
        assert not torch.allclose(fc1.mixing(), slices)
        fc1.tower = "block"  # the block layout would be a different model
        assert torch.allclose(fc1.mixing(), slices)


def test_aurora_code_released_init_bounds():
    """xavier_uniform on the released (R, g) tensors: bound sqrt(6 / (R + g)); g = 1 for the BERT
    q/k/v_CP, 4 for CP_attention, 8 for mlp_CP."""
    backbone = small_backbone()
    apply_method(backbone, "aurora", "code", rank=R)
    backbone.double()
    bound = {g: math.sqrt(6.0 / (R + g)) for g in (1, 4, 8)}
    groups = {1: [], 4: [], 8: []}
    for n, p in backbone.named_parameters():
        if n.endswith(".p"):
            g = 1 if ".text." in n else 4 if ".attention." in n else 8
            groups[g].append(p.detach().flatten())
    for g, values in groups.items():
        values = torch.cat(values).abs()
        assert values.max() <= bound[g]
        smaller = max((b for b in bound.values() if b < bound[g]), default=0.0)
        assert values.max() > smaller, g  # the draws really use the wider bound
    factors = backbone.get_submodule("encoders.image.layers.0.attention.q_proj.factors")
    assert not torch.any(factors.V != 0)
    assert factors.core.abs().max() <= math.sqrt(6.0 / (2 * R * R))  # xavier on (R, R, R)


# --- UniAdapter: the released model -----------------------------------------------------------
UNIADAPTER_FUSION_ONLY = ("adapters.{i}.multi_up_proj.weight", "adapters.{i}.multi_up_proj.bias",
                          "adapters.{i}.adapter_layer_norm_cross_modal.weight",
                          "adapters.{i}.adapter_layer_norm_cross_modal.bias",
                          "text_encoder.encoder.video_key_adapter.down_proj.weight",
                          "text_encoder.encoder.video_value_adapter.down_proj.weight")


def uniadapter_released_filter(name: str) -> bool:
    return "adapter" in name and "_m" not in name  # train_retrieval.py


def uniadapter_released_forward(backbone, W, P, batch):
    c = backbone.config
    eps = backbone.encoders["image"].config.layer_norm_eps

    def adapter(i, t, up):
        a = f"adapters.{i}."
        t = F.layer_norm(t, t.shape[-1:], P[a + "adapter_layer_norm_before.weight"],
                         P[a + "adapter_layer_norm_before.bias"], 1e-5)  # nn.LayerNorm default eps
        down = F.relu(F.linear(t, P[a + "down_proj.weight"], P[a + "down_proj.bias"]))
        return 0.1 * F.linear(down, P[a + up + ".weight"], P[a + up + ".bias"])

    def vit_block(i, x):
        return vit_block_frozen(W, i, x, c.image_heads, eps,
                                parallel=lambda t: adapter(i, t, "visual_up_proj"))

    def bert_layer(i, h, mask):
        return bert_layer_frozen(W, i, h, mask, c.text_heads,
                                 parallel=lambda t: adapter(i, t, "up_proj"))

    return run_released(backbone, W, batch, vit_block, bert_layer)


def uniadapter_links(backbone) -> list[tuple[str, str]]:
    """(our name, released name) for every adapter tensor of the two-tower model."""
    links = []
    for i in range(backbone.config.image_layers):
        ours_image = f"encoders.image.layers.{i}.parallel_adapter."
        ours_text = f"encoders.text.encoder.layer.{i}.output.parallel."
        for part in ("weight", "bias"):
            links += [(ours_image + f"down.norm.{part}", f"adapters.{i}.adapter_layer_norm_before.{part}"),
                      (ours_image + f"down.proj.{part}", f"adapters.{i}.down_proj.{part}"),
                      (ours_image + f"up.{part}", f"adapters.{i}.visual_up_proj.{part}"),
                      (ours_text + f"up.{part}", f"adapters.{i}.up_proj.{part}")]
    return links


def test_uniadapter_code_is_the_released_model_end_to_end():
    backbone = small_backbone()
    W = frozen_weights(backbone)
    apply_method(backbone, "uniadapter", "code", down_dim=DOWN)
    backbone.double()
    with torch.no_grad():  # make the text up visible too (zero at init) and the LayerNorm non-trivial
        for n, p in backbone.named_parameters():
            if "parallel" in n and ".up." in n:
                p.normal_(0.0, 0.05)
            if n.endswith("down.norm.weight") or n.endswith("down.norm.bias"):
                p.add_(0.1 * torch.randn_like(p))
    backbone.train()
    batch = backbone.example_batch(batch_size=3, seed=2)
    ours_params = dict(backbone.named_parameters())
    links = uniadapter_links(backbone)
    P = {name: ours_params[our].detach().clone().requires_grad_(True) for our, name in links}

    out = backbone(batch)
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
    (out * weights).sum().backward()
    ours = {n: p.grad.clone() for n, p in backbone.named_parameters() if p.requires_grad}
    backbone.zero_grad(set_to_none=True)
    ref = uniadapter_released_forward(backbone, W, P, batch)
    (ref * weights).sum().backward()

    assert (out - ref).abs().max().item() <= TOL
    for our, name in links:
        assert (ours[our] - P[name].grad).abs().max().item() <= TOL, (our, name)
        assert P[name].grad.abs().max() > 0, name
    for n, p in backbone.head.named_parameters():
        assert (ours["head." + n] - p.grad).abs().max().item() <= TOL, n


def test_uniadapter_code_reads_the_raw_stream_and_adds_after_the_post_norm():
    """The two placements the released model differs in, each against the FFN-block reading: the
    ViT adapter reads h (not LN2(h)); the BERT adapter is added after the post-FFN LayerNorm."""
    backbone = small_backbone()
    W = frozen_weights(backbone)
    apply_method(backbone, "uniadapter", "code", down_dim=DOWN)
    backbone.double()
    backbone.eval()
    layer = backbone.layer("image", 0)
    x = torch.randn(2, 17, 64, dtype=torch.float64)
    with torch.no_grad():
        frozen = vit_block_frozen(W, 0, x, 4, 1e-12)
        a = x + linear(attend(*(linear(layer_norm(x, W, "encoders.image.layers.0.layernorm_before", 1e-12),
                                       W, f"encoders.image.layers.0.attention.{r}_proj") for r in "qkv"), 4),
                       W, "encoders.image.layers.0.attention.o_proj")
        got = layer(x)
        branch = layer.parallel_adapter
        assert (got - frozen - branch(a)).abs().max() <= TOL
        on_norm = branch(layer_norm(a, W, "encoders.image.layers.0.layernorm_after", 1e-12))
        assert (got - frozen - on_norm).abs().max() > 1e-6
        text = backbone.layer("text", 0)
        text.output.parallel.up.weight.normal_(0.0, 0.05)
        h = torch.randn(2, 16, 64, dtype=torch.float64)
        assert (text(h) - bert_layer_frozen(W, 0, h, None, 4,
                                            parallel=text.output.parallel)).abs().max() <= TOL


def test_uniadapter_code_trainable_set_and_count_are_the_released_ones():
    backbone = small_backbone()
    apply_method(backbone, "uniadapter", "code", down_dim=DOWN)
    backbone.double()
    L, D, M = backbone.config.image_layers, backbone.hidden_size("image"), 2
    links = uniadapter_links(backbone)
    released = {name for _, name in links}
    assert all(uniadapter_released_filter(n) for n in released)
    fusion_only = {t.format(i=i) for t in UNIADAPTER_FUSION_ONLY for i in range(L)}
    # the released filter freezes the cross-modal LayerNorm (its name holds "_m") and trains the rest
    assert {n for n in fusion_only if not uniadapter_released_filter(n)} == {
        f"adapters.{i}.adapter_layer_norm_cross_modal.{p}" for i in range(L) for p in ("weight", "bias")}
    trainable = {n for n, p in backbone.named_parameters() if p.requires_grad and not n.startswith("head.")}
    assert trainable == {our for our, _ in links}
    for i in range(L):  # the LayerNorm + down of depth i is one module shared by both towers
        text, image = backbone.layer("text", i), backbone.layer("image", i)
        assert text.output.parallel.down is image.parallel_adapter.down
    # By hand: per depth LN (2 x 64) + down (64 x 8 + 8) + two ups (8 x 64 + 64 each):
    # 2 x (128 + 520) + 2 x 2 x 576 = 1296 + 2304 = 3600.
    count = count_parameters(backbone)["method"]
    assert count == L * (2 * D + D * DOWN + DOWN) + M * L * (DOWN * D + D) == 3600


def test_uniadapter_code_released_init():
    """Down Kaiming-uniform (bound 1 / sqrt(D)) with zero bias, LayerNorm 1 / 0, the TEXT up zero
    (by name: the image tower comes first here), the image up N(0, 0.02) with zero bias (BERT's
    _init_weights, the last init that touches it before train_retrieval.py re-zeroes up_proj)."""
    torch.manual_seed(0)
    backbone = two_tower("tiny", num_classes=5, image_hidden=128, text_hidden=128, fusion_width=128)
    assert backbone.modalities[0] == "image"
    apply_method(backbone, "uniadapter", "code", down_dim=64)
    backbone.double()
    for i in range(2):
        text = backbone.layer("text", i).output.parallel
        image = backbone.layer("image", i).parallel_adapter
        assert text.down is image.down
        assert not torch.any(text.up.weight != 0) and not torch.any(text.up.bias != 0)
        up = image.up.weight.detach()
        assert not torch.any(image.up.bias != 0)
        assert abs(up.std().item() - 0.02) < 0.002, up.std()  # 8192 draws; nn.Linear's would be 0.072
        assert abs(up.mean().item()) < 0.002
        down = image.down.proj
        largest = down.weight.abs().max().item()
        assert 0.9 / math.sqrt(128) < largest <= 1 / math.sqrt(128)
        assert not torch.any(down.bias != 0)
        assert not torch.any(image.down.norm.weight != 1)
        assert not torch.any(image.down.norm.bias != 0)
