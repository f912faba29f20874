"""MaPLe: multi-modal prompt learning (Khattak et al., CVPR 2023), with the Wander paper's cascade
for M > 2 modalities (Wander, Sec. 4.2: "we use a cascade structure to condition the prompts
between modalities"; methods.md, Baselines).

MaPLe for two modalities (language L, vision V), at every depth ``i < J`` (J = prompt depth):

    P^L_i  learnable (b, D_L)                   language prompts (deep, one set per depth)
    P^V_i = F_i(P^L_i)                          vision prompts from a per-depth linear coupling
                                                F_i: D_L -> D_V (weight and bias)

Both sets are prepended to the depth-i inputs and replace the previous prompts; from depth J on
no new prompts are learnt and the prompt positions' outputs of depth i-1 are carried into depth i
(in CLIP the prompt tokens simply stay in the sequence). Here that is ``previous[m]``, the
outputs at the prompt positions that ``LockstepBackbone.encode`` hands the provider.

Cascade for M > 2: the modalities are ordered ``(source, m_1, ..., m_{M-1})`` where ``source`` is
the language modality (``config.source``; None = the backbone's first modality, text for every
task here) and the others follow in backbone order; then for every depth i < J

    P^{m_{k+1}}_i = F_{k,i}(P^{m_k}_i),    F_{k,i}: D_{m_k} -> D_{m_{k+1}} (weight and bias).

For M = 2 this is exactly MaPLe. Couplings map between the two modalities' hidden sizes, which
may differ. Trainable method parameters, with b = ``num_prompts``:

    J * b * D_source + J * sum_{k=0}^{M-2} (D_{m_k} * D_{m_{k+1}} + D_{m_{k+1}})

Defaults are MaPLe's: b = 2 tokens, J = 9. J is clipped to the backbone depth (MaPLe's 9 is for
the 12-layer CLIP encoders; the audit backbone has 2 layers, where J = 2 means every layer gets
coupled prompts and nothing is carried). The config keeps the requested value; the provider
records the effective one as ``prompt_depth``.

Deviations: MaPLe initialises the first-layer language prompts from the embedding of
"a photo of a" (CLIP); our backbones have no text template, so every language prompt is
N(0, ``init_std``) = N(0, 0.02) as MaPLe's deeper prompts are. MaPLe's first-layer text prompts
replace template tokens inside the sequence; here all prompts are prepended.

Init of the couplings, as released (``trainers/maple.py``): the depth-0 coupling is a Linear of
its own; the deeper ones (depths 1 .. J-1) start as copies of one Linear (``_get_clones``, a deep
copy per depth), so they begin identical and part as they train. Each link of the cascade has
its own such pair.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from methods.base import MethodConfig, PromptProvider, Variant, positive, require
from methods.registry import register


@dataclass
class MaPLeConfig(MethodConfig):
    num_prompts: int = 2          # b, tokens per modality per depth
    prompt_depth: int = 9         # J, clipped to the backbone depth
    init_std: float = 0.02        # N(0, init_std) init of the source (language) prompts
    source: str | None = None     # the language modality; None = the backbone's first modality

    def validate(self) -> None:
        positive(self, "num_prompts", "prompt_depth")
        require(self.init_std > 0, self, "init_std", "a standard deviation > 0")

    def validate_for(self, backbone: nn.Module) -> None:
        if self.source is not None:
            require(self.source in backbone.modalities, self, "source",
                    f"one of the backbone's modalities {list(backbone.modalities)}")


def cascade_order(modalities: tuple[str, ...], source: str | None) -> tuple[str, ...]:
    """``(source, the others in backbone order)``: the coupling chain."""
    source = modalities[0] if source is None else source
    return (source,) + tuple(m for m in modalities if m != source)


class CoupledPrompts(PromptProvider):
    """``source[str(i)]``: (b, D_source) language prompts; ``couplings[str(i)][m]``: the linear map
    from the previous modality of the chain into modality ``m`` at depth ``i`` (``i < J``)."""

    def __init__(self, widths: dict[str, int], order: tuple[str, ...], prompt_depth: int,
                 config: MaPLeConfig):
        super().__init__()
        self.order = order
        self.prompt_depth = prompt_depth  # effective J
        shape = (config.num_prompts, widths[order[0]])
        self.source = nn.ParameterDict({
            str(i): nn.Parameter(torch.randn(shape) * config.init_std) for i in range(prompt_depth)})
        links = list(zip(order, order[1:]))
        first = {dst: nn.Linear(widths[src], widths[dst]) for src, dst in links}
        deep = {dst: nn.Linear(widths[src], widths[dst]) for src, dst in links}  # cloned per depth
        self.couplings = nn.ModuleDict({
            str(i): nn.ModuleDict(first if i == 0 else copy.deepcopy(deep))
            for i in range(prompt_depth)})

    def coupled(self, depth: int) -> dict[str, torch.Tensor]:
        """The (b, D_m) prompts of every modality at depth ``depth < J``, down the cascade."""
        prompts = {self.order[0]: self.source[str(depth)]}
        for src, dst in zip(self.order, self.order[1:]):
            prompts[dst] = self.couplings[str(depth)][dst](prompts[src])
        return prompts

    def forward(self, depth: int, states: dict[str, torch.Tensor],
                previous: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if depth >= self.prompt_depth:  # beyond J: carry the processed prompts on
            return {m: p for m, p in previous.items() if m in states}
        batch = next(iter(states.values())).shape[0]
        return {m: p.expand(batch, -1, -1) for m, p in self.coupled(depth).items() if m in states}


@register(
    "maple",
    config=MaPLeConfig,
    summary="MaPLe coupled prompts: language prompts at the first J layers, every other modality's "
            "prompts from them by per-depth linear couplings (a cascade for M > 2)",
    variants={
        "paper": Variant("MaPLe: 2 tokens, prompt depth 9 (clipped to the backbone depth), "
                         "per-depth linear couplings, cascade source -> m_1 -> ... for M > 2",
                         starts_as_identity=False),
    },
)
def apply(backbone: nn.Module, config: MaPLeConfig) -> None:
    widths = {m: backbone.hidden_size(m) for m in backbone.modalities}
    depth = min(backbone.num_layers(m) for m in backbone.modalities)
    order = cascade_order(tuple(backbone.modalities), config.source)
    backbone.set_prompts(CoupledPrompts(widths, order, min(config.prompt_depth, depth), config))
