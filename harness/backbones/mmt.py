"""MMT: Multi-modal Transformer for video retrieval (Gabeur et al., ECCV 2020), the MSR-VTT /
HowTo100M backbone, implementing the method contract (methods/base.py).

Model
-----
Text: a BERT (transformers ``BertModel``, no pooler): pretrained where ``MMTConfig.text_model``
names a Hugging Face model id or a ``save_pretrained`` directory (``harness.backbones.pretrained``;
MMT's released code loads ``bert-base-cased``), else built from the ``text`` config with random
weights (the paper preset has BERT-base-cased's sizes). Its [CLS] output feeds, per expert e, a
gated embedding unit GEU_e (Linear(D_text -> D), context gating y * sigmoid(W y + b), L2 norm) and a mixture logit
a_e (Linear(D_text -> 1)).

Video: ONE joint transformer over ONE sequence

    [CLS; agg_1, tok_1_1 .. tok_1_T1; agg_2, tok_2_1 .. ; ...; agg_E, tok_E_1 .. tok_E_TE]

Each token is proj_e(feature) + type_e (the expert-type embedding) + time(t): ``proj_e`` maps the
expert's feature dim to the width D, ``time`` is an embedding over integer seconds (id 0 = the
aggregate token, 1 = unknown time, 2 + s = second s, clamped to the table). The aggregate token's
feature is the max over the expert's valid temporal features (or ``{e}_max`` if the batch has it).
The layers are ``harness.backbones.layers.EncoderLayer`` (pre-LN, q/k/v/o, fc1/fc2, adapter
slots) followed by a final LayerNorm; expert e's video embedding is the L2-normalised output of
its aggregate token.

Similarity of text i and video j (MMT's weighted sum over experts):

    s_ij = sum_e w_ije <t_ie, v_je>,   w_ij = softmax over the experts PRESENT in video j of a_i

Missing experts: ``present`` (B, E) (and ``mask_{e}`` (B, T) per token) mask the expert's tokens
out of attention (as keys; CLS is always a valid key), its features are replaced by zeros before
anything reads them (a NaN-filled absent expert is harmless), and its term leaves the similarity
(the mixture weights are renormalised over the present experts). An expert is effectively present
only if it is marked present AND has at least one valid temporal token.

Method contract on a joint encoder
----------------------------------
``modalities`` are the experts in use. Every expert is a SEGMENT of the joint sequence:
``hidden_size(e)`` = D, ``num_layers(e)`` = the video depth, ``seq_len(e)`` = 1 + max_tokens[e]
(aggregate token first; shorter inputs are padded to max_tokens and masked, so segment lengths are
fixed, as Wander's W_t needs).

- ``set_fusion_hook(depth, module)``: after layer ``depth`` (after the final LayerNorm for the last
  layer, as in ``LockstepBackbone``) the module gets ``{e: (B, seq_len(e), D)}`` split from the
  joint sequence; the returned segments are written back (CLS is not in any segment and stays).
- ``set_prompts(provider)``: the provider sees the per-expert segments as ``states``; its tokens
  are inserted into the joint sequence, all prepended in expert order ([P_1; ..; P_E; CLS; ...]),
  and removed after the layer; ``previous[e]`` holds the outputs at e's prompt positions. There are
  no position terms inside the layers, so where the prompts sit does not matter. A prompt of an
  expert absent from a sample is masked out of attention for that sample, like the expert's tokens.
- ``set_adapter(point, e, depth, module)``: each joint layer's adapter slot holds a
  ``SegmentAdapters`` module; the sub-layer output is split per segment and ``module`` runs on
  e's segment only (CLS, prompts and experts without an adapter pass unchanged). A module given for
  several experts may be the same object (shared weights, counted once).
- ``linear_sites()``: the joint layers' q/k/v/o/fc1/fc2 with modality ``"video"`` (shared by every
  expert, so no site belongs to one expert); with ``adapt_text=True`` also BERT's linears with
  modality ``"text"`` (query/key/value/attention.output.dense/intermediate.dense/output.dense as
  q/k/v/o/fc1/fc2). Default off: every other method (adapters, prompts, Wander) reaches only the
  video transformer, so LoRA / Aurora do too unless asked; and Aurora shares U, V across every
  site, which needs BERT's width to be a multiple of the video width (false at the paper preset).

Head (``head``): what every method trains, = the text-side task projection: the per-expert GEUs and
mixture logits. Paper preset: 7 x (768*512 + 512 + 512*512 + 512) + 7 x (768 + 1) = 4,600,071
parameters (4.6M), i.e. on its own ten times the Wander paper's MSR-VTT "#Tunable 0.4M" for
Wander d=8 (whose Wander part is 0.27M here). The paper's 0.4M therefore cannot include the GEUs;
a mixture-only head would be 5,383 parameters.

Deviations from MMT (stated for the tables): pre-LN layers with ReLU FFN (``layers.EncoderLayer``;
MMT's video BERT is post-LN with GELU); no LayerNorm on the embeddings; no batch norm in the
context gating; time ids from integer seconds (start of the token's window).

Batch keys: ``text`` (B, L) int ids, ``mask_text`` (B, L); per expert e: ``e`` (B, T, dim_e),
``{e}_time`` (B, T) int seconds (< 0 = unknown), ``mask_{e}`` (B, T) bool, and ``present`` (B, E)
bool in ``modalities`` order. Also accepted (the MSR-VTT loader's item layout): ``time_{e}``
(B, T, 2) start/end seconds, ``present_{e}`` (B,), ``{e}_max`` (B, dim_e). An expert missing from
the batch is absent for every sample. ``forward(batch)`` returns the (B_text, B_video) similarity.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
import torch.nn.functional as F

from harness.backbones.base import HookPoints
from harness.backbones.layers import EncoderLayer
from harness.errors import InputError
from methods.base import LinearSite, PromptProvider

ATTENTION_ROLES = ("q", "k", "v", "o")
FFN_ROLES = ("fc1", "fc2")
BERT_ROLES = {"attention.self.query": "q", "attention.self.key": "k", "attention.self.value": "v",
              "attention.output.dense": "o", "intermediate.dense": "fc1", "output.dense": "fc2"}

# The seven MMT experts of MSR-VTT and their feature dims (MMT's released features;
# datasets/msrvtt.yaml, experts).
EXPERT_DIMS = {"s3d": 1024, "vggish": 128, "face": 512, "rgb": 2048, "speech": 300, "ocr": 300,
               "scene": 2208}
ALL_EXPERTS = tuple(EXPERT_DIMS)
PRETRAIN_EXPERTS = ("s3d", "vggish")  # HowTo100M pre-training
TINY_EXPERT_DIMS = {"s3d": 16, "vggish": 8, "face": 12, "rgb": 24, "speech": 10, "ocr": 10,
                    "scene": 20}
TINY_MAX_TOKENS = {"s3d": 8, "vggish": 6, "face": 4, "rgb": 8, "speech": 5, "ocr": 3, "scene": 7}

TIME_AGG, TIME_UNKNOWN, TIME_OFFSET = 0, 1, 2  # ids of the time embedding table


def _tiny_text() -> dict:
    return dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=64, max_position_embeddings=32)


@dataclass
class MMTConfig:
    """``experts`` is the subset in use (backbone order); ``expert_dims`` / ``max_tokens`` may hold
    more. ``text`` are ``transformers.BertConfig`` keyword arguments. ``width`` is the video width
    and the joint text-video embedding size. ``time_embeddings`` is the size of the time table
    (2 reserved ids + seconds 0 .. time_embeddings - 3)."""

    experts: tuple[str, ...] = ALL_EXPERTS
    expert_dims: dict[str, int] = field(default_factory=lambda: dict(TINY_EXPERT_DIMS))
    max_tokens: dict[str, int] = field(default_factory=lambda: dict(TINY_MAX_TOKENS))
    text: dict = field(default_factory=_tiny_text)
    width: int = 32
    depth: int = 2
    heads: int = 4
    ffn_multiplier: int = 4
    time_embeddings: int = 16
    dropout: float = 0.1
    adapt_text: bool = False  # list BERT's linears in linear_sites() (modality "text")
    text_model: str | None = None  # pretrained BERT (HF id or directory); None = random from `text`

    @classmethod
    def tiny(cls, **overrides) -> "MMTConfig":
        return cls(**overrides)

    @classmethod
    def paper(cls, **overrides) -> "MMTConfig":
        """MMT on MSR-VTT: BERT-base-cased (vocab 28,996), 4 layers x 4 heads x 512, FFN 3072
        (MMT's released vid_bert config: intermediate_size 3072, max_position_embeddings 32),
        30 temporal tokens per expert."""
        values = dict(expert_dims=dict(EXPERT_DIMS), max_tokens={e: 30 for e in EXPERT_DIMS},
                      text=dict(vocab_size=28996), width=512, depth=4, heads=4, ffn_multiplier=6,
                      time_embeddings=32, dropout=0.1)
        return cls(**{**values, **overrides})

    def __post_init__(self):
        self.experts = tuple(self.experts)
        if not self.experts or len(set(self.experts)) != len(self.experts):
            raise ValueError(f"MMTConfig.experts must be a non-empty list of distinct names, "
                             f"got {list(self.experts)}")
        for name in ("expert_dims", "max_tokens"):
            table = getattr(self, name)
            missing = [e for e in self.experts if e not in table]
            if missing:
                raise ValueError(f"MMTConfig.{name} has no entry for expert(s) {missing}; "
                                 f"known: {sorted(table)}")
            bad = {e: table[e] for e in self.experts if not (isinstance(table[e], int) and table[e] > 0)}
            if bad:
                raise ValueError(f"MMTConfig.{name} must map every expert to an integer > 0, got {bad}")
        for name in ("width", "depth", "heads", "ffn_multiplier"):
            if getattr(self, name) <= 0:
                raise ValueError(f"MMTConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.width % self.heads:
            raise ValueError(f"MMTConfig.width {self.width} is not divisible by heads {self.heads}")
        if self.time_embeddings < TIME_OFFSET + 1:
            raise ValueError(f"MMTConfig.time_embeddings must be >= {TIME_OFFSET + 1}, "
                             f"got {self.time_embeddings}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"MMTConfig.dropout must be in [0, 1), got {self.dropout}")
        if not isinstance(self.text, dict):
            raise ValueError(f"MMTConfig.text must be a mapping of BertConfig arguments, got {self.text!r}")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):  # BERT's dropouts
            rate = self.text.get(name, 0.0)
            if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate < 1.0:
                raise ValueError(f"MMTConfig.text.{name} must be in [0, 1), got {rate!r}")


class GatedEmbeddingUnit(nn.Module):
    """Linear(in -> out), context gating y * sigmoid(W y + b), L2 norm (Miech et al. 2018)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.fc = nn.Linear(in_dim, out_dim)
        self.gate = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        return F.normalize(y * torch.sigmoid(self.gate(y)), dim=-1)


class TextHead(nn.Module):
    """The task head: per-expert GEUs and mixture logits on the text [CLS] output."""

    def __init__(self, experts: tuple[str, ...], text_dim: int, width: int):
        super().__init__()
        self.experts = experts
        self.units = nn.ModuleDict({e: GatedEmbeddingUnit(text_dim, width) for e in experts})
        self.mixture = nn.ModuleDict({e: nn.Linear(text_dim, 1) for e in experts})

    def forward(self, cls: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, D_text) -> embeddings (B, E, D) (unit norm), mixture logits (B, E)."""
        embeddings = torch.stack([self.units[e](cls) for e in self.experts], dim=1)
        logits = torch.cat([self.mixture[e](cls) for e in self.experts], dim=1)
        return embeddings, logits


class ExpertEmbedding(nn.Module):
    """proj: expert features -> width; type_embedding: the expert-type embedding (width,)."""

    def __init__(self, dim: int, width: int):
        super().__init__()
        self.proj = nn.Linear(dim, width)
        self.type_embedding = nn.Parameter(torch.randn(width) * 0.02)


class SegmentAdapters(nn.Module):
    """The adapter slot of a joint layer: ``adapters[e]`` runs on expert e's segment of the
    sub-layer output; every other token passes unchanged. ``layout`` ((name or None, length) pairs
    covering the sequence in order) is set by ``MMTBackbone`` before each layer call."""

    def __init__(self):
        super().__init__()
        self.adapters = nn.ModuleDict()
        self.layout: list[tuple[str | None, int]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.adapters) == 0:
            return x
        lengths = [n for _, n in self.layout]
        if sum(lengths) != x.shape[1]:
            raise RuntimeError(f"segment layout covers {sum(lengths)} tokens, the input has "
                               f"{x.shape[1]}")
        pieces = x.split(lengths, dim=1)
        return torch.cat([self.adapters[name](p) if name in self.adapters else p
                          for (name, _), p in zip(self.layout, pieces)], dim=1)


TEXT_CONFIG_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                      "intermediate_size", "max_position_embeddings", "type_vocab_size")


def pretrained_text_config(loaded) -> dict:
    """``MMTConfig.text`` for a pretrained text tower (a ``LoadedEncoder``): its BERT sizes."""
    return {k: getattr(loaded.model.config, k) for k in TEXT_CONFIG_FIELDS}


def build_text_tower(config: MMTConfig) -> nn.Module:
    """The text BERT: a copy of the pretrained ``config.text_model`` (its sizes must be those in
    ``config.text``; ``hidden_dropout_prob`` / ``attention_probs_dropout_prob`` there apply), or
    a random ``BertModel(BertConfig(**config.text))``."""
    from transformers import BertConfig, BertModel  # imported here: late-fusion runs never need it

    if not config.text_model:
        return BertModel(BertConfig(**config.text), add_pooling_layer=False)
    from harness.backbones.pretrained import load_encoder, with_dropout

    loaded = load_encoder(config.text_model, "bert", key="MMTConfig.text_model")
    expected = pretrained_text_config(loaded)
    differ = {k: (config.text[k], v) for k, v in expected.items()
              if k in config.text and config.text[k] != v}
    if differ:
        raise ValueError(f"MMTConfig.text differs from the pretrained text tower "
                         f"{config.text_model!r}: " + ", ".join(
                             f"{k} = {a!r}, the model has {b!r}" for k, (a, b) in differ.items()))
    model = loaded.model_copy()
    dropout = config.text.get("hidden_dropout_prob")
    if dropout is not None:
        with_dropout(model, dropout)
    model.load_report = {**loaded.load_report, **loaded.identity()}
    return model


class MMTBackbone(HookPoints, nn.Module):
    activation = "relu"  # the joint layers' FFN nonlinearity (layers.FeedForward)

    def __init__(self, config: MMTConfig):
        super().__init__()
        self.config = config
        self.modalities = config.experts
        D = config.width
        self.text = build_text_tower(config)
        text_dim = self.text.config.hidden_size
        self.experts = nn.ModuleDict(
            {e: ExpertEmbedding(config.expert_dims[e], D) for e in self.modalities})
        self.cls_token = nn.Parameter(torch.randn(D) * 0.02)
        self.time_embedding = nn.Embedding(config.time_embeddings, D)
        nn.init.normal_(self.time_embedding.weight, std=0.02)
        self.embed_dropout = nn.Dropout(config.dropout)
        self.layers = nn.ModuleList(
            EncoderLayer(D, config.heads, config.dropout, config.dropout, config.dropout,
                         config.ffn_multiplier) for _ in range(config.depth))
        for layer in self.layers:
            layer.attn_adapter = SegmentAdapters()
            layer.ffn_adapter = SegmentAdapters()
        self.final_norm = nn.LayerNorm(D)
        self.head = TextHead(self.modalities, text_dim, D)
        self.prompts: PromptProvider | None = None
        self.fusion_hooks = nn.ModuleDict()

    # --- the method contract ----------------------------------------------------------------
    def _check_expert(self, modality: str) -> None:
        if modality not in self.modalities:
            raise KeyError(f"unknown expert {modality!r}; this MMT has {list(self.modalities)}")

    def hidden_size(self, modality: str) -> int:
        self._check_expert(modality)
        return self.config.width

    def num_layers(self, modality: str) -> int:
        self._check_expert(modality)
        return self.config.depth

    def seq_len(self, modality: str) -> int:
        self._check_expert(modality)
        return 1 + self.config.max_tokens[modality]

    @property
    def depth(self) -> int:
        return self.config.depth

    def linear_sites(self) -> list[LinearSite]:
        sites = []
        for depth in range(self.config.depth):
            prefix = f"layers.{depth}"
            sites += [LinearSite(f"{prefix}.attn.{r}", "video", depth, r) for r in ATTENTION_ROLES]
            sites += [LinearSite(f"{prefix}.ffn.{r}", "video", depth, r) for r in FFN_ROLES]
        if self.config.adapt_text:
            for depth in range(self.text.config.num_hidden_layers):
                prefix = f"text.encoder.layer.{depth}"
                sites += [LinearSite(f"{prefix}.{path}", "text", depth, role)
                          for path, role in BERT_ROLES.items()]
        return sites

    def set_adapter(self, point: str, modality: str, depth: int, module: nn.Module) -> None:
        if point not in ("attn", "ffn"):
            raise ValueError(f"adapter point must be 'attn' or 'ffn', got {point!r}")
        self._check_expert(modality)
        if not 0 <= depth < self.depth:
            raise ValueError(f"adapter depth must be in [0, {self.depth}), got {depth}")
        getattr(self.layers[depth], f"{point}_adapter").adapters[modality] = module

    # --- inputs -------------------------------------------------------------------------------
    def _batch_size(self, batch: dict) -> int:
        if "present" in batch:
            return batch["present"].shape[0]
        for e in self.modalities:
            if e in batch:
                return batch[e].shape[0]
        raise InputError("the batch holds no expert features and no 'present' mask", key="present",
                         expected=f"one of {list(self.modalities)}", found=sorted(batch))

    def _presence(self, batch: dict, B: int, device) -> torch.Tensor:
        if "present" in batch:
            present = batch["present"].to(device=device, dtype=torch.bool)
            if present.shape != (B, len(self.modalities)):
                raise InputError("presence mask of the wrong shape", key="present",
                                 expected=(B, len(self.modalities)), found=tuple(present.shape))
            return present
        columns = []
        for e in self.modalities:
            if f"present_{e}" in batch:
                columns.append(batch[f"present_{e}"].to(device=device, dtype=torch.bool).reshape(B))
            else:
                columns.append(torch.full((B,), e in batch, dtype=torch.bool, device=device))
        return torch.stack(columns, dim=1)

    def _time_ids(self, batch: dict, e: str, B: int, T: int, device) -> torch.Tensor:
        if f"{e}_time" in batch:
            seconds = batch[f"{e}_time"]
        elif f"time_{e}" in batch:  # (B, T, 2) start / end seconds: the start second
            seconds = batch[f"time_{e}"][..., 0]
        else:
            return torch.full((B, T), TIME_UNKNOWN, dtype=torch.long, device=device)
        seconds = seconds.to(device)
        if seconds.shape != (B, T):
            raise InputError("expert times of the wrong shape", key=f"{e}_time",
                             expected=(B, T), found=tuple(seconds.shape))
        if seconds.is_floating_point():
            seconds = torch.nan_to_num(seconds, nan=-1.0).floor()
        seconds = seconds.long()
        ids = TIME_OFFSET + seconds.clamp(0, self.config.time_embeddings - 1 - TIME_OFFSET)
        return torch.where(seconds < 0, torch.full_like(ids, TIME_UNKNOWN), ids)

    def embed_video(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Joint input tokens (B, N, D), key mask (B, N) (True = attend) and effective presence
        (B, E). N = 1 + sum_e seq_len(e)."""
        device = self.cls_token.device
        B = self._batch_size(batch)
        present = self._presence(batch, B, device)
        tokens = [self.cls_token.expand(B, 1, -1)]
        valid = [torch.ones(B, 1, dtype=torch.bool, device=device)]
        effective = []
        for k, e in enumerate(self.modalities):
            dim, L = self.config.expert_dims[e], self.config.max_tokens[e]
            if e in batch:
                x = batch[e].to(device=device, dtype=self.cls_token.dtype)
                if x.dim() != 3 or x.shape[0] != B or x.shape[2] != dim or x.shape[1] > L:
                    raise InputError("expert features of the wrong shape", key=e,
                                     expected=f"(B={B}, T<={L}, {dim})", found=tuple(x.shape))
            else:
                x = torch.zeros(B, 0, dim, device=device, dtype=self.cls_token.dtype)
            T = x.shape[1]
            mask = batch.get(f"mask_{e}") if e in batch else None
            mask = (torch.ones(B, T, dtype=torch.bool, device=device) if mask is None
                    else mask.to(device=device, dtype=torch.bool))
            if mask.shape != (B, T):
                raise InputError("expert token mask of the wrong shape", key=f"mask_{e}",
                                 expected=(B, T), found=tuple(mask.shape))
            ok = mask & present[:, k, None]
            x = torch.where(ok[..., None], x, torch.zeros((), dtype=x.dtype, device=device))
            if not torch.isfinite(x).all():
                raise InputError("non-finite features in a present expert's valid tokens", key=e,
                                 expected="finite values (mark the expert absent instead)",
                                 found="NaN or inf")
            here = present[:, k] & ok.any(dim=1)
            effective.append(here)
            if f"{e}_max" in batch:
                pooled = batch[f"{e}_max"].to(device=device, dtype=x.dtype)
                pooled = torch.where(here[:, None], pooled, torch.zeros((), dtype=x.dtype, device=device))
            else:
                pooled = x.masked_fill(~ok[..., None], float("-inf")).amax(dim=1) if T else \
                    torch.zeros(B, dim, dtype=x.dtype, device=device)
                pooled = torch.where(here[:, None], pooled, torch.zeros((), dtype=x.dtype, device=device))
            if not torch.isfinite(pooled).all():
                raise InputError("non-finite pooled features in a present expert", key=f"{e}_max",
                                 expected="finite values", found="NaN or inf")
            time = (self._time_ids(batch, e, B, T, device) if e in batch
                    else torch.zeros(B, 0, dtype=torch.long, device=device))
            pad = L - T
            x = F.pad(x, (0, 0, 0, pad))
            ok = F.pad(ok, (0, pad), value=False)
            time = F.pad(time, (0, pad), value=TIME_UNKNOWN)
            time = torch.cat([torch.full((B, 1), TIME_AGG, dtype=torch.long, device=device), time], 1)
            expert = self.experts[e]
            segment = expert.proj(torch.cat([pooled[:, None], x], dim=1))
            tokens.append(segment + expert.type_embedding + self.time_embedding(time))
            valid.append(torch.cat([here[:, None], ok], dim=1))
        return (self.embed_dropout(torch.cat(tokens, dim=1)), torch.cat(valid, dim=1),
                torch.stack(effective, dim=1))

    # --- encoders ------------------------------------------------------------------------------
    def _segments(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """{e: (B, seq_len(e), D)} of a joint sequence [CLS; segments...] (no prompts)."""
        pieces = x[:, 1:].split([self.seq_len(e) for e in self.modalities], dim=1)
        return dict(zip(self.modalities, pieces))

    def _join(self, cls: torch.Tensor, segments: dict[str, torch.Tensor]) -> torch.Tensor:
        for e in self.modalities:
            if segments[e].shape != (cls.shape[0], self.seq_len(e), cls.shape[2]):
                raise RuntimeError(f"fusion hook returned {tuple(segments[e].shape)} for expert "
                                   f"{e!r}; expected {(cls.shape[0], self.seq_len(e), cls.shape[2])}")
        return torch.cat([cls] + [segments[e] for e in self.modalities], dim=1)

    def encode_video(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-expert video embeddings (B, E, D) (unit norm) and effective presence (B, E)."""
        x, valid, present = self.embed_video(batch)
        layout = [(None, 1)] + [(e, self.seq_len(e)) for e in self.modalities]
        previous: dict[str, torch.Tensor] = {}
        for depth, layer in enumerate(self.layers):
            extra = self.prompts(depth, self._segments(x), previous) if self.prompts is not None else {}
            order = [(k, e) for k, e in enumerate(self.modalities) if extra.get(e) is not None]
            h, mask, lay, sizes = x, valid, layout, []
            if order:
                sizes = [extra[e].shape[1] for _, e in order]
                prompt_mask = [present[:, k, None].expand(-1, n) for (k, _), n in zip(order, sizes)]
                h = torch.cat([extra[e] for _, e in order] + [x], dim=1)
                mask = torch.cat(prompt_mask + [valid], dim=1)
                lay = [(None, sum(sizes))] + layout
            for slot in (layer.attn_adapter, layer.ffn_adapter):
                if isinstance(slot, SegmentAdapters):
                    slot.layout = lay
            h = layer(h, mask)
            previous = {}
            if order:
                parts = h.split(sizes + [x.shape[1]], dim=1)
                previous = {e: p for (_, e), p in zip(order, parts)}
                h = parts[-1]
            x = h
            if depth == self.depth - 1:
                x = self.final_norm(x)
            if str(depth) in self.fusion_hooks:
                x = self._join(x[:, :1], self.fusion_hooks[str(depth)](self._segments(x)))
        offsets = [1 + sum(self.seq_len(f) for f in self.modalities[:k]) for k in range(len(self.modalities))]
        return F.normalize(x[:, offsets], dim=-1), present

    def encode_text(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-expert text embeddings (B, E, D) (unit norm) and mixture logits (B, E)."""
        ids = batch["text"]
        mask = batch.get("mask_text")
        mask = None if mask is None else mask.to(device=ids.device, dtype=torch.long)
        cls = self.text(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0]
        return self.head(cls)

    @staticmethod
    def expert_terms(text: torch.Tensor, video: torch.Tensor) -> torch.Tensor:
        """<t_ie, v_je>: (B_text, B_video, E)."""
        return torch.einsum("ied,jed->ije", text, video)

    @staticmethod
    def mixture_weights(logits: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """Softmax of the text's logits over the experts present in each video: (B_t, B_v, E);
        all zero for a video with no expert."""
        pair = logits[:, None, :].masked_fill(~present[None], torch.finfo(logits.dtype).min)
        return torch.softmax(pair, dim=-1) * present[None].to(logits.dtype)

    @classmethod
    def similarity(cls, text: torch.Tensor, logits: torch.Tensor, video: torch.Tensor,
                   present: torch.Tensor) -> torch.Tensor:
        return (cls.mixture_weights(logits, present) * cls.expert_terms(text, video)).sum(-1)

    def forward(self, batch: dict) -> torch.Tensor:
        text, logits = self.encode_text(batch)
        video, present = self.encode_video(batch)
        return self.similarity(text, logits, video, present)

    # --- checkpoints ---------------------------------------------------------------------------
    def expert_keys(self, expert: str) -> list[str]:
        """State-dict keys that belong to one expert (its embedding, GEU, mixture logit, and any
        per-expert adapter): what a checkpoint without that expert lacks."""
        return [k for k in self.state_dict() if expert in k.split(".")]


def random_batch(backbone: MMTBackbone, batch_size: int = 4, seed: int = 0,
                 text_len: int = 7) -> dict:
    """A batch of the documented layout with padding, times, and every expert absent from one
    sample (a rotating pattern; each expert stays present in the others when batch_size > 1)."""
    g = torch.Generator().manual_seed(seed)
    config = backbone.config
    vocab = backbone.text.config.vocab_size
    batch = {"text": torch.randint(1, vocab, (batch_size, text_len), generator=g)}
    lengths = torch.randint(2, text_len + 1, (batch_size,), generator=g)
    batch["mask_text"] = torch.arange(text_len)[None] < lengths[:, None]
    present = torch.ones(batch_size, len(backbone.modalities), dtype=torch.bool)
    for k, e in enumerate(backbone.modalities):
        L, dim = config.max_tokens[e], config.expert_dims[e]
        T = max(1, L - k % 2)  # some experts arrive shorter than their segment
        batch[e] = torch.randn(batch_size, T, dim, generator=g)
        batch[f"{e}_time"] = torch.arange(T)[None].expand(batch_size, -1).clone()
        n = torch.randint(1, T + 1, (batch_size,), generator=g)
        batch[f"mask_{e}"] = torch.arange(T)[None] < n[:, None]
        if batch_size > 1:
            present[k % batch_size, k] = False
    batch["present"] = present
    return batch


__all__ = ["ALL_EXPERTS", "EXPERT_DIMS", "PRETRAIN_EXPERTS", "GatedEmbeddingUnit", "MMTBackbone",
           "MMTConfig", "SegmentAdapters", "TextHead", "random_batch"]
