"""Wander: low-rank sequence multimodal adapter (Guo et al., AAAI 2025), Sec. 3.3, Eq. 13-14.

    Wander(h) = h + SF(act(Down(h)))                                            (Eq. 14)
    SF        = prod_m [ (sum_rt w_t[m][rt]) @ x_m @ (sum_rh w_h[m][rh])^T ]     (Eq. 13, last line)

x_m = act(Down_m(h_m)) is (l_m, d); w_t[m] is (R_t, d_t, l_m) and w_h[m] is (R_h, D, d); the product
over modalities is element-wise, so SF is one fused sequence of shape (d_t, D). As in the released
code, d_t = d and D is the backbone width (SF doubles as the up-projection), and the residual adds
SF to the first d_t tokens of the concatenation of all modality sequences (backbone order).

Forms (``form``): ``sf`` (Eq. 13, the default), ``sf_op`` (explicit outer product with full W_h,
W_t, Eq. 10; reduced dims only), ``sf_vf`` (vector fusion per token tuple, Eq. 8: CP W_h, full W_t),
``vf`` (SF on the first (CLS) token of each modality only, Table 7).

``rank_mode``: ``cp`` sums over ranks inside the product, as the paper's last line of Eq. 13 does,
so R_h and R_t change only the parameter count and the init scale; ``lmf`` keeps the sum outside
(sum_rt sum_rh prod_m ..., the first lines of Eq. 13 / low-rank multimodal fusion): an extension.

Variants: ``paper`` (ours): every factor Gaussian, scaled so that each modality term has roughly the
input's scale, so every tensor gets a gradient from the first step (the paper gives no init).
``code``: the released init, w_h ~ N(0, 1) and w_t = 0 for every modality: with M >= 2 zero terms in
the product every Wander tensor has exactly zero gradient forever; the adapter never trains. It also
asks for the released model's head (``task_head: released``, where the backbone offers it: on
late_fusion the fused token 0 repeated M times into the released MLP head).
"""
from __future__ import annotations

import math
import string
from dataclasses import dataclass

import torch
from torch import nn

from methods.base import RELEASED_WANDER_HEAD, MethodConfig, Variant, positive, require, use_head
from methods.registry import register

FORMS = ("sf", "sf_op", "sf_vf", "vf")
MAX_FULL_TENSOR = 50_000_000  # elements; SF-OP / SF-VF beyond this are refused (Sec. 4.3)


@dataclass
class WanderConfig(MethodConfig):
    down_dim: int = 64              # d
    rank_h: int = 8                 # R_h
    rank_t: int = 8                 # R_t
    fused_length: int | None = None  # d_t; None = down_dim, as in the released code
    form: str = "sf"
    rank_mode: str = "cp"           # cp (paper) | lmf (extension)
    nonlinearity: bool = True
    activation: str = "backbone"    # backbone (paper: "the same as the pre-trained model") | gelu | relu
    residual: bool = True
    insert: str = "last"            # last (released code) | every layer
    init: str = "scaled"            # scaled (our paper variant) | released (dead: all w_t = 0)
    task_head: str = "backbone"     # backbone (its own head) | released (see _use_released_head)

    def validate(self) -> None:
        positive(self, "down_dim", "rank_h", "rank_t")
        if self.fused_length is not None:
            positive(self, "fused_length")
        require(self.form in FORMS, self, "form", f"one of {FORMS}")
        require(self.rank_mode in ("cp", "lmf"), self, "rank_mode", "'cp' or 'lmf'")
        require(self.rank_mode == "cp" or self.form in ("sf", "vf"), self, "rank_mode",
                "'cp' for the sf_op / sf_vf forms (they hold full tensors)")
        require(self.activation in ("backbone", "gelu", "relu"), self, "activation",
                "'backbone', 'gelu' or 'relu'")
        require(self.insert in ("last", "every"), self, "insert", "'last' or 'every'")
        require(self.init in ("scaled", "released"), self, "init", "'scaled' or 'released'")
        require(self.task_head in ("backbone", "released"), self, "task_head",
                "'backbone' or 'released'")

    def validate_for(self, backbone: nn.Module) -> None:
        # down_dim may exceed the width: Down is a plain projection D -> d and the released code
        # runs d = 64 on width 40 (the paper's "Wander (d=64)" rows for MOSI / IEMOCAP).
        widths = {backbone.hidden_size(m) for m in backbone.modalities}
        require(len(widths) == 1, self, "form",
                f"a backbone whose modalities share one width (the residual adds to their "
                f"concatenation), found widths {sorted(widths)}")
        total = sum(backbone.seq_len(m) for m in backbone.modalities)
        require((self.fused_length or self.down_dim) <= total, self, "fused_length",
                f"at most the total number of tokens ({total}); it defaults to down_dim")
        if self.form in ("sf_op", "sf_vf"):
            lengths = math.prod(backbone.seq_len(m) for m in backbone.modalities)
            size = (self.fused_length or self.down_dim) * lengths
            if self.form == "sf_op":
                size += self.down_dim ** len(backbone.modalities) * widths.pop()
            require(size <= MAX_FULL_TENSOR, self, "form",
                    f"full tensors of at most {MAX_FULL_TENSOR:,} elements; {size:,} needed "
                    f"(SF-OP / SF-VF are only feasible at reduced dimensions, paper Sec. 4.3)")


