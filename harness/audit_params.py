"""Parameter audit: every #Tunable the papers print, next to our count of the same row.

For each printed number (Wander Tables 1-5; the Aurora and UniAdapter papers' BLIP-base counts) the
row's backbone is built from its config with random weights (no download), the row's method is
attached with the row's settings through ``methods.apply_method`` and the trainable parameters are
counted with ``methods.count_parameters`` (method / head split; the tables' #Tunable is the sum).

Backbones (paper sizes):

- ``food101``: ``TwoTowerConfig.paper()``: ViT-B/16 (224) + BERT-base (50 tokens), a 2-layer 768-d
  fusion transformer and an MLP head (the fusion transformer is part of ``head``: every method
  trains it; that is OUR head for the methods, NOT what the released Wander code does). Wander's
  ``code`` rows count the released FoodModelWander (HalfMoon1008/WANDER models/foodmodel.py): its
  fusion transformer is frozen (0 of 14,177,280 trainable), Wander runs after it and only the
  adapter, ``proj1`` and ``out_layer`` train (head 768*768+768 + 768*101+101 = 668,261).
- ``mosi``: the released late-fusion backbone (``PAPER_MOSI``: width 40, 32 layers, 8 heads; input
  dims text 768, audio 5, vision 20 (MMSA BERT features, ``datasets/mosi.yaml`` typical_dims.mmsa); 50 aligned tokens),
  output 1 (regression).
- ``iemocap``: the same backbone with the MulT IEMOCAP feature dims text 300, audio 74, vision 35
  (source: ``datasets/iemocap.yaml``, ``typical_dims.mult``) and 20 tokens per modality (MulT's word-aligned IEMOCAP pickles; an assumption, the card
  lists no MulT lengths), output 8 (4 emotions x 2, the MulT layout of ``harness.tasks``).
- ``msrvtt``: ``MMTConfig.paper()`` with its 7 experts (BERT-base-cased text, 4 x 512 video
  transformer, 30 temporal tokens + 1 aggregate token per expert).
- ``blip_base`` (Aurora / UniAdapter papers): NOT built (we have no BLIP layout). Where the method
  module's own classes give a meaningful closed form for the BLIP-base layout (12 layers, width
  768, visual + textual encoders and a cross-attention multimodal encoder of 12 layers sharing the
  text layers' depth), the count is made from those classes (status ``closed_form``): UniAdapter
  (``code`` variant: per-depth shared LayerNorm + down, ReLU, biases, visual / text / cross-modal
  ups and the cross-modal LayerNorm) and Aurora (``paper`` variant: global U, V, a (p, lambda) pair
  per q/k/v matrix, 9 matrices per layer as in Aurora's own formula L x (3 + 6), plus the 2 D
  gated-query parameters per fusion layer). LoRA's BLIP count is the peft formula (2 r D per
  768 x 768 matrix, no bias) over the same 108 q/k/v matrices.

Construction runs on the ``meta`` device by default: shapes and ``requires_grad`` are all a count
needs, so the paper-size backbones (up to 210M parameters) cost no memory and the whole audit runs
in seconds; ``device="cpu"`` builds real (random) tensors and gives the same counts.

A row whose settings a backbone refuses (Adapter d = 64 on the width-40 late-fusion backbone:
down_dim > hidden; Wander d = 64 on IEMOCAP: d_t = d = 64 fused tokens exceed the 3 x 20 tokens the
residual adds to, which the released code cannot run either) is reported with status
``infeasible``, the ConfigError message and, where the modules can still be built with the check
lifted, that count as ``unchecked_total`` (information only; such a model would not run or would
not be a bottleneck). Wander accepts d > width (the released code runs d = 64 on width 40).

Wander's late-fusion rows are counted twice: the ``paper`` variant (R_h = R_t = 8, the backbone's
MulT head) and the ``code`` variant (the released model, HalfMoon1008/WANDER models/model.py
AdapterModel with run/mosi_run.py defaults drank 8, trank 12: the adapter plus the released head
M*40 -> 40 -> 40 -> 40 -> out on the fused token 0); each code row names the paper variant's count.
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from harness.tables import specs
from methods import ConfigError, count_parameters, get_method
from methods.base import freeze, trainable_head
from methods.registry import apply_method

# --- construction -----------------------------------------------------------------------------
_INIT_OPS = {torch.Tensor.uniform_, torch.Tensor.normal_, torch.Tensor.zero_, torch.Tensor.fill_,
             torch.Tensor.random_, torch.Tensor.copy_}
_INIT_OPS |= {getattr(nn.init, name) for name in (
    "uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_",
    "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_",
    "sparse_") if hasattr(nn.init, name)}


class _SkipMetaInit(TorchFunctionMode):
    """In-place initialisation of a meta tensor is a no-op anyway; skipping it at the Python level
    avoids the slow meta decompositions (3-4x faster construction of the 96-layer backbones)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        target = args[0] if args else (kwargs or {}).get("tensor")
        if func in _INIT_OPS and isinstance(target, torch.Tensor) and target.is_meta:
            return target
        return func(*args, **(kwargs or {}))


