"""A backbone of per-modality layer stacks run in lock-step, implementing the method contract
(see methods/base.py for the contract itself)."""
from __future__ import annotations

import torch
from torch import nn

from methods.base import LinearSite, PromptProvider
from harness.backbones.layers import EncoderLayer

ATTENTION_ROLES = ("q", "k", "v", "o")
FFN_ROLES = ("fc1", "fc2")


def lockstep_encode(backbone: nn.Module, states: dict[str, torch.Tensor],
                    valid: dict[str, torch.Tensor | None], run_layer, finish) -> dict[str, torch.Tensor]:
    """The lock-step loop over depth shared by the per-modality backbones: before each depth the
    prompt provider's tokens are prepended (mask extended), ``run_layer(m, depth, x, mask)`` runs
    modality m's layer, the prompt outputs are stripped (and handed to the provider at the next
    depth); after the last depth ``finish(states)`` applies the final norms; the fusion hook of
    each depth sees every modality's states."""
    previous: dict[str, torch.Tensor] = {}
    for depth in range(backbone.depth):
        extra = backbone.prompts(depth, states, previous) if backbone.prompts is not None else {}
        previous = {}
        for m in backbone.modalities:
            x, mask = states[m], valid[m]
            prompt = extra.get(m)
            if prompt is not None:
                x = torch.cat([prompt.to(x.dtype), x], dim=1)
                if mask is not None:
                    mask = torch.cat([mask.new_ones(mask.shape[0], prompt.shape[1]), mask], dim=1)
            x = run_layer(m, depth, x, mask)
            if prompt is not None:
                previous[m], x = x[:, : prompt.shape[1]], x[:, prompt.shape[1]:]
            states[m] = x
        if depth == backbone.depth - 1:
            states = finish(states)
        if str(depth) in backbone.fusion_hooks:
            states = backbone.fusion_hooks[str(depth)](states)
    return states


class HookPoints:
    """The prompt and fusion-hook points of the method contract; a backbone using it sets
    ``self.prompts = None`` and ``self.fusion_hooks = nn.ModuleDict()`` and has ``depth``.

    Alternative heads (methods/base.py, ``use_head``): a backbone offering some lists their names
    in ``head_options`` and builds them in ``make_head(name)``; ``set_head`` installs one and
    records it in ``head_choice`` (which the backbone's pooling may read)."""

    head_options: tuple[str, ...] = ()
    head_choice: str = "default"

    def make_head(self, name: str) -> nn.Module:
        raise NotImplementedError

    def set_head(self, name: str) -> None:
        if name not in self.head_options:
            raise ValueError(f"{type(self).__name__} offers no head {name!r}; "
                             f"offered: {list(self.head_options)}")
        head = self.make_head(name)
        reference = next(self.head.parameters(), None)
        if reference is not None:  # where and in which precision the backbone's head was
            head = head.to(device=reference.device, dtype=reference.dtype)
        self.head = head
        self.head_choice = name

    def set_prompts(self, provider: PromptProvider) -> None:
        self.prompts = provider

    def set_fusion_hook(self, depth: int, module: nn.Module) -> None:
        if not 0 <= depth < self.depth:
            raise ValueError(f"fusion hook depth must be in [0, {self.depth}), got {depth}")
        self.fusion_hooks[str(depth)] = module


class LockstepBackbone(HookPoints, nn.Module):
    """Subclasses build ``self.encoders`` ({modality: ModuleList[EncoderLayer]}, equal depths),
    ``self.final_norms`` ({modality: LayerNorm}), ``self.head`` and implement ``embed`` and ``pool``."""

    modalities: tuple[str, ...]
    encoders: nn.ModuleDict
    final_norms: nn.ModuleDict
    head: nn.Module

    def __init__(self):
        super().__init__()
        self.prompts: PromptProvider | None = None
        self.fusion_hooks = nn.ModuleDict()

    # --- what subclasses provide -------------------------------------------------------------
    def embed(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def pool(self, states: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def seq_len(self, modality: str) -> int:
        raise NotImplementedError

    # --- the method contract ----------------------------------------------------------------
    def hidden_size(self, modality: str) -> int:
        return self.final_norms[modality].normalized_shape[0]

    def num_layers(self, modality: str) -> int:
        return len(self.encoders[modality])

    @property
    def depth(self) -> int:
        return self.num_layers(self.modalities[0])

    def layer(self, modality: str, depth: int) -> EncoderLayer:
        return self.encoders[modality][depth]

    def linear_sites(self) -> list[LinearSite]:
        sites = []
        for modality in self.modalities:
            for depth in range(self.num_layers(modality)):
                prefix = f"encoders.{modality}.{depth}"
                sites += [LinearSite(f"{prefix}.attn.{r}", modality, depth, r) for r in ATTENTION_ROLES]
                sites += [LinearSite(f"{prefix}.ffn.{r}", modality, depth, r) for r in FFN_ROLES]
        return sites

    def set_adapter(self, point: str, modality: str, depth: int, module: nn.Module) -> None:
        if point not in ("attn", "ffn"):
            raise ValueError(f"adapter point must be 'attn' or 'ffn', got {point!r}")
        setattr(self.layer(modality, depth), f"{point}_adapter", module)

    # --- forward ----------------------------------------------------------------------------
    def encode(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Per-modality token states after the last layer (and its fusion hook, if any)."""
        valid = {m: batch.get(f"mask_{m}") for m in self.modalities}  # (B, L_m) bool, True = token
        return lockstep_encode(
            self, self.embed(batch), valid,
            run_layer=lambda m, depth, x, mask: self.encoders[m][depth](x, mask),
            finish=lambda states: {m: self.final_norms[m](x) for m, x in states.items()})

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.head(self.pool(self.encode(batch)))
