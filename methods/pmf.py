"""PMF: prompt-based multimodal fusion (Li, Quan, Zhu and Yang, "Efficient multimodal fusion via
interactive prompting", CVPR 2023), modified for M > 2 modalities as the Wander paper does
(Sec. 4.2; methods.md, Baselines).

PMF keeps the lower layers of every unimodal encoder untouched and adds prompts only in the last
``fusion_layers`` (F, default 2) layers, the fusion layers. In each fusion layer every modality
has three kinds of learnable prompts:

- query prompts Q (``num_query``, 4): their outputs carry this modality's information to the
  others;
- query-context prompts C^Q (``num_query_context``, 4): context for the queries;
- fusion-context prompts C^F (``num_fusion_context``, 4): context for the fusion with the
  translated queries of the other modality;

and a non-linear translator (a 2-layer MLP, D_src -> hidden -> D_dst, ReLU as in the released
``MLP_adapter``) maps a modality's
query outputs into the other modality's space, where they are fed to that modality's layer.

Our reading, in the ``PromptProvider`` contract (one pass per layer; the provider sees the
outputs at the prompt positions of the previous layer as ``previous``). For fusion layer d (the
k-th of F, k = 0 .. F-1), modality m gets the prompt block

    [ Q_d^m ; C^Q_d^m ; C^F_d^m ; T_d^m ]        (T_d^m only for k >= 1)
    T_d^m = mean_{n != m} f_{d, n->m}( previous[n][:, :num_query] )

i.e. the translated queries entering layer d are the query OUTPUTS of layer d-1 of every other
modality. Every fusion layer k >= 1 has one translator per ordered pair (n, m), n != m; the first
fusion layer has none (no query outputs exist before it). For M = 2 the mean is over one
modality (PMF exactly); for M > 2 we take the MEAN (not the sum) of the translated queries of all
other modalities, so the number of translated tokens (``num_query``) and their scale do not grow
with M. ``reduce = "sum"`` is offered as the alternative.

Trainable method parameters (``paper`` variant), with n = num_query + num_query_context +
num_fusion_context and h_{nm} the translator width of the pair:

    F * n * sum_m D_m + (F - 1) * sum_{n != m} (D_n * h_{nm} + h_{nm} + h_{nm} * D_m + D_m)

Translator width: ``translator_hidden`` None (default) = half the wider width of the pair,
h = max(D_n, D_m) // 2, as the released ``check_args`` sets it (384 for ViT-B / BERT-base; width 40
gives 20, the audit's width 32 gives 16). An explicit integer is used as given.

Deviations from PMF (stated for the tables):

- PMF runs each fusion layer in two stages (a query stage with Q and C^Q, then a fusion stage with
  C^F and the translated queries of the same layer). The contract allows one pass per layer, so
  all prompts share the pass and the translated queries lag one layer: F fusion layers give F - 1
  translation steps (PMF: F), hence F >= 2 is required, and there are (F - 1) rather than F
  translators per ordered pair. Q, C^Q and C^F remain separate tensors (the ``code`` variant
  freezes C^F) but play the same role in the single pass.
- Prediction: PMF averages per-modality heads; our backbones have one shared task head, which is
  kept (``backbone.head``).
- Prompt init N(0, ``init_std``) = N(0, 0.02); translators use the torch default Linear init.
- PMF stops gradients below the first fusion layer to save memory; here no trainable tensor lies
  below it, so autograd never reaches those layers anyway.

Variants: ``paper`` trains every prompt. ``code``: the released PMF never unfreezes its
fusion-context prompts, so they stay at their random init (still fed to the layers) and never
train; they are not counted as trainable. Flagged.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from methods.base import MethodConfig, PromptProvider, Variant, positive, require
from methods.registry import register

PROMPT_KINDS = ("query", "query_context", "fusion_context")


@dataclass
class PMFConfig(MethodConfig):
    fusion_layers: int = 2                 # F, the last F layers of every encoder
    num_query: int = 4                     # query prompts per fusion layer per modality
    num_query_context: int = 4             # query-context prompts
    num_fusion_context: int = 4            # fusion-context prompts
    translator_hidden: int | None = None   # None = max(D_src, D_dst) // 2
    reduce: str = "mean"                   # how the translated queries of all others combine
    init_std: float = 0.02                 # N(0, init_std) init of every prompt
    train_fusion_context: bool = True      # False = released PMF (code variant)

    def validate(self) -> None:
        positive(self, "fusion_layers", "num_query")
        require(self.fusion_layers >= 2, self, "fusion_layers",
                "an integer >= 2 (translated queries enter one layer after the queries are "
                "computed, so one fusion layer has no interaction)")
        for field in ("num_query_context", "num_fusion_context"):
            require(getattr(self, field) >= 0, self, field, "an integer >= 0")
        if self.translator_hidden is not None:
            positive(self, "translator_hidden")
        require(self.reduce in ("mean", "sum"), self, "reduce", "'mean' or 'sum'")
        require(self.init_std > 0, self, "init_std", "a standard deviation > 0")

    def validate_for(self, backbone: nn.Module) -> None:
        depth = min(backbone.num_layers(m) for m in backbone.modalities)
        require(self.fusion_layers <= depth, self, "fusion_layers",
                f"at most the backbone depth ({depth})")


def translator_width(config: PMFConfig, d_src: int, d_dst: int) -> int:
    if config.translator_hidden is not None:
        return config.translator_hidden
    return max(1, max(d_src, d_dst) // 2)


class Translator(nn.Sequential):
    """PMF's non-linear query translator: D_src -> hidden -> D_dst."""

    def __init__(self, d_src: int, hidden: int, d_dst: int):
        super().__init__(nn.Linear(d_src, hidden), nn.ReLU(), nn.Linear(hidden, d_dst))