@contextmanager
def building(device: str):
    """Construct modules on ``device`` ("meta": shapes only, no memory, no init)."""
    with torch.device(device):
        if torch.device(device).type == "meta":
            with _SkipMetaInit():
                yield
        else:
            yield


# --- backbones --------------------------------------------------------------------------------
WIDTH, DEPTH, HEADS = 40, 32, 8  # the released late-fusion backbone (PAPER_MOSI)
IEMOCAP_MULT_DIMS = {"text": 300, "audio": 74, "vision": 35}   # datasets/iemocap.yaml typical_dims.mult
IEMOCAP_MULT_LENGTHS = {"text": 20, "audio": 20, "vision": 20}  # MulT aligned pickles (assumption)
BLIP = dict(layers=12, width=768)  # BLIP-base: ViT-B/16 + BERT-base (text / multimodal encoder)


def _late_fusion(dims: dict, lengths: dict, output_dim: int) -> nn.Module:
    from harness.backbones.late_fusion import LateFusionBackbone, LateFusionConfig

    return LateFusionBackbone(LateFusionConfig(input_dims=dict(dims), seq_lens=dict(lengths),
                                               width=WIDTH, depth=DEPTH, heads=HEADS,
                                               output_dim=output_dim))


def _mosi() -> nn.Module:
    from harness.backbones.late_fusion import PAPER_MOSI

    return _late_fusion(PAPER_MOSI["input_dims"], PAPER_MOSI["seq_lens"], 1)


def _iemocap() -> nn.Module:
    return _late_fusion(IEMOCAP_MULT_DIMS, IEMOCAP_MULT_LENGTHS, 8)


def _food101() -> nn.Module:
    from harness.backbones.two_tower import TwoTowerBackbone, TwoTowerConfig

    return TwoTowerBackbone(TwoTowerConfig.paper())


def _msrvtt() -> nn.Module:
    from harness.backbones.mmt import MMTBackbone, MMTConfig

    return MMTBackbone(MMTConfig.paper())


@dataclass(frozen=True)
class BackboneSpec:
    build: Callable[[], nn.Module]
    description: str


BACKBONES: dict[str, BackboneSpec] = {
    "food101": BackboneSpec(_food101, "two-tower paper preset: ViT-B/16 + BERT-base, 2 x 768 fusion "
                                      "transformer + MLP head, 101 classes"),
    "mosi": BackboneSpec(_mosi, "late fusion, released size: width 40, 32 layers, 8 heads; dims "
                                "text 768 / audio 5 / vision 20, 50 tokens each; output 1"),
    "iemocap": BackboneSpec(_iemocap, "late fusion, released size: width 40, 32 layers, 8 heads; "
                                      "MulT IEMOCAP dims text 300 / audio 74 / vision 35, 20 tokens "
                                      "each; output 8"),
    "msrvtt": BackboneSpec(_msrvtt, "MMT paper preset: BERT-base-cased + 4 x 512 video "
                                    "transformer, 7 experts x (1 + 30) tokens"),
}


def _numel(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())


@lru_cache(maxsize=None)
def _anatomy(kind: str, device: str) -> dict[str, int]:
    """Sizes of a backbone's parts, for the explanations (built once per kind)."""
    with building(device):
        b = BACKBONES[kind].build()
    total = _numel(b)
    head = _numel(b.head)
    parts = {"total": total, "head": head, "frozen": total - head}
    if kind == "food101":
        parts["image_tower"] = _numel(b.encoders["image"])
        parts["text_tower"] = _numel(b.encoders["text"])
        parts["head_mlp"] = _numel(b.head.mlp)
        parts["head_fusion"] = head - parts["head_mlp"]
    elif kind == "msrvtt":
        parts["text_bert"] = _numel(b.text)
        parts["video"] = total - head - parts["text_bert"]
        parts["head_geu"] = _numel(b.head.units)
        parts["head_mixture"] = _numel(b.head.mixture)
    return parts


# --- the printed numbers ----------------------------------------------------------------------
_UNITS = {"K": 1e3, "M": 1e6, "B": 1e9}


