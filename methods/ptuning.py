"""P-tuning v2 / deep prompt tuning (Liu et al., ACL 2022; methods.md, Baselines), for any M >= 2.

At every layer ``l`` of every modality encoder ``m``, ``num_prompts`` (P) learnable tokens
``P[l][m]`` of shape (P, D_m) are prepended to the layer input; the backbone strips the outputs at
those positions after the layer, so the prompts are fresh at each depth (replaced, not carried
on). Trainable method parameters: ``P * sum_m L_m * D_m`` (``L * P * sum_m D_m`` for the
lock-step backbones, whose encoders share one depth L). ``previous`` is not used.

Mapping to the paper:

- "Deep prompt tuning": prompts at every layer, not only at the input (P-tuning v2, Sec. 3.2).
- Prompt length: P-tuning v2 reports that simple classification tasks prefer short prompts
  (under 20 tokens) and hard sequence-labelling tasks long ones (about 100). Our tasks are
  sentence/clip-level classification and regression, so the default is 10, in the short range
  (and the common deep-prompt length of visual prompt tuning).
- No reparameterisation MLP: P-tuning v2 finds it task-dependent and optional; plain embeddings.
- Prediction: a randomly initialised task head on the encoder output (P-tuning v2 drops the
  verbaliser for a classification head); here the backbone's own head.

Deviations (stated for the tables):

- P-tuning v2 implements its prompts as per-layer *prefixes* (past key / value pairs of 2 * D
  numbers per token, never going through the frozen projections). The backbone contract here
  prepends tokens to each layer's input (``PromptProvider``), so a prompt enters attention as
  ``W_k LN(p) + b_k`` and ``W_v LN(p) + b_v`` (the VPT-deep form). Same number of tokens and
  depth; half the parameters per token (D instead of 2 * D), and the keys / values are
  constrained to the frozen projections' range.
- Init: N(0, ``init_std``) with ``init_std`` = 0.02. The released P-tuning v2 builds its model
  with transformers' ``from_pretrained`` (transformers 4.11.3), which initialises the modules
  missing from the checkpoint, its prefix embedding among them, with BERT's ``_init_weights``:
  N(0, initializer_range = 0.02) as well, by our reading (not run here).
- Dropout: as released (``get_prompt``: ``self.dropout(past_key_values)``, the encoder's
  ``hidden_dropout_prob``, 0.1 for BERT), each sample's copy of the prompts goes through dropout
  (``dropout``, default 0.1) in training; the released code drops the key / value prefixes,
  here the prompt tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from methods.base import MethodConfig, PromptProvider, Variant, positive, probability, require
from methods.registry import register


@dataclass
class PTuningConfig(MethodConfig):
    num_prompts: int = 10    # P, tokens per layer per modality
    init_std: float = 0.02   # N(0, init_std) init of every prompt
    dropout: float = 0.1     # on each sample's prompts in training (P-tuning v2's prefix dropout)

    def validate(self) -> None:
        positive(self, "num_prompts")
        require(self.init_std > 0, self, "init_std", "a standard deviation > 0")
        probability(self, "dropout")


class DeepPrompts(PromptProvider):
    """``prompts[str(depth)][modality]``: (P, D_m), for every depth and modality."""

    def __init__(self, widths: dict[str, int], depths: dict[str, int], config: PTuningConfig):
        super().__init__()
        self.prompts = nn.ModuleDict({
            str(d): nn.ParameterDict({
                m: nn.Parameter(torch.randn(config.num_prompts, width) * config.init_std)
                for m, width in widths.items() if d < depths[m]})
            for d in range(max(depths.values()))})
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, depth: int, states: dict[str, torch.Tensor],
                previous: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        layer = self.prompts[str(depth)]
        return {m: self.dropout(layer[m].expand(x.shape[0], -1, -1))
                for m, x in states.items() if m in layer}


@register(
    "ptuning",
    config=PTuningConfig,
    summary="P-tuning v2 / deep prompt tuning: fresh learnable tokens prepended at every layer of "
            "every modality encoder",
    variants={
        "paper": Variant("deep prompts at every layer of every encoder, 10 tokens each, "
                         "N(0, 0.02) init, prompt dropout 0.1, no reparameterisation",
                         starts_as_identity=False),
    },
)
def apply(backbone: nn.Module, config: PTuningConfig) -> None:
    widths = {m: backbone.hidden_size(m) for m in backbone.modalities}
    depths = {m: backbone.num_layers(m) for m in backbone.modalities}
    backbone.set_prompts(DeepPrompts(widths, depths, config))
