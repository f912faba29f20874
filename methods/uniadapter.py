"""UniAdapter: unified adapters with a shared down-projection (Lu et al., ICLR 2024), Sec. 3.3-3.5.

    UniAdapter(x^m) = x^m + s * act(x^m W_down) W_up^m,   s = 0.1                       (Eq. 1, 5)

One down-projection W_down (D -> r) is shared by the adapters of every modality; each modality m
has its own up-projection W_up^m (r -> D) in every layer ("the down-projection layer in all
UniAdapters is shared while the up-projection can learn modality-specific knowledge", Sec. 3.4).
M >= 2 modalities: one up per modality (backbone order); the modality named ``text`` is the text
one (the released text up, the one the fusion branch reuses).

Placement (``placement``). Eq. 3 and Eq. 6 put the adapter in parallel with the feed-forward
block, reading the post-attention residual stream h: l = h + FFN(LN(h)) + s * Delta(h) ("we follow
MAM [scaled parallel adapter] to inject UniAdapter between the self-attention layer and the
feed-forward layer"). The released models (RERV/UniAdapter) do the same, tower by tower:

- ViT (``models/vit.py`` Block.forward): ``adapt_x = adapter(x)`` on the RAW stream x after the
  attention residual (not on ``norm2(x)``), then ``x = residual + mlp(norm2(x)) + adapt_x``;
- BERT (``models/med.py`` BertLayer.forward): ``adapt_x = adapter(attention_output)`` (the
  post-attention, post-LayerNorm stream), added to ``layer_output`` = the output of BertOutput,
  i.e. AFTER the post-FFN LayerNorm: l = LN(h + dropout(FFN(h))) + s * Delta(h).

``parallel`` (the default of both variants) asks the backbone for exactly that through
``set_parallel_adapter(modality, depth, module)`` (``module(h)`` is added to the layer's output;
the two-tower backbone implements it, ViT and BERT as above; Eq. 3 is written for a pre-LN block,
so for the post-LN BERT both variants take the released position). A backbone without that hook gets
the adapter on its FFN block instead (the parent module of the layer's fc1 linear site; a forward
hook adds s * Delta(y) to the FFN output, every linear keeps its path), reading y = LN_ffn(h), the
FFN's pre-LN input: exact when that LayerNorm's affine is the identity and, for the code variant,
nearly so anyway, since its own LayerNorm re-normalises the input. ``attn`` (sequential, on the
attention output) and ``ffn`` (sequential, on the FFN output, Houlsby's second position) use the
backbone's ``set_adapter`` points and are offered as alternatives.

Variants:
- paper: ONE down shared globally (all layers, all modalities), no LayerNorm, no biases (Eq. 1
  has none), Kaiming-normal down, every up zero: the adapted model starts as the frozen one.
  Count: D r + M L r D.
- code (the released model, RERV/UniAdapter ``models/adapter.py``, ``models/blip_retrieval.py``,
  ``train_retrieval.py``): one adapter module per LAYER depth i, shared by ViT block i and BERT
  layer i (so one LayerNorm + down per depth shared by every modality's layer i), ReLU, biases;
  per modality its own up (``visual_up_proj`` for the image, ``up_proj`` for the text). The
  released init, in construction order: the adapter's own init (Kaiming-uniform down, zero
  ``up_proj``); the ViT's ``self.apply(self._init_weights)`` (the adapter is a child of each Block:
  trunc-normal 0.02 on every Linear, zero biases, LayerNorm 1 / 0); BERT's ``init_weights()``
  (transformers 4.15, ``requirements.txt``: ``apply(_init_weights)``, the adapter is a child of each
  BertLayer: N(0, 0.02) on every Linear, zero biases, LayerNorm 1 / 0); then ``train_retrieval.py``
  calls ``init_adapter_weights()`` on each adapter: Kaiming-uniform (a = sqrt 5) down, zero down
  bias, zero ``up_proj`` weight and bias. Final state: down Kaiming-uniform / 0, the TEXT up zero
  (chosen by the modality's name, ``text``; none is zeroed where no modality is so named), every
  other up N(0, 0.02) with a zero bias, LayerNorm 1 / 0. The image adapters therefore perturb the
  output from step 0 (starts_as_identity=False: the audit checks that it really does).
  Count: L (2 D + D r + r) + M L (r D + D).
  Trainable set: the released script trains ``'adapter' in name and '_m' not in name`` (plus its
  task heads). That rule also freezes ``adapter_layer_norm_cross_modal`` (its name contains
  "_m"): the cross-modal LayerNorm of the fusion branch stays at 1 / 0; the code variant
  reproduces it (flagged; it only exists where a fusion branch is built) and the parameter audit
  shows both counts. The fusion-only parameters (``multi_up_proj``, that LayerNorm, the text
  encoder's ``video_key_adapter`` / ``video_value_adapter``) are read only in BLIP's
  ``multimodal`` mode and are not built on backbones without a cross-attention fusion encoder.

Cross-modal branch (Sec. 3.3-3.4, Eq. 6): in a fusion (multimodal) encoder the adapter adds
s * [act(h W_down) W_up^T + act(h W_down) W_up^C] (the text up reused, plus a fusion up) and the
Query-Residual adapter s * act(q W_down) W_up^T on the self-attention output q (weights shared with
the text adapter); the code wraps the sum of the two ups in a LayerNorm. No backbone here has a
fusion encoder, so the branch is never attached; ``CrossModalUniAdapter`` is kept for ``mmpetl
audit params``, which counts the BLIP-base layout the UniAdapter paper prints. The released extra
LoRA-like adapters on the cross-attention keys and values belong to that branch too.

Parameter-free Frame-aware Attention (Sec. 3.5) reweights video frame tokens before the
cross-attention; it only applies to video backbones with frame tokens and a text CLS and is left
out of this module (it has no parameters, so counts are unaffected).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
import torch.nn.functional as F

from methods.base import ConfigError, MethodConfig, Variant, at_most_hidden, positive, probability, require
from methods.registry import register

PLACEMENTS = ("parallel", "attn", "ffn")
TEXT = "text"  # the modality whose up is the released text ``up_proj`` (zeroed in the code variant)


@dataclass
class UniAdapterConfig(MethodConfig):
    down_dim: int = 128               # r (paper tables: r = 128 and 512)
    scale: float = 0.1                # s
    share_down: str = "global"        # global (paper) | layer (code: one down per depth)
    layer_norm: bool = False          # LayerNorm before down (code)
    bias: bool = False                # biases on down / ups (code)
    activation: str = "relu"          # the paper leaves sigma open; the code uses ReLU
    dropout: float = 0.0              # on the bottleneck activations (code: 0.0)
    placement: str = "parallel"       # parallel to the FFN (Eq. 3, 6) | attn | ffn
    down_init: str = "kaiming_normal"  # kaiming_normal (paper) | kaiming_uniform (code)
    zero_up: str = "all"              # all (paper) | text (code: only the up of the modality "text")
    up_std: float | None = None       # non-zeroed ups: N(0, up_std), zero bias (code: 0.02); None =
                                      # nn.Linear's default init
    train_cross_norm: bool = True     # fusion branch's LayerNorm trainable (code: False, released filter)

    def validate(self) -> None:
        positive(self, "down_dim")
        probability(self, "dropout")
        require(isinstance(self.scale, (int, float)) and math.isfinite(self.scale) and self.scale > 0,
                self, "scale", "a finite number > 0")
        require(self.share_down in ("global", "layer"), self, "share_down", "'global' or 'layer'")
        require(self.activation in ("relu", "gelu"), self, "activation", "'relu' or 'gelu'")
        require(self.placement in PLACEMENTS, self, "placement", f"one of {PLACEMENTS}")
        require(self.down_init in ("kaiming_normal", "kaiming_uniform"), self, "down_init",
                "'kaiming_normal' or 'kaiming_uniform'")
        require(self.zero_up in ("all", "text"), self, "zero_up", "'all' or 'text'")
        require(self.up_std is None or (isinstance(self.up_std, (int, float))
                                        and math.isfinite(self.up_std) and self.up_std > 0),
                self, "up_std", "None or a finite number > 0")

    def validate_for(self, backbone: nn.Module) -> None:
        at_most_hidden(self, backbone, "down_dim")
        widths = sorted({backbone.hidden_size(m) for m in backbone.modalities})
        if len(widths) != 1:
            raise ConfigError(f"{type(self).__name__}: uniadapter shares its down-projection across "
                              f"modalities and needs one width for all of them; the backbone has "
                              f"widths {widths}")
        if self.placement == "parallel" and not hasattr(backbone, "set_parallel_adapter"):
            for m in backbone.modalities:
                for depth in range(backbone.num_layers(m)):
                    require(_ffn_path(backbone, m, depth) is not None, self, "placement",
                            f"'attn' or 'ffn': the backbone exposes no fc1 linear site for "
                            f"{m!r} layer {depth} to locate its FFN block")


def _ffn_path(backbone: nn.Module, modality: str, depth: int) -> str | None:
    for site in backbone.linear_sites():
        if site.modality == modality and site.depth == depth and site.role == "fc1":
            return site.path.rsplit(".", 1)[0]
    return None


class SharedDown(nn.Module):
    """[LayerNorm] + Linear(D -> r): the part every modality's adapter shares."""

    def __init__(self, width: int, config: UniAdapterConfig):
        super().__init__()
        self.norm = nn.LayerNorm(width) if config.layer_norm else nn.Identity()
        self.proj = nn.Linear(width, config.down_dim, bias=config.bias)
        with torch.no_grad():
            if config.down_init == "kaiming_normal":
                nn.init.kaiming_normal_(self.proj.weight)
            else:
                nn.init.kaiming_uniform_(self.proj.weight, a=math.sqrt(5))
            if self.proj.bias is not None:
                self.proj.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(x))