def parse_count(printed: str) -> float:
    """'3.1M' -> 3.1e6, '348B' -> 3.48e11, '0.1M' -> 1e5."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMB])\s*", printed)
    if not match:
        raise ValueError(f"not a printed parameter count: {printed!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def printed_bounds(printed: str) -> tuple[float, float]:
    """The interval of counts that print as ``printed`` (3.1M: 3.05M .. 3.15M)."""
    match = re.fullmatch(r"\s*([0-9]*\.?([0-9]*))\s*([KMB])\s*", printed)
    if not match:
        raise ValueError(f"not a printed parameter count: {printed!r}")
    unit, half = _UNITS[match.group(3)], 0.5 * 10 ** -len(match.group(2))
    return (float(match.group(1)) - half) * unit, (float(match.group(1)) + half) * unit


def rounds_to(count: int | None, printed: str) -> bool:
    """Whether ``count`` prints as ``printed`` at the printed precision (3.1M: 3.05M .. 3.15M)."""
    if count is None:
        return False
    low, high = printed_bounds(printed)
    return low - 1e-6 <= count <= high + 1e-6


W1, W2, W3, W4, W5 = (f"Wander Table {i}" for i in range(1, 6))
WANDER_TABLES = {W1: specs.T1, W2: specs.T2, W3: specs.T3, W4: specs.T4, W5: specs.T5}
AS_PRINTED = None  # a Wander table's count: as typed once, in harness.tables.specs


@dataclass(frozen=True)
class PaperRow:
    table: str
    row: str
    printed: str | None             # AS_PRINTED for the Wander tables
    backbone: str                   # a BACKBONES key, or "blip_base"
    method: str
    settings: dict = field(default_factory=dict)
    variant: str = "paper"
    note: str = ""                  # str.format(**context) with the row's numbers
    spec_label: str | None = None   # the row's label in harness.tables.specs where it differs

    def __post_init__(self):
        if self.printed is AS_PRINTED:
            label = self.spec_label or self.row
            object.__setattr__(self, "printed", specs.printed_tunable(WANDER_TABLES[self.table], label))

AU, UA = "Aurora Table 1", "UniAdapter"

_TT = ("our head = 2 x 768 fusion transformer {head_fusion} + MLP {head_mlp} (our choice: every "
       "method trains the fusion layers; the released Wander model freezes them, see the code "
       "rows); without the fusion transformer ours would be {without_fusion}")
_TT_CODE = ("code variant = the released FoodModelWander: per tower Down 768 x d + d, factor_dim 8 x "
            "d x 768, factor_t 12 x T x d (T = 197 ViT / 50 BERT tokens) after the FROZEN 2-layer "
            "fusion transformer ({head_fusion}, none of it trains), head proj1 768 x 768 + 768 and "
            "out_layer 768 x 101 + 101 = 668,261 on the fused token 0; {alt}")
_LF = "released backbone: {frozen} parameters besides the head (width 40 x 32 layers x 3 modalities)"
_LF_CODE = ("code variant = the released AdapterModel: per modality Down 40 x d + d, factor_dim "
            "8 x d x 40, factor_t 12 x T x d, and the released head on the fused token 0 repeated 3 "
            "times (120 -> 40 -> 40 -> 40 -> out); only adapter + head train; {alt}. " + _LF)
_MMT = ("our head = 7 gated embedding units {head_geu} + 7 mixture logits {head_mixture}; "
        "with the mixture logits alone as head ours would be {without_geu}")

PAPER_ROWS: tuple[PaperRow, ...] = (
    # --- Wander Table 1: UPMC-Food 101, two-tower ---
    PaperRow(W1, "Full fine-tuning", AS_PRINTED, "food101", "full", {},
             note="ViT-B/16 {image_tower} + BERT-base {text_tower} (no poolers) + head {head}"),
    PaperRow(W1, "LoRA (r=64)", AS_PRINTED, "food101", "lora", {"rank": 64},
             note="LoRA on q, v of 24 layers: 48 x 2 x 64 x 768 = {method}. " + _TT),
    PaperRow(W1, "Adapter (d=64)", AS_PRINTED, "food101", "adapter", {"down_dim": 64},
             note="2 Houlsby adapters x 24 layers. " + _TT),
    PaperRow(W1, "Adapter (d=128)", AS_PRINTED, "food101", "adapter", {"down_dim": 128},
             note="the paper's d=64 -> 128 step is +25.2M; two adapters per layer in 24 layers "
                  "add only 48 x 64 x (2 x 768 + 1) = 4.72M. " + _TT),
    PaperRow(W1, "P-tuning", AS_PRINTED, "food101", "ptuning", {},
             note="10 deep prompts x 24 layers x 768. " + _TT),
    PaperRow(W1, "MaPLe", AS_PRINTED, "food101", "maple", {"source": "text"},
             note="2 text prompts + a 768 x 768 coupling per depth, 9 depths. " + _TT),
    PaperRow(W1, "PMF", AS_PRINTED, "food101", "pmf", {},
             note="12 prompts x 2 fusion layers x 2 towers + 2 translators (768-384-768). " + _TT),
    PaperRow(W1, "UniAdapter (d=128)", AS_PRINTED, "food101", "uniadapter", {"down_dim": 128},
             note="paper variant: one global down + an up per tower and layer; no fusion branch "
                  "(the two-tower fusion has no cross-attention). " + _TT),
    PaperRow(W1, "UniAdapter (d=128)", AS_PRINTED, "food101", "uniadapter", {"down_dim": 128},
             variant="code",
             note="code variant (the released model, RERV/UniAdapter): LayerNorm + down per depth "
                  "shared by both towers, biases, an up per tower and depth: 12 x (2 x 768 + 768 x "
                  "128 + 128) + 24 x (128 x 768 + 768) = {method}; the paper variant has one "
                  "bias-free down for all layers and no LayerNorm; the released training filter "
                  "('adapter' in name and '_m' not in name) trains all of these (no fusion "
                  "branch here). " + _TT),
    PaperRow(W1, "Aurora (d=128)", AS_PRINTED, "food101", "aurora", {"rank": 128},
             note="paper variant: global U, V (2 x 768 x 128) + (p, lambda) per q/k/v matrix "
                  "(72). " + _TT),
    PaperRow(W1, "Aurora (d=128)", AS_PRINTED, "food101", "aurora", {"rank": 128}, variant="code",
             note="code variant (the released models, WillDreamer/Aurora CP/vit.py, CP/med.py): "
                  "U, V 2 x 768 x 128 + the 128^3 core (2.10M alone) + per layer the ViT's (R, 4) "
                  "and (R, 8) slices (q, k, v, o, fc1, fc2) and the BERT's three (R, 1) (q, k, v "
                  "only) = 2 x 768 x 128 + 128^3 + 12 x 15 x 128 = {method}; the paper variant "
                  "(CP: p and lambda per q/k/v matrix, no core) is far smaller. " + _TT),
    PaperRow(W1, "Wander (d=64)", AS_PRINTED, "food101", "wander", {"down_dim": 64},
             note="Wander after the last layer, d_t = d, R_h = R_t = 8; image 197 + text 50 "
                  "tokens. " + _TT),
    PaperRow(W1, "Wander (d=128)", AS_PRINTED, "food101", "wander", {"down_dim": 128},
             note="paper's d=64 -> 128 step +1.8M, ours +{method_half} (every Wander term is "
                  "linear in d when d_t = d). " + _TT),
    PaperRow(W1, "Wander (d=64)", AS_PRINTED, "food101", "wander", {"down_dim": 64}, variant="code",
             note=_TT_CODE),
    PaperRow(W1, "Wander (d=128)", AS_PRINTED, "food101", "wander", {"down_dim": 128}, variant="code",
             note=_TT_CODE),
    # --- Wander Table 2: IEMOCAP, late fusion ---
    PaperRow(W2, "Full fine-tuning", AS_PRINTED, "iemocap", "full", {},
             note="the printed 80M is {paper_x} our whole model. " + _LF),
    PaperRow(W2, "LoRA (r=16)", AS_PRINTED, "iemocap", "lora", {"rank": 16},
             note="q, v of 96 layers: 192 x 2 x 16 x 40. " + _LF),
    PaperRow(W2, "Adapter (d=16)", AS_PRINTED, "iemocap", "adapter", {"down_dim": 16},
             note="2 adapters x 96 layers x (2 x 40 x 16 + 16 + 40). " + _LF),
    PaperRow(W2, "Adapter (d=64)", AS_PRINTED, "iemocap", "adapter", {"down_dim": 64}, note=_LF),
    PaperRow(W2, "P-tuning", AS_PRINTED, "iemocap", "ptuning", {},
             note="10 prompts x 96 layers x 40. " + _LF),
    PaperRow(W2, "MaPLe", AS_PRINTED, "iemocap", "maple", {},
             note="J = 9 depths, cascade text -> audio -> vision, 40 x 40 couplings. " + _LF),
    PaperRow(W2, "PMF", AS_PRINTED, "iemocap", "pmf", {},
             note="translator width min(384, 40 // 2) = 20. " + _LF),
    PaperRow(W2, "Wander (d=16)", AS_PRINTED, "iemocap", "wander", {"down_dim": 16},
             note="20 tokens per modality (MulT aligned). " + _LF),
    PaperRow(W2, "Wander (d=64)", AS_PRINTED, "iemocap", "wander", {"down_dim": 64},
             note="also d_t = d = 64 exceeds the 60 tokens the residual can add to. " + _LF),
    PaperRow(W2, "Wander (d=16)", AS_PRINTED, "iemocap", "wander", {"down_dim": 16}, variant="code",
             note=_LF_CODE),
    PaperRow(W2, "Wander (d=64)", AS_PRINTED, "iemocap", "wander", {"down_dim": 64}, variant="code",
             note="d_t = d = 64 fused tokens exceed the 60 tokens (3 x 20): the released "
                  "Adapter's residual (fusion += original[:, :64]) fails the same way. " + _LF_CODE),
    # --- Wander Table 3: CMU-MOSI, late fusion ---
    PaperRow(W3, "Full fine-tuning", AS_PRINTED, "mosi", "full", {},
             note="the printed 80M is {paper_x} our whole model. " + _LF),
    PaperRow(W3, "LoRA (r=16)", AS_PRINTED, "mosi", "lora", {"rank": 16},
             note="q, v of 96 layers: 192 x 2 x 16 x 40. " + _LF),
    PaperRow(W3, "Adapter (d=16)", AS_PRINTED, "mosi", "adapter", {"down_dim": 16}, note=_LF),
    PaperRow(W3, "Adapter (d=64)", AS_PRINTED, "mosi", "adapter", {"down_dim": 64}, note=_LF),
    PaperRow(W3, "P-tuning", AS_PRINTED, "mosi", "ptuning", {}, note=_LF),
    PaperRow(W3, "MaPLe", AS_PRINTED, "mosi", "maple", {}, note=_LF),
    PaperRow(W3, "PMF", AS_PRINTED, "mosi", "pmf", {}, note=_LF),
    PaperRow(W3, "Wander (d=16)", AS_PRINTED, "mosi", "wander", {"down_dim": 16},
             note="per modality Down 40 x 16 + 16, w_h 8 x 40 x 16, w_t 8 x 16 x 50. Table 5 prints "
                  "0.1M for the same row. " + _LF),
    PaperRow(W3, "Wander (d=64)", AS_PRINTED, "mosi", "wander", {"down_dim": 64}, note=_LF),
    PaperRow(W3, "Wander (d=16)", AS_PRINTED, "mosi", "wander", {"down_dim": 16}, variant="code",
             note=_LF_CODE),
    PaperRow(W3, "Wander (d=64)", AS_PRINTED, "mosi", "wander", {"down_dim": 64}, variant="code",
             note=_LF_CODE),
    # --- Wander Table 4: MSR-VTT, MMT with 7 experts ---
    PaperRow(W4, "Full fine-tuning", AS_PRINTED, "msrvtt", "full", {},
             note="BERT-base-cased {text_bert} + video transformer and expert projections {video} "
                  "+ head {head}"),
    PaperRow(W4, "LoRA (r=16)", AS_PRINTED, "msrvtt", "lora", {"rank": 16},
             note="q, v of the 4 joint video layers (BERT not adapted, as for every other "
                  "method). " + _MMT),
    PaperRow(W4, "Adapter (d=8)", AS_PRINTED, "msrvtt", "adapter", {"down_dim": 8},
             note="one adapter pair per expert segment and layer (7 x 2 x 4). The paper's adapter "
                  "counts are exactly linear in d (4.6M -> 9.2M), so its 4.6M is not our head. "
                  + _MMT),
    PaperRow(W4, "Adapter (d=16)", AS_PRINTED, "msrvtt", "adapter", {"down_dim": 16}, note=_MMT),
    PaperRow(W4, "P-tuning", AS_PRINTED, "msrvtt", "ptuning", {}, note=_MMT),
    PaperRow(W4, "MaPLe", AS_PRINTED, "msrvtt", "maple", {},
             note="cascade of 6 couplings (512 x 512) at each of the 4 depths (J = 9 clipped). "
                  + _MMT),
    PaperRow(W4, "PMF", AS_PRINTED, "msrvtt", "pmf", {},
             note="42 ordered expert pairs x a 512-256-512 translator. " + _MMT),
    PaperRow(W4, "Wander (d=8)", AS_PRINTED, "msrvtt", "wander", {"down_dim": 8},
             note="7 experts x 31 tokens, after the last video layer. " + _MMT),
    PaperRow(W4, "Wander (d=16)", AS_PRINTED, "msrvtt", "wander", {"down_dim": 16}, note=_MMT),
    # --- Wander Table 5: CMU-MOSI, reduced feature dims (unspecified in the paper) ---
    PaperRow(W5, "SF-OP", AS_PRINTED, "mosi", "wander", {"down_dim": 16, "form": "sf_op"},
             note="the paper reduced the feature dims (not stated); counted on the released "
                  "MOSI backbone at d = 16: full W_t (16 x 50^3 = 2.0M) + W_h (16^3 x 40). " + _LF),
    PaperRow(W5, "SF-VF", AS_PRINTED, "mosi", "wander", {"down_dim": 16, "form": "sf_vf"},
             note="CP W_h + full W_t (16 x 50^3 = 2.0M) at d = 16 on the released MOSI backbone. "
                  + _LF),
    PaperRow(W5, "Wander (d=16)", AS_PRINTED, "mosi", "wander", {"down_dim": 16},
             note="same setting as Table 3's Wander (d=16), printed there as 0.3M. " + _LF),
    PaperRow(W5, "Wander (d=16) -nonlinearity", AS_PRINTED, "mosi", "wander",
             {"down_dim": 16, "nonlinearity": False}, spec_label="–nonlinearity (d=16)",
             note="the nonlinearity has no parameters: the paper's 0.1M -> 0.2M cannot come from "
                  "removing it. " + _LF),
    PaperRow(W5, "Wander (d=16) -residual", AS_PRINTED, "mosi", "wander",
             {"down_dim": 16, "residual": False}, spec_label="–residual (d=16)", note="the residual has no parameters. " + _LF),
    PaperRow(W5, "Wander (d=32)", AS_PRINTED, "mosi", "wander", {"down_dim": 32}, note=_LF),
    PaperRow(W5, "Wander (d=32) -nonlinearity", AS_PRINTED, "mosi", "wander",
             {"down_dim": 32, "nonlinearity": False}, spec_label="–nonlinearity (d=32)",
             note="the nonlinearity has no parameters. " + _LF),
    PaperRow(W5, "Wander (d=32) -residual", AS_PRINTED, "mosi", "wander",
             {"down_dim": 32, "residual": False}, spec_label="–residual (d=32)",
             note="the residual has no parameters; the paper prints 0.1M for Wander (d=32) and "
                  "0.2M without the residual. " + _LF),
    # --- Aurora paper, Table 1 (and Tables 2-4): BLIP-base, not built ---
    PaperRow(AU, "LoRA (r=32)", "10.6M", "blip_base", "lora", {"rank": 32},
             note="peft LoRA on the 108 q/k/v 768 x 768 matrices of BLIP-base (Aurora's own "
                  "formula L x (3 + 6) x 2dr): 5,308,416; the printed 10.6M is exactly twice that "
                  "(10,616,832), i.e. 216 matrices or r = 64"),
    PaperRow(AU, "UniAdapter (r=128)", "4.6M", "blip_base", "uniadapter", {"down_dim": 128},
             variant="code",
             note="code layout (what the UniAdapter paper prints as 4.8M); {alt}"),
    PaperRow(AU, "UniAdapter (r=512)", "18.8M", "blip_base", "uniadapter", {"down_dim": 512},
             variant="code",
             note="code layout (the UniAdapter paper prints 19.0M); {alt}"),
    PaperRow(AU, "Aurora (r=64)", "0.1M", "blip_base", "aurora", {"rank": 64},
             note="paper variant: 2 x 768 x 64 (U, V) + 108 x 2 x 64 (p, lambda) + 12 x 2 x 768 "
                  "(gated query) = Aurora's formula L(3+6)2r + 2dr + 2Ld exactly; {alt}: the "
                  "released models add the R^3 core and adapt o, fc1, fc2 of the ViT too"),
    PaperRow(AU, "Aurora (r=128)", "0.2M", "blip_base", "aurora", {"rank": 128},
             note="paper variant, same layout; = Aurora's formula L(3+6)2r + 2dr + 2Ld; {alt}"),
    # --- UniAdapter paper (Sec. 4.1 and Table 2): BLIP-base, not built ---
    PaperRow(UA + " Sec. 4.1", "UniAdapter (r=128)", "4.8M", "blip_base", "uniadapter",
             {"down_dim": 128}, variant="code",
             note="code layout: 12 x (LayerNorm + down) + 36 ups (visual, text, cross-modal) + 12 "
                  "cross-modal LayerNorms = 4,784,640, methods.md's shape count; {alt}"),
    PaperRow(UA + " Sec. 4.1", "UniAdapter (r=512)", "19.0M", "blip_base", "uniadapter",
             {"down_dim": 512}, variant="code",
             note="code layout = 18,945,024 (methods.md's shape count, prints 18.9M); {alt}"),
    PaperRow(UA + " Table 2", "UniAdapter (r=256)", "19.0M", "blip_base", "uniadapter",
             {"down_dim": 256}, variant="code",
             note="r = 256 gives half the printed count; 19.0M is the r = 512 count (the label "
                  "r=256 is likely a typo: the ablations use r = 512)"),
)


# --- BLIP-base closed forms from the method modules -------------------------------------------
def _blip_counts(method: str, variant: str, settings: dict) -> tuple[int, str]:
    """(count, how) for the BLIP-base layout, from the method module's classes (meta device)."""
    L, D = BLIP["layers"], BLIP["width"]
    spec = get_method(method)
    config = spec.make_config(variant, **settings)
    if method == "lora":
        n = L * (3 + 6)
        return n * 2 * config.rank * D, f"{n} q/k/v matrices x 2 x r x D (peft LoRA, no bias)"
    if method == "uniadapter":
        from methods.uniadapter import CrossModalUniAdapter, SharedDown, UniAdapterBranch, make_up

        with building("meta"):
            parts = nn.ModuleList()
            downs: dict[int, SharedDown] = {}
            for depth in range(L):
                down = downs.setdefault(0 if config.share_down == "global" else depth,
                                        SharedDown(D, config))
                visual = UniAdapterBranch(down, make_up(D, config, config.zero_up == "all"), config)
                text = UniAdapterBranch(down, make_up(D, config, True), config)
                cross = CrossModalUniAdapter(text, make_up(D, config, config.zero_up == "all"), D,
                                             config)
                parts.extend([visual, text, cross])
        trained = sum(p.numel() for p in parts.parameters() if p.requires_grad)
        rule = ("" if trained == _numel(parts) else
                f"; the released training filter ('adapter' in name and '_m' not in name, "
                f"train_retrieval.py) leaves the {L} cross-modal LayerNorms frozen "
                f"(adapter_layer_norm_cross_modal holds '_m'): it trains {trained:,} of these, "
                f"plus the text encoder's video key / value LoRA adapters (2 x 99,137 at "
                f"bottleneck 64), which are not built here")
        return _numel(parts), (f"{variant} layout from methods.uniadapter classes: {L} depths x "
                               f"(visual, text, cross-modal) with shared downs{rule}")
    if method == "aurora":
        from methods.aurora import AuroraFactors, AuroraLinear, GatedQuery

        if config.layout == "released":  # the released models (WillDreamer/Aurora CP/): ViT q, k,
            # v, o, fc1, fc2; BERT self- and cross-attention q, k, v ((R, 1) p each); 2 gates
            # (CP_scale/shift self and cross) per text layer
            with building("meta"):
                factors = AuroraFactors(D, config.rank, config.form)
                vit = [(D, D, r) for r in ("q", "k", "v", "o")] + [(D, 4 * D, "fc1"),
                                                                    (4 * D, D, "fc2")]
                wrappers = nn.ModuleList(
                    [AuroraLinear(nn.Linear(i, o), factors, r, config, "vit")
                     for _ in range(L) for i, o, r in vit]
                    + [AuroraLinear(nn.Linear(D, D), factors, "q", config, "bert")
                       for _ in range(L * 6)])
                gates = nn.ModuleList(GatedQuery(D, config.form) for _ in range(2 * L))
            count = sum(p.numel() for n, p in wrappers.named_parameters() if ".base." not in n)
            return count + _numel(gates), (f"{variant} layout (the released models) from "
                                           f"methods.aurora classes: global factors and core, "
                                           f"{L} x 12 ViT core slices, {L} x 6 BERT q/k/v "
                                           f"(self + cross), {2 * L} gates")
        with building("meta"):
            factors = AuroraFactors(D, config.rank, config.form)
            wrappers = nn.ModuleList(AuroraLinear(nn.Linear(D, D), factors, "q", config)
                                     for _ in range(L * (3 + 6)))
            gates = nn.ModuleList(GatedQuery(D, config.form) for _ in range(L))
        count = sum(p.numel() for n, p in wrappers.named_parameters() if ".base." not in n)
        return count + _numel(gates), (f"{variant} layout from methods.aurora classes: global "
                                       f"factors, {L * 9} q/k/v matrices, {L} gated queries")
    raise ValueError(f"no BLIP-base closed form for {method!r}")