class Wander(nn.Module):
    def __init__(self, dims: dict[str, int], lengths: dict[str, int], width: int,
                 config: WanderConfig, activation: str):
        super().__init__()
        self.modalities = tuple(dims)
        self.config = config
        d, d_t = config.down_dim, config.fused_length or config.down_dim
        self.fused_length = d_t
        if config.form == "vf":
            lengths = {m: 1 for m in lengths}
        self.down = nn.ModuleDict({m: nn.Linear(dims[m], d) for m in self.modalities})
        act = {"gelu": nn.GELU(), "relu": nn.ReLU()}[activation]
        self.act = act if config.nonlinearity else nn.Identity()
        # Parameters are created zero and filled by _init (per variant).
        if config.form in ("sf", "vf", "sf_vf"):  # CP factors of W_h (Eq. 6)
            self.w_h = nn.ParameterDict(
                {m: nn.Parameter(torch.zeros(config.rank_h, width, d)) for m in self.modalities})
        if config.form in ("sf", "vf"):  # CP factors of W_t (Eq. 12)
            self.w_t = nn.ParameterDict(
                {m: nn.Parameter(torch.zeros(config.rank_t, d_t, lengths[m])) for m in self.modalities})
        if config.form in ("sf_op", "sf_vf"):  # full W_t (d_t, l_1, ..., l_M), Eq. 10
            self.W_t = nn.Parameter(torch.zeros(d_t, *(lengths[m] for m in self.modalities)))
        if config.form == "sf_op":  # full W_h (d, ..., d, D), Eq. 9
            self.W_h = nn.Parameter(torch.zeros(*([d] * len(self.modalities)), width))
        self._init(lengths, d)

    @torch.no_grad()
    def _init(self, lengths: dict[str, int], d: int) -> None:
        c, M = self.config, len(self.modalities)
        if c.init == "released":  # w_h ~ N(0, 1), w_t = 0 (and the full W_t = 0)
            for name, p in self.named_parameters():
                if name.startswith(("w_h.", "W_h")):
                    p.normal_(0.0, 1.0)
            return
        # Each modality term (d_t, D) gets entries of about the input's scale; in lmf mode each of
        # the R_t * R_h rank terms is shrunk so their sum of products keeps that scale.
        shrink = (c.rank_t * c.rank_h) ** (-1 / (4 * M)) if c.rank_mode == "lmf" else 1.0
        rank_t, rank_h = (1, 1) if c.rank_mode == "lmf" else (c.rank_t, c.rank_h)
        for m in self.modalities:
            if hasattr(self, "w_h"):
                self.w_h[m].normal_(0.0, shrink / math.sqrt(rank_h * d))
            if hasattr(self, "w_t"):
                self.w_t[m].normal_(0.0, shrink / math.sqrt(rank_t * lengths[m]))
        if hasattr(self, "W_t"):
            self.W_t.normal_(0.0, 1 / math.sqrt(math.prod(self.W_t.shape[1:])))
        if hasattr(self, "W_h"):
            self.W_h.normal_(0.0, 1 / math.sqrt(d ** M))

    def fuse(self, xs: list[torch.Tensor]) -> torch.Tensor:
        """The sequence fusion SF: M tensors (B, l_m, d) -> (B, d_t, D)."""
        c = self.config
        if c.form in ("sf", "vf") and c.rank_mode == "cp":  # Eq. 13, last line
            # W_t x_m W_h^T as two matmuls: a batched (d_t, l_m) @ (l_m, d), then one (B d_t, d) @
            # (d, D); every term comes out contiguous (B, d_t, D) with no copy, so the product over
            # modalities and its backward run on dense tensors (an einsum's output is strided).
            # W_h^T is copied contiguous (d x D, small): the gradient of the (d, D) operand is then
            # the fast x^T @ grad, not grad^T @ x on a transposed (B d_t, D) view (2x slower)
            terms = [torch.bmm(self.w_t[m].sum(0).expand(len(x), -1, -1), x)
                     @ self.w_h[m].sum(0).T.contiguous() for m, x in zip(self.modalities, xs)]
            return math.prod(terms[1:], start=terms[0])
        if c.form in ("sf", "vf"):  # lmf: sum over (rt, rh) of the product over modalities
            terms = [torch.einsum("rtl,bld,shd->brsth", self.w_t[m], x, self.w_h[m])
                     for m, x in zip(self.modalities, xs)]
            return math.prod(terms[1:], start=terms[0]).sum(dim=(1, 2))
        seq = string.ascii_lowercase[: len(xs)]          # one index per modality's tokens
        feat = string.ascii_lowercase[10: 10 + len(xs)]  # one index per modality's features
        if c.form == "sf_vf":  # Eq. 8: vector fusion (Eq. 7) of every token tuple, then full W_t
            projected = [x @ self.w_h[m].sum(0).T for m, x in zip(self.modalities, xs)]  # (B, l_m, D)
            operands = ",".join(f"z{i}y" for i in seq)
            return torch.einsum(f"t{seq},{operands}->zty", self.W_t, *projected)
        # sf_op, Eq. 10: W_t . (outer product of all h_m) . W_h, contracted without forming it
        operands = ",".join(f"z{i}{j}" for i, j in zip(seq, feat))
        return torch.einsum(f"t{seq},{operands},{feat}y->zty", self.W_t, *xs, self.W_h)

    def forward(self, states: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        xs = [self.act(self.down[m](states[m])) for m in self.modalities]
        if self.config.form == "vf":
            xs = [x[:, :1] for x in xs]
        fused = self.fuse(xs)
        # Residual on the first d_t tokens of the concatenated sequences (released code).
        tokens = torch.cat([states[m] for m in self.modalities], dim=1)
        head = tokens[:, : self.fused_length]
        head = head + fused if self.config.residual else fused
        tokens = torch.cat([head, tokens[:, self.fused_length:]], dim=1)
        split = tokens.split([states[m].shape[1] for m in self.modalities], dim=1)
        return dict(zip(self.modalities, split))


def _use_released_head(backbone: nn.Module, config: WanderConfig) -> None:
    """``task_head: released`` (the code variant): the released model's head where the backbone
    offers it (methods/base.py ``RELEASED_WANDER_HEAD``; late_fusion: fused token 0 repeated M
    times into the released MLP, HalfMoon1008/WANDER models/model.py AdapterModel.forward;
    two_tower: the frozen, batch-mixing fusion transformer then Wander then relu(proj1) ->
    out_layer on token 0, models/foodmodel.py FoodModelWander). Backbones without one keep their
    own head."""
    if config.task_head == "released":
        use_head(backbone, RELEASED_WANDER_HEAD)


def activation_for(config: WanderConfig, backbone: nn.Module) -> str:
    if config.activation == "backbone":
        return backbone.activation
    return config.activation


@register(
    "wander",
    config=WanderConfig,
    summary="Low-rank sequence multimodal adapter (Wander, AAAI 2025): CP-factorised token-level "
            "fusion of all modalities after the last layer",
    variants={
        "paper": Variant("paper hyper-parameters (R_h = R_t = 8); an init that trains: every "
                         "factor Gaussian, scaled to keep each modality term at the input's scale",
                         starts_as_identity=None, defaults={"init": "scaled"}),
        "code": Variant("released code: w_h ~ N(0,1), w_t = 0 for every modality, GELU, trank 12, "
                        "the released head where the backbone offers it",
                        starts_as_identity=True,
                        defaults={"init": "released", "rank_t": 12, "activation": "gelu",
                                  "task_head": "released"},
                        flag="released Wander init: every w_t is zero, so the product over M >= 2 "
                             "modalities has zero gradient for every Wander tensor; the adapter "
                             "never trains (frozen backbone + trainable head). On two_tower "
                             "(Food-101) the released model's frozen fusion transformer attends "
                             "across the samples of a batch: a sample's prediction depends on its "
                             "batch-mates"),
    },
)
def apply(backbone: nn.Module, config: WanderConfig) -> None:
    dims = {m: backbone.hidden_size(m) for m in backbone.modalities}
    lengths = {m: backbone.seq_len(m) for m in backbone.modalities}
    width = next(iter(dims.values()))
    depths = range(backbone.depth) if config.insert == "every" else [backbone.depth - 1]
    for depth in depths:
        backbone.set_fusion_hook(depth, Wander(dims, lengths, width, config,
                                               activation_for(config, backbone)))
    _use_released_head(backbone, config)