def make_up(width: int, config: UniAdapterConfig, zero: bool) -> nn.Linear:
    """An up-projection: zero, N(0, ``up_std``) with a zero bias (the released non-text ups after
    BERT's ``_init_weights``, see the module docstring), or nn.Linear's default init."""
    up = nn.Linear(config.down_dim, width, bias=config.bias)
    with torch.no_grad():
        if zero:
            up.weight.zero_()
        elif config.up_std is not None:
            up.weight.normal_(0.0, float(config.up_std))
        if up.bias is not None and (zero or config.up_std is not None):
            up.bias.zero_()
    return up


class UniAdapterBranch(nn.Module):
    """One modality's adapter at one depth: shared down, its own up. ``forward`` is x + delta(x)
    (sequential use) or, with ``parallel``, delta(x) alone (the term a parallel hook adds)."""

    def __init__(self, down: SharedDown, up: nn.Linear, config: UniAdapterConfig,
                 parallel: bool = False):
        super().__init__()
        self.down = down  # shared: registered in every branch, counted once
        self.up = up
        self.parallel = parallel
        self.scale = float(config.scale)
        self.activation = config.activation
        self.dropout = nn.Dropout(config.dropout)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        h = self.down(x)
        h = F.relu(h) if self.activation == "relu" else F.gelu(h)
        return self.dropout(h)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * self.up(self.hidden(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.parallel:
            return self.delta(x)
        return x + self.delta(x)  # sequential use (Eq. 1)


def _parallel_hook(ffn: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    """Forward hook on an FFN block: FFN(y) + s * up(act(down(y))) (the adapter in parallel).

    A plain function reading the adapter from the hooked module, so deep copies stay consistent."""
    return output + ffn.uniadapter.delta(args[0])


def attach_parallel(ffn: nn.Module, adapter: UniAdapterBranch) -> None:
    """Registers ``adapter`` as ``ffn.uniadapter`` and runs it in parallel with ``ffn``; the FFN's
    own linears keep their paths (``linear_sites()`` stays valid)."""
    if hasattr(ffn, "uniadapter"):
        raise ValueError("this FFN block already has a parallel UniAdapter")
    ffn.uniadapter = adapter
    ffn.register_forward_hook(_parallel_hook)


class CrossModalUniAdapter(nn.Module):
    """Fusion-encoder UniAdapter (Eq. 6 without the FFN term): the text branch reused on the query
    (query residual) and on the fused state, plus a fusion up; code: LayerNorm on the summed ups.
    Built by ``mmpetl audit params`` for the BLIP-base counts; no backbone here attaches it."""

    def __init__(self, text: UniAdapterBranch, fusion_up: nn.Linear, width: int,
                 config: UniAdapterConfig):
        super().__init__()
        self.text = text  # shared with the text modality's adapter at this depth
        self.fusion_up = fusion_up
        self.norm = nn.LayerNorm(width) if config.layer_norm else nn.Identity()
        if not config.train_cross_norm:  # the released filter: "_m" in adapter_layer_norm_cross_modal
            for parameter in self.norm.parameters():
                parameter.requires_grad_(False)

    def forward(self, query: torch.Tensor, fused: torch.Tensor) -> torch.Tensor:
        hidden = self.text.hidden(fused)
        both = self.norm(self.text.up(hidden) + self.fusion_up(hidden))
        return self.text.delta(query) + self.text.scale * both


@register(
    "uniadapter",
    config=UniAdapterConfig,
    summary="UniAdapter (ICLR 2024): bottleneck adapters whose down-projection is shared across "
            "modalities (one up per modality), parallel to the FFN, scale 0.1",
    variants={
        "paper": Variant("one global down (all layers, all modalities), one up per modality and "
                         "layer, Kaiming-normal down, zero ups, no LayerNorm / biases; parallel "
                         "to the FFN (Eq. 3, 6)",
                         starts_as_identity=True,
                         defaults={"share_down": "global", "layer_norm": False, "bias": False,
                                   "down_init": "kaiming_normal", "zero_up": "all"}),
        "code": Variant("released model: LayerNorm + down shared per layer depth, ReLU, biases, "
                        "Kaiming-uniform down, the text up zeroed (by name), the other ups "
                        "N(0, 0.02) with zero bias, so they perturb the output from step 0; ViT "
                        "adapter on the raw stream, BERT adapter added after the post-FFN "
                        "LayerNorm",
                        starts_as_identity=False,
                        defaults={"share_down": "layer", "layer_norm": True, "bias": True,
                                  "down_init": "kaiming_uniform", "zero_up": "text",
                                  "up_std": 0.02, "train_cross_norm": False},
                        flag="trainable set = the released train_retrieval.py filter "
                             "('adapter' in name and '_m' not in name): it freezes the fusion "
                             "branch's cross-modal LayerNorm (adapter_layer_norm_cross_modal "
                             "contains '_m'), kept frozen here; on backbones without a fusion "
                             "branch the trained set is every LayerNorm, down and up built, "
                             "L (2D + Dr + r) + M L (rD + D)"),
    },
)
def apply(backbone: nn.Module, config: UniAdapterConfig) -> None:
    width = backbone.hidden_size(backbone.modalities[0])
    downs: dict[int, SharedDown] = {}

    def down_for(depth: int) -> SharedDown:
        key = 0 if config.share_down == "global" else depth
        if key not in downs:
            downs[key] = SharedDown(width, config)
        return downs[key]

    hooked = config.placement == "parallel" and hasattr(backbone, "set_parallel_adapter")
    for modality in backbone.modalities:
        zero = config.zero_up == "all" or modality == TEXT
        for depth in range(backbone.num_layers(modality)):
            branch = UniAdapterBranch(down_for(depth), make_up(width, config, zero), config,
                                      parallel=hooked)
            if hooked:
                backbone.set_parallel_adapter(modality, depth, branch)
            elif config.placement == "parallel":
                attach_parallel(backbone.get_submodule(_ffn_path(backbone, modality, depth)), branch)
            else:
                backbone.set_adapter(config.placement, modality, depth, branch)
