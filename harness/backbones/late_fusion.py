"""Late-fusion backbone for MOSI / IEMOCAP / MOSEI, as released with the Wander code (MulT-style
encoders; HalfMoon1008/WANDER ``models/model.py`` Latefusion, ``models/transformer.py``,
``models/position_embedding.py``, ``models/multihead_attention.py``).

Per modality, as released: Conv1d(k=1, with bias) to a shared width; sqrt(width) * x plus fairseq
sinusoidal positions (``layers.fairseq_sinusoidal_table``: sin half then cos half; positions 1..T;
a step whose first projected channel is exactly 0 counts as padding and gets the zero row 0, the
released ``make_positions`` with ``padding_idx = 0`` on ``x[..., 0]``); embedding dropout; pre-LN
layers (attention, dropout, residual; LayerNorm, fc1 4x, ReLU, dropout, fc2, dropout, residual)
and a final LayerNorm.

Heads: the default (``head_choice == "default"``) is MulT's proj1 / proj2 with residual / out_layer
on the concatenation of every modality's first token. ``set_head("wander_released")`` installs the
released Wander model's head (``AdapterModel``): the first token of the concatenated sequences after
the last fusion hook (the fused token 0), repeated M times, into ``ReleasedHead`` (the released
out_layer_proj0 / proj1 / proj2 / out_layer).

Remaining differences from the released code (the computation is otherwise the same, tested in
float64 by tests/test_released_wander_late_fusion.py):

- parameter names and layout: q, k, v are separate linears (``attn.q`` ...) where the released code
  holds one ``in_proj_weight`` (3D, D) and ``in_proj_bias``; ``released_to_ours`` converts a
  released state dict (Latefusion or AdapterModel) to ours, so a released checkpoint loads;
- the default head is MulT's (M*D -> M*D -> M*D -> out); the released Latefusion's own head is the
  ``ReleasedHead`` shape on every modality's first token (M*D -> D -> D -> D -> out); our
  pre-training trains the default head, so the released head starts fresh where the released
  code loads its pre-trained out_layer_proj* weights;
- key padding: where the loader marks padded steps (``mask_<m>`` False: unaligned data) our
  attention ignores them; the released attention has no mask and attends to every step
  (aligned MOSI / IEMOCAP pickles: every step is real, so the two agree);
- attention is ``scaled_dot_product_attention``, or on CPU for fewer than 16 steps the same math
  written out (``layers.Attention``); both the released q * d^-1/2, softmax, dropout, bmm, equal to
  rounding.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn
import torch.nn.functional as F

from harness.backbones.base import LockstepBackbone
from harness.backbones.layers import EncoderLayer, fairseq_sinusoidal_table
from methods.base import RELEASED_WANDER_HEAD


@dataclass
class LateFusionConfig:
    input_dims: dict[str, int] = field(default_factory=lambda: {"text": 32, "audio": 8, "vision": 12})
    seq_lens: dict[str, int] = field(default_factory=lambda: {"text": 16, "audio": 16, "vision": 16})
    width: int = 40
    depth: int = 2
    heads: int = 8
    output_dim: int = 1
    attn_dropout: float = 0.2
    relu_dropout: float = 0.2
    embed_dropout: float = 0.15
    res_dropout: float = 0.2
    out_dropout: float = 0.1

    def __post_init__(self):
        if len(self.input_dims) < 2:
            raise ValueError(f"late_fusion needs >= 2 modalities, got {list(self.input_dims)}")
        if set(self.input_dims) != set(self.seq_lens):
            raise ValueError(f"input_dims modalities {sorted(self.input_dims)} differ from "
                             f"seq_lens modalities {sorted(self.seq_lens)}")
        for name in ("width", "depth", "heads", "output_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"LateFusionConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.width % self.heads:
            raise ValueError(f"LateFusionConfig.width {self.width} is not divisible by heads {self.heads}")
        for name in ("attn_dropout", "relu_dropout", "embed_dropout", "res_dropout", "out_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"LateFusionConfig.{name} must be a dropout rate in [0, 1), "
                                 f"got {getattr(self, name)}")


# The backbone as released with the Wander code (its MOSI run settings): 32 layers, width 40, on
# the MMSA aligned features (BERT text 768, audio 5, vision 20, 50 tokens; datasets/mosi.yaml).
PAPER_MOSI = dict(input_dims={"text": 768, "audio": 5, "vision": 20},
                  seq_lens={"text": 50, "audio": 50, "vision": 50}, width=40, depth=32, heads=8)


class MLPHead(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, dropout: float):
        super().__init__()
        self.proj1 = nn.Linear(in_dim, in_dim)
        self.proj2 = nn.Linear(in_dim, in_dim)
        self.out = nn.Linear(in_dim, out_dim)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.proj2(F.dropout(F.relu(self.proj1(x)), p=self.dropout, training=self.training))
        return self.out(hidden + x)


class ReleasedHead(nn.Module):
    """The released Latefusion / AdapterModel head (``out_layer_proj0``, ``out_layer_proj1``,
    ``out_layer_proj2``, ``out_layer``; HalfMoon1008/WANDER models/model.py ``get_res``):
    h = relu(proj0(x)); out(proj2(dropout(relu(proj1(h)))) + h). proj0 takes M * width (the
    released code hard-codes 3 modalities)."""

    def __init__(self, in_dim: int, width: int, out_dim: int, dropout: float):
        super().__init__()
        self.proj0 = nn.Linear(in_dim, width)
        self.proj1 = nn.Linear(width, width)
        self.proj2 = nn.Linear(width, width)
        self.out = nn.Linear(width, out_dim)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = F.relu(self.proj0(x))
        mixed = self.proj2(F.dropout(F.relu(self.proj1(hidden)), p=self.dropout, training=self.training))
        return self.out(mixed + hidden)


class LateFusionBackbone(LockstepBackbone):
    activation = "relu"  # the encoders' FFN nonlinearity (what Wander's paper variant uses)
    head_options = (RELEASED_WANDER_HEAD,)

    def __init__(self, config: LateFusionConfig):
        super().__init__()
        self.config = config
        self.modalities = tuple(config.input_dims)
        w = config.width
        self.projections = nn.ModuleDict(
            {m: nn.Conv1d(d, w, kernel_size=1) for m, d in config.input_dims.items()})
        self.encoders = nn.ModuleDict({
            m: nn.ModuleList(EncoderLayer(w, config.heads, config.attn_dropout, config.relu_dropout,
                                          config.res_dropout) for _ in range(config.depth))
            for m in self.modalities})
        self.final_norms = nn.ModuleDict({m: nn.LayerNorm(w) for m in self.modalities})
        # Row 0 is the padding row; a sequence of T steps reads rows 1..T.
        self.register_buffer("positions", fairseq_sinusoidal_table(max(config.seq_lens.values()) + 1, w),
                             persistent=False)
        self.head = MLPHead(w * len(self.modalities), config.output_dim, config.out_dropout)

    def seq_len(self, modality: str) -> int:
        return self.config.seq_lens[modality]

    def make_head(self, name: str) -> nn.Module:
        assert name == RELEASED_WANDER_HEAD, name
        c = self.config
        return ReleasedHead(c.width * len(self.modalities), c.width, c.output_dim, c.out_dropout)

    def embed(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        states = {}
        for m in self.modalities:
            x = self.projections[m](batch[m].transpose(1, 2)).transpose(1, 2)
            length = x.shape[1]
            table = self.positions
            if length + 1 > table.shape[0]:  # longer than configured: the released code extends it
                table = fairseq_sinusoidal_table(length + 1, self.config.width).to(x.device)
            index = torch.arange(1, length + 1, device=x.device).expand(x.shape[0], length)
            index = torch.where(x[..., 0] != 0, index, torch.zeros_like(index))  # padding: row 0
            x = math.sqrt(self.config.width) * x + table.to(x.dtype)[index]
            states[m] = F.dropout(x, p=self.config.embed_dropout, training=self.training)
        return states

    def pool(self, states: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.head_choice == RELEASED_WANDER_HEAD:  # fused token 0, once per modality
            first = states[self.modalities[0]][:, 0]
            return torch.cat([first] * len(self.modalities), dim=-1)
        return torch.cat([states[m][:, 0] for m in self.modalities], dim=-1)


def released_to_ours(state: dict[str, torch.Tensor], modalities: tuple[str, ...],
                     depth: int) -> dict[str, torch.Tensor]:
    """A released state dict (HalfMoon1008/WANDER models/model.py: ``Latefusion`` keys, or
    ``AdapterModel`` keys under ``basemodel.`` and ``adapter.``) with our names: modality i of the
    released lists is ``modalities[i]``; ``in_proj_weight`` / ``in_proj_bias`` split into q, k, v
    (rows 0:D, D:2D, 2D:3D, released ``in_proj_q/k/v``); the head keys become ``head.proj0/1/2``
    and ``head.out`` (the ``wander_released`` head's names); the Wander adapter (models/adapter.py)
    goes to the last depth's fusion hook (``w_h``, ``w_t`` are the released ``factor_dim_list`` /
    ``factor_t_list`` with the last two axes swapped). Buffers (``version``, ``_float_tensor``) are
    dropped."""
    hook = f"fusion_hooks.{depth - 1}"
    head = {"out_layer_proj0": "head.proj0", "out_layer_proj1": "head.proj1",
            "out_layer_proj2": "head.proj2", "out_layer": "head.out"}
    layer = {"self_attn.out_proj": "attn.o", "fc1": "ffn.fc1", "fc2": "ffn.fc2",
             "layer_norms.0": "attn_norm", "layer_norms.1": "ffn_norm"}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        name = key.removeprefix("basemodel.")
        parts = name.split(".")
        if name.endswith(("version", "_float_tensor")):
            continue
        if name.startswith("adapter."):
            kind, i, rest = parts[1], int(parts[2]), parts[3:]
            m = modalities[i]
            if kind == "down":
                out[f"{hook}.down.{m}.{rest[0]}"] = value
            elif kind == "factor_dim_list":
                out[f"{hook}.w_h.{m}"] = value.transpose(1, 2)
            elif kind == "factor_t_list":
                out[f"{hook}.w_t.{m}"] = value.transpose(1, 2)
            else:
                raise KeyError(f"unknown released adapter key {key!r}")
        elif parts[0] == "proj":
            out[f"projections.{modalities[int(parts[1])]}.{parts[2]}"] = value
        elif parts[0] in head:
            out[f"{head[parts[0]]}.{parts[1]}"] = value
        elif parts[0] == "encoders" and parts[2] == "layer_norm":
            out[f"final_norms.{modalities[int(parts[1])]}.{parts[3]}"] = value
        elif parts[0] == "encoders" and parts[2] == "layers":
            prefix = f"encoders.{modalities[int(parts[1])]}.{parts[3]}"
            inner = ".".join(parts[4:])
            if inner in ("self_attn.in_proj_weight", "self_attn.in_proj_bias"):
                kind = inner.rsplit("_", 1)[1]
                for role, chunk in zip("qkv", value.chunk(3, dim=0)):
                    out[f"{prefix}.attn.{role}.{kind}"] = chunk
            else:
                module, leaf = inner.rsplit(".", 1)
                if module not in layer:
                    raise KeyError(f"unknown released layer key {key!r}")
                out[f"{prefix}.{layer[module]}.{leaf}"] = value
        else:
            raise KeyError(f"unknown released key {key!r}")
    return out
