"""Exponential moving average of a model's weights (the weights diffusion models sample from)."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """EMA copy of a model, LDM-style: decay_t = min(decay, (1 + n) / (10 + n)) with warm-up.

    The copy is a plain module with the model's parameter names, so the sparse engine can keep it
    exactly as sparse as the live model (``SparseTraining(..., ema=ema.module)``). Averaging
    preserves zeros: a masked entry that is zero in both stays zero.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True) -> None:
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self.warmup = warmup
        self.num_updates = 0

    def current_decay(self) -> float:
        """The decay the next update uses."""
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """ema <- d * ema + (1 - d) * model, for parameters; buffers are copied."""
        d = self.current_decay()
        ema_params = [p for p in self.module.parameters()]
        live_params = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema_params, live_params, 1.0 - d)
        for b_ema, b in zip(self.module.buffers(), model.buffers(), strict=True):
            b_ema.copy_(b)
        self.num_updates += 1

    def state_dict(self) -> dict:
        """Weights and the update count."""
        return {"module": self.module.state_dict(), "num_updates": self.num_updates}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` saved."""
        self.module.load_state_dict(state["module"])
        self.num_updates = int(state["num_updates"])