# --- counting ----------------------------------------------------------------------------------
def _setting(row: PaperRow) -> str:
    parts = [f"{k}={v}" for k, v in row.settings.items()]
    if row.variant != "paper":
        parts.insert(0, f"variant={row.variant}")
    return ", ".join(parts) or "defaults"


def _m(count: int | None) -> str:
    return "-" if count is None else f"{count / 1e6:.2f}M"


def _build_and_count(row: PaperRow, device: str) -> tuple[dict | None, str | None, dict | None]:
    """(counts, error, unchecked counts); counted once per backbone, method, variant and settings
    (a Wander code row's explanation counts the paper variant: another row's count)."""
    return _counted(row.backbone, row.method, row.variant, tuple(sorted(row.settings.items())),
                    device)


@lru_cache(maxsize=None)
def _counted(kind: str, method: str, variant: str, settings_items: tuple, device: str):
    settings = dict(settings_items)
    with building(device):
        backbone = BACKBONES[kind].build()
        try:
            apply_method(backbone, method, variant, **settings)
            return count_parameters(backbone), None, None
        except ConfigError as error:
            message = str(error)
    # The same modules with validate_for lifted (information only).
    try:
        with building(device):
            backbone = BACKBONES[kind].build()
            spec = get_method(method)
            config = spec.make_config(variant, **settings)
            freeze(backbone)
            spec.apply_fn(backbone, config)
            trainable_head(backbone)
        unchecked = count_parameters(backbone)
    except Exception:  # noqa: BLE001 - any failure just means no unchecked count
        unchecked = None
    return None, message, unchecked


