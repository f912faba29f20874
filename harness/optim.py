"""Adam / AdamW and the StepLR schedule of the training loop, without ``torch.optim.Optimizer``.

``torch.optim.Optimizer`` (torch 2.13) imports ``torch._dynamo`` in its constructor
(``add_param_group`` is wrapped by ``torch._disable_dynamo``) and in every ``step`` (its
``_use_grad_for_differentiable`` wrapper): 1-2.5 s of imports for ``torch.compile`` support, which
the harness never uses, more than a tiny run's whole training. No constructor option (``foreach``,
``fused``, ``differentiable``) avoids it. The update here is ``torch.optim.adam.adam``, the function
``torch.optim.Adam.step`` calls, with the same arguments and the same lazily created state, except
``foreach=True``: one multi-tensor call per step instead of a Python loop over the parameters
(torch.optim's default on CPU). Both compute the same operations in the same order, so the
parameters come out bit for bit the same (tests/test_performance.py checks it against
``torch.optim.Adam`` / ``AdamW`` with ``foreach=False`` and ``StepLR``).
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.optim.adam import adam


class Adam:
    """Adam (``decoupled_weight_decay=False``) or AdamW (``True``), defaults as ``torch.optim``'s:
    betas (0.9, 0.999), eps 1e-8, no amsgrad; parameters without a gradient are skipped."""

    def __init__(self, params: Iterable[torch.Tensor], lr: float, weight_decay: float = 0.0,
                 decoupled_weight_decay: bool = False, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8):
        self.params = list(params)
        self.lr, self.weight_decay, self.decoupled = lr, weight_decay, decoupled_weight_decay
        self.betas, self.eps = betas, eps
        self.state: dict[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def zero_grad(self) -> None:
        for parameter in self.params:
            parameter.grad = None

    @torch.no_grad()
    def step(self) -> None:
        with_grad = [p for p in self.params if p.grad is not None]
        if not with_grad:
            return
        for p in with_grad:
            if p not in self.state:  # (exp_avg, exp_avg_sq, step): torch.optim.Adam's lazy init
                self.state[p] = (torch.zeros_like(p, memory_format=torch.preserve_format),
                                 torch.zeros_like(p, memory_format=torch.preserve_format),
                                 torch.tensor(0.0, dtype=_scalar_dtype()))
        exp_avgs, exp_avg_sqs, steps = zip(*(self.state[p] for p in with_grad))
        adam(with_grad, [p.grad for p in with_grad], list(exp_avgs), list(exp_avg_sqs), [],
             list(steps), foreach=True, fused=None, has_complex=any(map(torch.is_complex, with_grad)),
             amsgrad=False, beta1=self.betas[0], beta2=self.betas[1], lr=self.lr,
             weight_decay=self.weight_decay, eps=self.eps, maximize=False,
             decoupled_weight_decay=self.decoupled)


class StepLR:
    """``torch.optim.lr_scheduler.StepLR``: every ``step_size`` epochs the learning rate is
    multiplied by ``gamma`` (the same running product, so the same floats)."""

    def __init__(self, optimizer: Adam, step_size: int, gamma: float):
        self.optimizer, self.step_size, self.gamma, self.epoch = optimizer, step_size, gamma, 0

    def step(self) -> None:
        self.epoch += 1
        if self.epoch % self.step_size == 0:
            self.optimizer.lr *= self.gamma


def _scalar_dtype() -> torch.dtype:
    """The dtype torch.optim keeps ``step`` in: float64 under a float64 default, else float32."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
