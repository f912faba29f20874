"""Transformer building blocks whose linears and adapter points are visible to PETL methods."""
from __future__ import annotations

import math

import torch
from torch import nn
import torch.nn.functional as F


class Attention(nn.Module):
    """Multi-head self-attention with separate q, k, v, o linears (so LoRA / Aurora can target each).

    It is ``F.scaled_dot_product_attention``, except on CPU for fewer than ``SHORT`` keys (the
    planted tasks' 12 tokens, the MMT video encoder's): there torch's softmax over a last dimension
    shorter than its 16-float vector costs about ten times as much as over 16, and SDPA with it, so
    ``short_cpu_attention`` writes the same math out with the keys padded to ``SHORT`` by masked
    zeros (1.55-1.68x faster forward + backward at 12 tokens of width 64, SDPA's answer to 1e-6;
    ``scripts/bench_overhead.py --only attention``).
    """

    SHORT = 16

    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.q = nn.Linear(width, width)
        self.k = nn.Linear(width, width)
        self.v = nn.Linear(width, width)
        self.o = nn.Linear(width, width)
        self.dropout = dropout

    def forward(self, x: torch.Tensor, key_padding: torch.Tensor | None) -> torch.Tensor:
        """``key_padding``: (B, L) bool, True = attend; a query attending to nothing gets zeros."""
        batch, length, width = x.shape
        dropout = self.dropout if self.training else 0.0
        q, k, v = self.q(x), self.k(x), self.v(x)
        if x.device.type == "cpu" and length < self.SHORT:
            out = short_cpu_attention(q, k, v, key_padding, self.heads, dropout, self.SHORT)
        else:
            def split(t: torch.Tensor) -> torch.Tensor:
                return t.view(batch, length, self.heads, width // self.heads).transpose(1, 2)

            mask = None if key_padding is None else key_padding[:, None, None, :]
            out = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=mask,
                                                 dropout_p=dropout).transpose(1, 2)
        return self.o(out.reshape(batch, length, width))


def short_cpu_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        key_padding: torch.Tensor | None, heads: int, dropout: float,
                        pad_keys_to: int) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) v of (B, L, W) projections -> (B, L, heads, W / heads),
    as batched matmuls over contiguous (B * heads, L, W / heads) blocks, with the keys padded by
    masked zeros to ``pad_keys_to`` (which changes neither the softmax nor the output)."""
    batch, length, width = q.shape
    head_dim, keys = width // heads, k.shape[1]
    if key_padding is None:
        key_padding = torch.ones(batch, keys, dtype=torch.bool, device=q.device)
    if keys < pad_keys_to:
        k, v = (F.pad(t, (0, 0, 0, pad_keys_to - keys)) for t in (k, v))
        key_padding = F.pad(key_padding, (0, pad_keys_to - keys), value=False)

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.view(batch, -1, heads, head_dim).transpose(1, 2).reshape(batch * heads, -1, head_dim)

    empty = ~key_padding.any(dim=1)  # such a query's scores stay finite and its output is zeroed
    blocked = ~(key_padding | empty[:, None])
    bias = torch.zeros(batch, 1, key_padding.shape[1], dtype=q.dtype, device=q.device)
    bias = bias.masked_fill_(blocked[:, None, :], float("-inf")).repeat_interleave(heads, dim=0)
    weights = torch.baddbmm(bias, split(q), split(k).transpose(1, 2), alpha=head_dim ** -0.5).softmax(dim=-1)
    if dropout:
        weights = F.dropout(weights, dropout)
    out = torch.bmm(weights, split(v)).view(batch, heads, length, head_dim).transpose(1, 2)
    return out.masked_fill(empty[:, None, None, None], 0.0) if empty.any() else out


class FeedForward(nn.Module):
    def __init__(self, width: int, multiplier: int, dropout: float):
        super().__init__()
        self.fc1 = nn.Linear(width, multiplier * width)
        self.fc2 = nn.Linear(multiplier * width, width)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.dropout(F.relu(self.fc1(x))))


class EncoderLayer(nn.Module):
    """Pre-LayerNorm transformer layer (MulT style) with an adapter slot after each sub-layer.

    ``attn_adapter`` / ``ffn_adapter`` see the sub-layer output before the residual add; they are
    ``nn.Identity`` until a method replaces them (Houlsby placement).
    """

    def __init__(self, width: int, heads: int, attn_dropout: float, relu_dropout: float,
                 res_dropout: float, ffn_multiplier: int = 4):
        super().__init__()
        self.attn_norm = nn.LayerNorm(width)
        self.attn = Attention(width, heads, attn_dropout)
        self.attn_adapter: nn.Module = nn.Identity()
        self.ffn_norm = nn.LayerNorm(width)
        self.ffn = FeedForward(width, ffn_multiplier, relu_dropout)
        self.ffn_adapter: nn.Module = nn.Identity()
        self.res_dropout = nn.Dropout(res_dropout)

    def forward(self, x: torch.Tensor, key_padding: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.res_dropout(self.attn_adapter(self.attn(self.attn_norm(x), key_padding)))
        return x + self.res_dropout(self.ffn_adapter(self.ffn(self.ffn_norm(x))))


def fairseq_sinusoidal_table(num_positions: int, width: int) -> torch.Tensor:
    """(num_positions, width) float32 sinusoidal table as in fairseq, used by MulT and the released
    Wander code (HalfMoon1008/WANDER models/position_embedding.py, ``get_embedding``): frequency
    i of ``width // 2`` is exp(-i log(10000) / (width // 2 - 1)); row p is [sin(p f), cos(p f)]
    (the sin half, then the cos half, not interleaved); an odd width gets a zero last column; row
    0 (the padding position) is all zeros. Computed in float32 as released; cast by the caller."""
    half = width // 2
    if half < 2:
        raise ValueError(f"the fairseq sinusoidal table needs a width >= 4, got {width}")
    frequency = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000) / (half - 1)))
    angle = torch.arange(num_positions, dtype=torch.float32)[:, None] * frequency[None, :]
    table = torch.cat([torch.sin(angle), torch.cos(angle)], dim=1)
    if width % 2:
        table = torch.cat([table, torch.zeros(num_positions, 1)], dim=1)
    table[0] = 0
    return table
