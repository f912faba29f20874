"""Aurora: mode approximation of the stacked attention weights (Wang et al., NeurIPS 2023), Sec. 3.2-3.3.

The frozen weight matrices of all layers of all modality branches are stacked into one tensor
W_0 in R^{d x d x N} (N matrices); Aurora learns Delta W in the same shape from factors that are
shared across every matrix, and each adapted linear computes H = W_0 X + Delta W_j X (Eq. 4).

Conventions. U is (R, D) and V is (D, R); for a linear of the backbone (``out = x W^T``) the update
of matrix j is the (D x D) matrix

    paper (form ``cp``, Eq. 2-4):   Delta W_j = V diag(lambda_j * p_j) U
                                    = sum_r lambda_{j,r} p_{j,r} v_r u_r^T
    code  (form ``tucker``):        Delta W_j = V (C x_3 p_j) ^T U,   (C x_3 p)_{rs} = sum_k C_{rsk} p_k

so the CP tensor sum_r lambda_r (u_r o v_r o p_r) of Eq. 2 has mode 1 = the input index (u_r),
mode 2 = the output index (v_r) and mode 3 = the matrix index (p_r = column r of P, whose row j
is the per-matrix vector p_j). Both are applied as factored matmuls, never as a D x D matrix:
z = U x (R), mixed by diag(lambda_j * p_j) or (C x_3 p_j), then V (back to D), with dropout
after U or after the mixing (``layout``); the
result is multiplied by ``scale`` and added to the frozen linear's output.

- U, V: ONE pair for the whole backbone (shared by every target matrix of every layer of every
  modality: "U, V are shared as global factors"), so all modalities must share one width.
- paper: per matrix j a row p_j of P and a coefficient vector lambda_j (the paper's lambda^m,
  "for each weight matrix on the modality m"), both R; U and P Gaussian, lambda Gaussian, V = 0,
  so Delta W = 0 at init (Sec. 3.2). Stds (the paper gives none): U ~ N(0, 1/D) (U x keeps x's
  scale), p, lambda ~ N(0, 1). lambda and p enter only through their product (as in Eq. 4).
  Count: 2 D R + N * 2 R, the paper's own formula L x (3 + 6) x 2r + 2dr (+ 2Ld for the gates of
  the fusion branch, see below) read with N matrices.
- code (released WillDreamer/Aurora): a Tucker-style full R x R x R core C (xavier-uniform)
  shared globally, U = Linear(D -> R, no bias, PyTorch's default init), V = Linear(R -> D, no
  bias) zero-init, one xavier-uniform p_j (R) per matrix (D x D block), dropout 0.1 (after the
  core mixing in the ViT, after U in BERT: see Layout), scale 1, no lambda. Count: 2 D R + R^3 +
  N * R.

Targets (``targets``): paper q, k, v (Sec. 3.2, Appendix A); code q, k, v, o, fc1, fc2 (the
released ViT also adapts the attention output projection and both MLP layers). A linear whose
input and output are multiples of D (fc1: D -> 4D, fc2: 4D -> D) is a grid of D x D blocks, each
with its own slice p_j of the core (and lambda_j for the paper), so the count is one p per block.

Layout (``layout``): ``block`` (paper): block (i, o) of a wide linear is the matrix C x_3 p_(i,o),
dropout (if any) right after U. ``released`` (code) reproduces the released MODELS
(WillDreamer/Aurora ``CP/vit.py`` Attention / Mlp, ``CP/med.py`` BertSelfAttention,
``CP/blip_retrieval.py`` for U = ``CP_U``, V = ``CP_V``, C = ``CP_C``):

- every modality but the one named ``text`` is adapted as the released ViT: q, k, v, o from one
  xavier (R, 4) tensor of slices per block (bound sqrt(6 / (R + 4))), the MLP from one (R, 8)
  (bound sqrt(6 / (R + 8)); fc1 takes slices 0-3, fc2 4-7) and the dropout comes AFTER the core
  mixing (``dp(CP_U(x) @ q_cp)``). The MLP slices are interleaved as the released ``Mlp`` reshapes
  them, which a block-by-block layout cannot express: with M_c = C x_3 p_c (R x R, rows = the U
  side),
    fc1 (D -> kD): y = U x @ K1, K1[r, s k + c] = M_c[r, s] (R x kR, ``CPc[:, :, :4].reshape``);
                   output block a is V y[a R : (a + 1) R];
    fc2 (kD -> D): w = [U x_0, ..., U x_(k-1)] (kR), y = w @ K2, K2[t k + c, s] = M_c[s, t]
                   (``fc2_cp.t()``: the core is read TRANSPOSED); output V y.
  So output block a of fc1 mixes rank s of slice c for every (s, c) with s k + c in
  [a R, (a + 1) R), not slice a alone.
- the modality named ``text`` is adapted as the released BERT: q, k, v only (other targets are
  skipped there), one xavier (R, 1) p per matrix (bound sqrt(6 / (R + 1))), dropout after U
  (``CP_V(dp(CP_U(h)) @ (CP_C @ q_CP)[:, :, 0])``). No modality named ``text``: all as the ViT.

The released trainable set (``train_retrieval.py``: ``'CP' in name and '_m' not in name``) is U,
V, C, every p, and the fusion branch's gates; the momentum copies are frozen.

Fusion branch (Sec. 3.3: Informative Context Enhancement, Eq. 5, and Gated Query
Transformation): both live in a cross-modal fusion branch (BLIP's image-grounded text encoder).
No backbone here has one, so Aurora is the mode approximation alone; ``GatedQuery`` (its 2 D
parameters per fusion layer) is kept for ``mmpetl audit params``, which counts the BLIP-base
layout the Aurora paper prints.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from methods.base import ConfigError, MethodConfig, Variant, at_most_hidden, positive, probability, require
from methods.registry import register

ROLES = ("q", "k", "v", "o", "fc1", "fc2")
ATTENTION_ROLES = ("q", "k", "v", "o")
FORMS = ("cp", "tucker")
LAYOUTS = ("block", "released")
TEXT = "text"                            # the modality adapted as the released BERT (layout released)
BERT_ROLES = ("q", "k", "v")


@dataclass
class AuroraConfig(MethodConfig):
    rank: int = 64                       # R (paper Table 1: R = 64 and 128)
    targets: tuple = ("q", "k", "v")     # roles of the stacked matrices
    form: str = "cp"                     # cp (paper, Eq. 2-4) | tucker (released shared core)
    dropout: float = 0.0                 # after U (released: 0.1; the paper gives none)
    scale: float = 1.0                   # multiplies Delta W x (released: s = 1; none in the paper)
    layout: str = "block"                # block (paper) | released (the released ViT / BERT models)

    def validate(self) -> None:
        positive(self, "rank")
        probability(self, "dropout")
        require(self.form in FORMS, self, "form", f"one of {FORMS}")
        require(self.layout in LAYOUTS, self, "layout", f"one of {LAYOUTS}")
        require(isinstance(self.scale, (int, float)) and math.isfinite(self.scale) and self.scale > 0,
                self, "scale", "a finite number > 0")
        targets = tuple(self.targets) if isinstance(self.targets, (list, tuple)) else ()
        require(len(targets) > 0 and all(r in ROLES for r in targets)
                and len(set(targets)) == len(targets), self, "targets",
                f"a non-empty list of distinct roles from {ROLES}")

    def validate_for(self, backbone: nn.Module) -> None:
        at_most_hidden(self, backbone, "rank")
        widths = sorted({backbone.hidden_size(m) for m in backbone.modalities})
        if len(widths) != 1:
            raise ConfigError(f"{type(self).__name__}: aurora shares U and V across every modality "
                              f"and needs one width for all of them; the backbone has widths {widths}")
        width = widths[0]
        for site in _target_sites(backbone, self):
            linear = backbone.get_submodule(site.path)
            require(isinstance(linear, nn.Linear) and linear.in_features % width == 0
                    and linear.out_features % width == 0, self, "targets",
                    f"linears whose sizes are multiples of the width {width}; {site.path} is "
                    f"{getattr(linear, 'in_features', '?')} -> {getattr(linear, 'out_features', '?')}")
            if self.layout == "released":
                require(linear.in_features == width or linear.out_features == width, self,
                        "layout", f"'block' for linears that are neither D -> kD nor kD -> D "
                        f"(the released interleaving is defined for those only); {site.path} is "
                        f"{linear.in_features} -> {linear.out_features}")


def tower(config: AuroraConfig, modality: str) -> str:
    """Which released encoder a modality is adapted as: "vit", "bert" (layout released) or "block"."""
    if config.layout != "released":
        return "block"
    return "bert" if modality == TEXT else "vit"


def _target_sites(backbone: nn.Module, config: AuroraConfig) -> list:
    targets = set(config.targets)
    return [site for site in backbone.linear_sites() if site.role in targets
            and (tower(config, site.modality) != "bert" or site.role in BERT_ROLES)]


class AuroraFactors(nn.Module):
    """The globally shared factors: U (R, D), V (D, R) and, for the Tucker form, the core C."""

    def __init__(self, width: int, rank: int, form: str):
        super().__init__()
        self.width, self.rank, self.form = width, rank, form
        self.U = nn.Parameter(torch.empty(rank, width))
        self.V = nn.Parameter(torch.zeros(width, rank))   # zero: Delta W = 0 at init
        self.core = nn.Parameter(torch.empty(rank, rank, rank)) if form == "tucker" else None
        with torch.no_grad():
            if form == "cp":
                self.U.normal_(0.0, 1.0 / math.sqrt(width))
            else:
                nn.init.kaiming_uniform_(self.U, a=math.sqrt(5))  # nn.Linear's default
                nn.init.xavier_uniform_(self.core)


class AuroraLinear(nn.Module):
    """A frozen ``nn.Linear`` plus its mode-approximated update (one or more D x D blocks).

    ``tower``: "block" (block-wise layout, dropout after U), "vit" (released ViT: interleaved MLP
    slices, dropout after the core mixing) or "bert" (released BERT: dropout after U, (R, 1) p)."""

    def __init__(self, base: nn.Linear, factors: AuroraFactors, role: str, config: AuroraConfig,
                 tower: str = "block"):
        super().__init__()
        self.base = base
        self.factors = factors  # shared: registered in every wrapper, counted once
        width, rank = factors.width, factors.rank
        self.blocks_in = base.in_features // width
        self.blocks_out = base.out_features // width
        self.scale = float(config.scale)
        self.tower = tower
        self.dropout_after = "core" if tower == "vit" else "u"
        self.dropout = nn.Dropout(config.dropout)
        shape = (self.blocks_in, self.blocks_out, rank)
        self.p = nn.Parameter(torch.empty(shape))
        self.lam = nn.Parameter(torch.empty(shape)) if factors.form == "cp" else None
        with torch.no_grad():
            if factors.form == "cp":
                self.p.normal_(0.0, 1.0)
                self.lam.normal_(0.0, 1.0)
            else:  # xavier bounds of the released (R, g) groups: sqrt(6 / (R + g))
                if tower == "bert":
                    group = 1                                  # q_CP, k_CP, v_CP: (R, 1) each
                elif role in ATTENTION_ROLES:
                    group = 4                                  # CP_attention: (R, 4)
                else:
                    group = 2 * max(self.blocks_in, self.blocks_out)  # mlp_CP: (R, 8)
                bound = math.sqrt(6.0 / (rank + group))
                self.p.uniform_(-bound, bound)

    def mixing(self) -> torch.Tensor:
        """(blocks_in, blocks_out, R, R): block (i, o) maps U x_i (rows) to the vector V turns into
        output block o (columns): diag(lambda_j p_j), C x_3 p_j, or the released interleaving."""
        if self.lam is not None:
            return torch.diag_embed(self.lam * self.p)
        slices = torch.tensordot(self.p, self.factors.core, dims=([2], [2]))  # C x_3 p: (i, o, r, s)
        if self.tower != "vit" or self.blocks_in == self.blocks_out == 1:
            return slices
        R = self.factors.rank
        if self.blocks_in == 1:   # fc1: K1[r, s k + c] = M_c[r, s]; output block a = cols [aR, (a+1)R)
            k = self.blocks_out
            big = slices[0].permute(1, 2, 0).reshape(R, R * k)           # (r, s k + c)
            return big.reshape(R, k, R).permute(1, 0, 2).unsqueeze(0)    # (1, a, r, b)
        k = self.blocks_in        # fc2: K2[t k + c, s] = M_c[s, t]; input block a = rows [aR, (a+1)R)
        big = slices[:, 0].permute(2, 0, 1).reshape(R * k, R)            # (t k + c, s)
        return big.reshape(k, R, R).unsqueeze(1)                         # (a, 1, r, s)

    def delta_weight(self) -> torch.Tensor:
        """The explicit (out, in) update, ``scale`` included (for inspection and tests)."""
        f = self.factors
        blocks = torch.einsum("ds,iors,re->odie", f.V, self.mixing(), f.U)  # d: out, e: in
        D = f.width
        return self.scale * blocks.reshape(self.blocks_out * D, self.blocks_in * D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.factors
        lead = x.shape[:-1]
        R = f.rank
        z = x.reshape(*lead, self.blocks_in, f.width) @ f.U.T                 # (..., i, R)
        if self.dropout_after == "u":
            z = self.dropout(z.reshape(*lead, self.blocks_in * R)).reshape(*lead, self.blocks_in, R)
        if self.lam is not None:
            y = torch.einsum("...ir,ior->...or", z, self.lam * self.p)       # diagonal (CP)
        else:
            y = torch.einsum("...ir,iors->...os", z, self.mixing())          # shared core
        if self.dropout_after == "core":  # the released ViT: dp(CP_U(x) @ cp), flat (..., o R)
            y = self.dropout(y.reshape(*lead, self.blocks_out * R)).reshape(*lead, self.blocks_out, R)
        delta = (y @ f.V.T).reshape(*lead, self.blocks_out * f.width)
        return self.base(x) + self.scale * delta


class GatedQuery(nn.Module):
    """Gated Query Transformation on the query (text) residual of a fusion layer: 2 D parameters
    (built by ``mmpetl audit params`` for the BLIP-base counts; no backbone here attaches it).

    paper: gamma, beta zero-initialised (Sec. 4.4), query residual replaced by
    sigmoid(gamma * q + beta) * q (the printed formula is garbled; this is our reading);
    code: q + 0.1 * (q * gamma + beta) with gamma, beta ~ N(0, 2e-4) (no sigmoid)."""

    def __init__(self, width: int, form: str):
        super().__init__()
        self.form = form
        self.gamma = nn.Parameter(torch.zeros(width))
        self.beta = nn.Parameter(torch.zeros(width))
        if form != "cp":
            with torch.no_grad():
                self.gamma.normal_(0.0, 2e-4)
                self.beta.normal_(0.0, 2e-4)

    def forward(self, query: torch.Tensor) -> torch.Tensor:
        if self.form == "cp":
            return torch.sigmoid(self.gamma * query + self.beta) * query
        return query + 0.1 * (query * self.gamma + self.beta)


@register(
    "aurora",
    config=AuroraConfig,
    summary="Aurora (NeurIPS 2023): mode approximation of all stacked attention weights with "
            "globally shared factors U, V (CP with per-matrix p and lambda, or the released "
            "shared Tucker core)",
    variants={
        "paper": Variant("CP mode approximation (Eq. 2-4) of the q/k/v weights of every layer of "
                         "every modality: U, V global, p and lambda per matrix; U, P, lambda "
                         "Gaussian, V = 0 (Delta W = 0 at init)",
                         starts_as_identity=True,
                         defaults={"form": "cp", "targets": ("q", "k", "v"), "dropout": 0.0}),
        "code": Variant("released models: shared R x R x R core (xavier), U = Linear(D->R), "
                        "V = Linear(R->D) zero, no lambda, dropout 0.1; non-text modalities as "
                        "the released ViT (q, k, v, o, fc1, fc2; MLP core slices interleaved; "
                        "dropout after the core mixing), the text modality as the released BERT "
                        "(q, k, v only; dropout after U; (R, 1) xavier p)",
                        starts_as_identity=True,
                        defaults={"form": "tucker", "targets": ROLES, "dropout": 0.1,
                                  "layout": "released"}),
    },
)
def apply(backbone: nn.Module, config: AuroraConfig) -> None:
    width = backbone.hidden_size(backbone.modalities[0])
    factors = AuroraFactors(width, config.rank, config.form)
    for site in _target_sites(backbone, config):
        base = backbone.get_submodule(site.path)
        backbone.set_submodule(site.path, AuroraLinear(base, factors, site.role, config,
                                                       tower(config, site.modality)))