class InteractivePrompts(PromptProvider):
    """``query / query_context / fusion_context [str(d)][m]``: (n_kind, D_m) for the fusion depths
    d; ``translators[str(d)][m][n]``: f_{d, n->m} for the fusion depths after the first."""

    def __init__(self, widths: dict[str, int], depth: int, config: PMFConfig):
        super().__init__()
        self.modalities = tuple(widths)
        self.config = config
        self.fusion_depths = tuple(range(depth - config.fusion_layers, depth))
        sizes = {"query": config.num_query, "query_context": config.num_query_context,
                 "fusion_context": config.num_fusion_context}
        for kind in PROMPT_KINDS:
            if sizes[kind]:
                self.add_module(kind, nn.ModuleDict({
                    str(d): nn.ParameterDict({
                        m: nn.Parameter(torch.randn(sizes[kind], w) * config.init_std)
                        for m, w in widths.items()})
                    for d in self.fusion_depths}))
        self.kinds = tuple(kind for kind in PROMPT_KINDS if sizes[kind])
        self.translators = nn.ModuleDict({
            str(d): nn.ModuleDict({
                m: nn.ModuleDict({
                    n: Translator(widths[n], translator_width(config, widths[n], widths[m]),
                                  widths[m])
                    for n in self.modalities if n != m})
                for m in self.modalities})
            for d in self.fusion_depths[1:]})

    def translated(self, depth: int, target: str,
                   previous: dict[str, torch.Tensor]) -> torch.Tensor:
        """T_d^target: the other modalities' query outputs of layer d-1, translated and reduced."""
        q = self.config.num_query
        parts = [f(previous[n][:, :q]) for n, f in self.translators[str(depth)][target].items()]
        total = torch.stack(parts).sum(0)
        return total / len(parts) if self.config.reduce == "mean" else total

    def forward(self, depth: int, states: dict[str, torch.Tensor],
                previous: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if depth not in self.fusion_depths:
            return {}
        translate = str(depth) in self.translators
        if translate:
            missing = [m for m in self.modalities if m not in previous]
            if missing:
                raise RuntimeError(f"PMF at depth {depth}: no query outputs of the previous layer "
                                   f"for {missing}; the backbone must pass `previous`")
        out = {}
        for m, x in states.items():
            block = [getattr(self, kind)[str(depth)][m].expand(x.shape[0], -1, -1)
                     for kind in self.kinds]
            if translate:
                block.append(self.translated(depth, m, previous))
            out[m] = torch.cat(block, dim=1)
        return out


@register(
    "pmf",
    config=PMFConfig,
    summary="PMF interactive prompting: query / query-context / fusion-context prompts in the last "
            "layers, MLP translators carrying each modality's query outputs to the others",
    variants={
        "paper": Variant("PMF: last 2 layers, 4 + 4 + 4 prompts, 2-layer MLP translators "
                         "(ReLU, hidden half the wider width), mean of "
                         "the translated queries of all other modalities, every prompt trained",
                         starts_as_identity=False),
        "code": Variant("released PMF: as paper, but the fusion-context prompts are never "
                        "unfrozen (fixed at their random init)",
                        starts_as_identity=False,
                        defaults={"train_fusion_context": False},
                        flag="released PMF never unfreezes its fusion-context prompts "
                             "(prompts.fusion_context.<depth>.<modality>, every fusion depth and "
                             "modality): they stay at their random init, get no gradient and are "
                             "not counted as trainable"),
    },
)
def apply(backbone: nn.Module, config: PMFConfig) -> None:
    widths = {m: backbone.hidden_size(m) for m in backbone.modalities}
    depth = min(backbone.num_layers(m) for m in backbone.modalities)
    provider = InteractivePrompts(widths, depth, config)
    if not config.train_fusion_context and hasattr(provider, "fusion_context"):
        for parameter in provider.fusion_context.parameters():
            parameter.requires_grad_(False)
    backbone.set_prompts(provider)
