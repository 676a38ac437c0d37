"""What the sparse engine's tests share: a small MLP with its batches and training step, the
engine with the RigL settings most tests start from, and a checkpoint round trip."""

import io

import torch
from torch import nn

from sparsediff.sparsity import SparseTraining

# RigL updating every 2nd step, a constant 30% of each layer's active weights, all 20 steps long
RIGL = {
    "method": "rigl",
    "sparsity": 0.7,
    "update_interval": 2,
    "prune_ratio": 0.3,
    "prune_schedule": "constant",
    "total_steps": 20,
    "stop_fraction": 1.0,
}

# settings check_settings accepts, for tests that break one at a time
GOOD_SETTINGS = {
    "method": "rigl",
    "sparsity": 0.5,
    "distribution": "erk",
    "update_interval": 100,
    "prune_ratio": 0.05,
    "prune_schedule": "cosine",
    "stop_fraction": 0.75,
    "erk_power_scale": 1.0,
}


def make_sparse(model, opt, **overrides):
    """The engine on ``model`` and ``opt`` with `RIGL`, ``overrides`` replacing its values."""
    return SparseTraining(model, opt, **{**RIGL, **overrides})


def mlp(seed=0):
    """12 -> 24 -> 24 -> 4 with ReLUs, initialised from ``seed``."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 4)
    )


def batch(step):
    """The (x, y) batch of 16 for `mlp` at ``step``: the same batch every time."""
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(16, 12, generator=g), torch.randn(16, 4, generator=g)


def loss(model, step, scale=1.0):
    """Mean squared error of ``model`` on ``batch(step)``, times ``scale``."""
    x, y = batch(step)
    return (model(x) - y).pow(2).mean() * scale


def ema_update(ema, model, decay):
    """``ema = decay * ema + (1 - decay) * model``, parameter by parameter."""
    with torch.no_grad():
        for e, p in zip(ema.parameters(), model.parameters()):
            e.mul_(decay).add_(p, alpha=1 - decay)


def train_step(model, opt, step, ema=None, scaler=None):
    """One optimizer step on ``batch(step)`` (through ``scaler`` if given), then the EMA copy
    ``ema`` (a module) with decay 0.9."""
    opt.zero_grad(set_to_none=True)
    if scaler is None:
        loss(model, step).backward()
        opt.step()
    else:
        scaler.scale(loss(model, step)).backward()
        scaler.step(opt)
        scaler.update()
    if ema is not None:
        ema_update(ema, model, 0.9)


def saved_and_loaded(obj):
    """``obj`` through torch.save and torch.load(weights_only=True), as a checkpoint goes."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def linear_engine(in_features, out_features, momentum=0.0, **overrides):
    """A bias-free Linear, SGD with lr 0 (only the engine moves its weights) and the engine on
    it, from sparsity 0.5 and updating at every step unless ``overrides`` say otherwise."""
    model = nn.Linear(in_features, out_features, bias=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.0, momentum=momentum)
    sparse = make_sparse(model, opt, **{"sparsity": 0.5, "update_interval": 1, **overrides})
    return model, opt, sparse


def step_by_hand(model, opt, sparse, state, mask, weight, grad):
    """One update step of a `linear_engine` from a state set by hand: ``state`` (a saved engine
    state) with ``mask`` as the mask, then ``weight`` and its gradient ``grad``."""
    state["masks"]["weight"] = mask
    sparse.load_state_dict(state)
    with torch.no_grad():
        model.weight.copy_(weight)
    model.weight.grad = grad
    opt.step()