def _other_variant(row: PaperRow, variant: str, device: str) -> str:
    """The same row's count under another variant, in words (for the explanation)."""
    other = PaperRow(row.table, row.row, row.printed, row.backbone, row.method, row.settings,
                     variant=variant)
    counts, error, _ = _build_and_count(other, device)
    if counts is None:
        return f"the {variant} variant is not buildable here either ({error})"
    return (f"the {variant} variant counts {counts['method']:,} + head {counts['head']:,} = "
            f"{counts['method'] + counts['head']:,}")


class _Context(dict):
    def __missing__(self, key: str) -> str:
        return "n/a"


def audit_row(row: PaperRow, device: str = "meta") -> dict:
    paper_value = parse_count(row.printed)
    out = {"table": row.table, "row": row.row, "method": row.method, "variant": row.variant,
           "setting": _setting(row), "backbone": row.backbone, "paper": row.printed,
           "paper_value": paper_value, "ours_method": None, "ours_head": None, "ours_total": None,
           "ratio": None, "ratio_method": None, "match": None, "unchecked_total": None,
           "status": "ok"}
    context: dict[str, str] = {}
    if row.backbone == "blip_base":
        count, how = _blip_counts(row.method, row.variant, row.settings)
        out.update(status="closed_form", ours_method=count, ours_head=0, ours_total=count,
                   backbone_description="BLIP-base layout (not built): 12 layers, width 768")
        if row.method in ("uniadapter", "aurora"):
            other = "paper" if row.variant == "code" else "code"
            alt, _ = _blip_counts(row.method, other, row.settings)
            context["alt"] = f"the {other} variant's layout gives {alt:,} ({_m(alt)})"
        explanation = [f"BLIP-base is not built here; closed form: {how}"]
    else:
        spec = BACKBONES[row.backbone]
        out["backbone_description"] = spec.description
        anatomy = _anatomy(row.backbone, device)
        context.update({k: _m(v) for k, v in anatomy.items()})
        context["paper_x"] = f"{paper_value / anatomy['total']:.0f}x"
        counts, error, unchecked = _build_and_count(row, device)
        if row.method == "wander" and row.variant == "code":
            context["alt"] = _other_variant(row, "paper", device)
        explanation = []
        if error is not None:
            out["status"] = "infeasible"
            explanation.append(f"not buildable with these settings: {error}")
            if unchecked is not None:
                out["unchecked_total"] = unchecked["method"] + unchecked["head"]
                explanation.append(f"with the check lifted the same modules would count "
                                   f"{unchecked['method']:,} + head {unchecked['head']:,} = "
                                   f"{out['unchecked_total']:,} ({_m(out['unchecked_total'])})")
        else:
            out.update(ours_method=counts["method"], ours_head=counts["head"],
                       ours_total=counts["method"] + counts["head"])
            context["method"] = f"{counts['method']:,}"
            context["method_half"] = _m(counts["method"] // 2)
            if "head_fusion" in anatomy:
                context["without_fusion"] = _m(out["ours_total"] - anatomy["head_fusion"])
            if "head_geu" in anatomy:
                context["without_geu"] = _m(out["ours_total"] - anatomy["head_geu"])
            low, high = printed_bounds(row.printed)
            if row.method not in ("full", "linear") and high < counts["head"]:
                explanation.append(f"the paper's {row.printed} is below our head alone "
                                   f"({_m(counts['head'])}): the paper cannot count the same head")
            if row.method != "full" and low > anatomy["total"]:
                explanation.append(f"the paper's {row.printed} exceeds our whole backbone "
                                   f"({_m(anatomy['total'])}): not countable on this backbone")
    if out["ours_total"] is not None:
        out["ratio"] = out["ours_total"] / paper_value
        out["ratio_method"] = out["ours_method"] / paper_value
        if rounds_to(out["ours_total"], row.printed):
            out["match"] = "total"
        elif rounds_to(out["ours_method"], row.printed):
            out["match"] = "method"
        if out["match"] == "total":
            explanation.append(f"ours rounds to the printed {row.printed}")
        elif out["match"] == "method":
            explanation.append(f"our method part alone rounds to the printed {row.printed} "
                               f"(the paper's count leaves the head out)")
    if row.note:
        explanation.append(row.note.format_map(_Context(context)))
    out["explanation"] = "; ".join(explanation)
    return out


def audit_params(device: str = "meta", rows: tuple[PaperRow, ...] = PAPER_ROWS) -> list[dict]:
    """Every printed #Tunable next to ours (see the module docstring). ``device``: where the
    backbones are built; "meta" (default, no memory, seconds) or "cpu" (real random tensors)."""
    return [audit_row(row, device) for row in rows]


def audit_params_markdown(rows: list[dict]) -> str:
    def n(value):
        return "-" if value is None else f"{value:,}"

    lines = ["# Parameter audit: printed #Tunable vs ours", "",
             "Ours = `count_parameters` on the paper-size backbone built from its config (random "
             "weights), method + head (the tables' #Tunable includes the head). Ratio = ours total "
             "/ printed. Status: ok (built and counted), infeasible (the backbone refuses the "
             "settings), closed_form (BLIP-base, not built: counted from the method module's "
             "classes for that layout).", "",
             "| Table | Row | Setting | Backbone | Status | Ours method | Ours head | Ours total "
             "| Paper | Ratio | Explanation |",
             "|---|---|---|---|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}"
        cells = [r["table"], r["row"], r["setting"], r["backbone"], r["status"],
                 n(r["ours_method"]), n(r["ours_head"]), n(r["ours_total"]),
                 f"{r['paper']}", ratio, r["explanation"].replace("|", "/")]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    lines += ["", "Backbones:", ""]
    lines += [f"- `{k}`: {v.description}" for k, v in BACKBONES.items()]
    lines += ["- `blip_base`: BLIP-base (Aurora / UniAdapter papers), not built; closed forms "
              "only.", "",
              "IEMOCAP dims: datasets/iemocap.yaml typical_dims.mult (text 300, audio 74, vision "
              "35); 20 tokens per modality is our assumption (MulT aligned pickles)."]
    return "\n".join(lines) + "\n"


__all__ = ["PAPER_ROWS", "PaperRow", "BACKBONES", "audit_params", "audit_params_markdown",
           "audit_row", "building", "parse_count", "printed_bounds", "rounds_to"]
