"""`SparseTraining`: attaches sparse-to-sparse training to a model and its optimizer.

Masks are boolean tensors next to plain weights that hold zeros; nothing is
monkey-patched. All work happens in an optimizer step post-hook:

1. re-zero the masked weights and their optimizer state with ``torch._foreach_mul_``
   (gradients are never masked, so RigL can read the dense gradient);
2. on an update step of a method that updates masks, ask the method for drop and grow
   scores and the granularity for the new mask, then zero the weights, optimizer state and
   EMA entries that changed.

The optimizer may be a wrapper that keeps the torch optimizer as ``.optimizer`` (accelerate's
``AcceleratedOptimizer``); the EMA a copy of the model, a torch ``AveragedModel`` or an object
with ``shadow_params`` (diffusers' ``EMAModel``).
"""

import math
import time
import types
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.optim.swa_utils import AveragedModel

from .granularity import Unstructured, parse_granularity
from .methods import METHODS
from .schedules import is_update_step, prune_fraction, stop_step
from .scores import LayerScores, seeded_generator
from .selection import select_parameters, unwrap
from .settings import SparseSettings, check_int

_STATE_FORMAT = "sparsediff.sparsity/1"


@dataclass
class _Layer:
    """One maskable parameter and everything kept alongside it."""

    name: str
    index: int
    param: nn.Parameter
    mask: torch.Tensor  # bool, on the parameter's device; True = active
    fmask: torch.Tensor  # the mask in the parameter's dtype/layout, for the per-step multiply
    ever: torch.Tensor  # bool: ever active (in-time over-parameterisation)
    active: int  # number of True entries, kept on the host so no step needs a sync
    units: tuple[int, ...] | None  # shape of the granularity's unit view; None: always dense
    view: Unstructured  # how its units are seen (the granularity, or a GRU unit's part of it)


def check_settings(prefix: str = "", **settings: Any) -> None:
    """Raise a ValueError naming the first setting no run could use: ``SparseSettings`` rules
    for settings given by name (kept for callers that check before building anything)."""
    SparseSettings.of(**settings).check(prefix)


def _engine_config(settings: SparseSettings, total_steps: int, seed: int) -> dict[str, Any]:
    """What the engine runs by, as saved in its state: the settings that move masks, the
    schedule's length and the seed."""
    check_int("total_steps", total_steps, 1)
    check_int("seed", seed, 0)
    keep = ("exclude", "include", "tie_stream")  # given at attachment, not saved per step
    config = {k: v for k, v in vars(settings).items() if k not in keep}
    return {**config, "total_steps": total_steps, "seed": seed}


def _check_config(config: Mapping[str, Any]) -> None:
    settings = {k: v for k, v in config.items() if k not in ("total_steps", "seed")}
    SparseSettings.of(**settings).check()
    _engine_config(SparseSettings(), config["total_steps"], config["seed"])


def _maskable(
    model: nn.Module, optimizer: torch.optim.Optimizer, settings: SparseSettings
) -> dict[str, nn.Parameter]:
    """The parameters to mask, checked: there are some, and the optimizer holds them all."""
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be an nn.Module, got {type(model).__name__}")
    params = select_parameters(model, settings.include or None, settings.exclude)
    if not params:
        raise ValueError(
            "model has nothing to mask: no Linear/Conv/ConvTranspose/RNN/MultiheadAttention "
            "weights are left after exclude; widen include or narrow exclude"
        )
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    missing = [name for name, p in params.items() if id(p) not in held]
    if missing:
        raise ValueError(
            f"optimizer must hold every maskable parameter of model; missing {missing[:5]}"
        )
    return params


def _structured(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    settings: SparseSettings,
    granularity: Unstructured,
) -> tuple[dict[str, nn.Parameter], dict[str, Unstructured], list[list[str]]]:
    """The maskable parameters, each one's unit view, and the groups the granularity itself
    ties (``unit``: a GRU layer and direction, biases included)."""
    params = _maskable(model, optimizer, settings)
    structure = getattr(granularity, "structure", None)
    if structure is None or METHODS[settings.method].all_dense:
        return params, dict.fromkeys(params, granularity), []
    inner = unwrap(model)
    views, groups = structure(inner, list(params))
    named = dict(inner.named_parameters())
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    extra = {n: named[n] for group in groups for n in group if n not in params}
    missing = [name for name, p in extra.items() if id(p) not in held]
    if missing:
        raise ValueError(f"optimizer must hold the unit members of model; missing {missing[:5]}")
    order = {name: i for i, name in enumerate(named)}  # parameter order, biases in place
    params = dict(sorted({**params, **extra}.items(), key=lambda kv: order[kv[0]]))
    return params, {name: views[name] for name in params}, groups


def _torch_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer inside wrappers that keep it as ``.optimizer``.

    accelerate's ``AcceleratedOptimizer`` subclasses ``Optimizer`` without initialising it (it
    has no hooks of its own); its ``step`` calls the inner one's, or skips it (fp16 overflow,
    gradient accumulation), so hooks on the inner optimizer fire exactly for real steps.
    """
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise ValueError(
            "optimizer must be a torch.optim.Optimizer or a wrapper that holds one as "
            f".optimizer, got {type(optimizer).__name__}"
        )
    return optimizer


def _resolve_ema(
    ema: Any, names: list[str], params: Mapping[str, nn.Parameter]
) -> dict[str, torch.Tensor]:
    """The EMA's tensor for every maskable name (validated, nothing touched).

    ``ema`` is a copy of the model with its parameter names, a torch ``AveragedModel`` (whose
    ``.module`` is such a copy) or an object with ``shadow_params`` (diffusers' ``EMAModel``): a
    list of tensors in ``model.parameters()`` order, matched to ``names`` (all of the model's
    parameter names, in that order) by position. Looked up afresh on every use, since
    ``EMAModel.to()`` and ``load_state_dict()`` replace the list.
    """
    if ema is None:
        return {}
    if isinstance(ema, AveragedModel):
        ema = ema.module
    if isinstance(ema, nn.Module):
        named = dict(unwrap(ema).named_parameters())
    elif isinstance(getattr(ema, "shadow_params", None), list | tuple):
        shadow = ema.shadow_params
        if len(shadow) != len(names):
            raise ValueError(
                f"ema.shadow_params holds {len(shadow)} tensors but model has {len(names)} "
                "parameters; build the EMA from model.parameters()"
            )
        named = dict(zip(names, shadow))
    else:
        raise ValueError(
            "ema must be a copy of model (an nn.Module with its parameter names), a "
            "torch.optim.swa_utils.AveragedModel or an EMA with shadow_params (diffusers' "
            f"EMAModel), got {type(ema).__name__}"
        )
    for name, param in params.items():
        if name not in named or named[name].shape != param.shape:
            raise ValueError(
                f"ema must have the parameters of model; {name!r} is missing or has another shape"
            )
        if named[name] is param:
            raise ValueError("ema must be a separate copy of model, not the model itself")
    return {name: named[name] for name in params}


class SparseTraining:
    """Sparse-to-sparse training (dense, Static, RigL, MagRan) through optimizer step hooks.

    Construct it after the optimizer and before training; then call ``optimizer.step()``
    (or ``scaler.step(optimizer)``) as usual. See ``docs/engine.md``.

    Args:
        model: the model (or its DDP/DataParallel wrapper; names are the inner module's).
        optimizer: the optimizer that holds every maskable parameter of ``model``, or a
            wrapper that keeps it as ``.optimizer`` (accelerate's ``AcceleratedOptimizer``).
        settings: what to train (:class:`~sparsediff.sparsity.SparseSettings`: method,
            sparsity, layer distribution, ΔT, p and its schedule, granularity, ...); keyword
            arguments named like its fields replace its values, so
            ``SparseTraining(model, opt, method="rigl", sparsity=0.5, total_steps=N)`` works
            too. Without either: the defaults, dense.
        total_steps: planned optimizer steps of the run (required: the schedule ends at
            ``stop_fraction * total_steps``).
        ema: kept exactly as sparse as ``model``: an EMA copy of it (same parameter names),
            a torch ``AveragedModel`` or diffusers' ``EMAModel`` (``shadow_params``).
        seed: seeds the initial masks and MagRan's growth, with the step and layer index.
        tied: groups of parameter names whose channels are switched on and off together
            (``channel`` granularity; equal row counts): one mask per group, dropped by the
            channels' norm over all members and grown by their joint gradient norm. For the
            layers that write one residual stream (``models.unet.stream_groups``), so that a
            stream channel is dead in every writer and a condensed network can remove it;
            ``settings.tie_stream`` says that they are given.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        settings: SparseSettings | None = None,
        *,
        total_steps: int,
        ema: Any = None,
        seed: int = 0,
        tied: Iterable[Iterable[str]] = (),
        **options: Any,
    ) -> None:
        settings = SparseSettings.of(settings, **options)
        # Validate everything before touching the model or the optimizer.
        settings.check()
        settings = settings.resolved()
        self._config = _engine_config(settings, total_steps, seed)
        optimizer = _torch_optimizer(optimizer)
        self._granularity = parse_granularity(
            settings.granularity,
            channel_sparsity=settings.channel_sparsity,
            min_salient=settings.min_salient,
        )
        params, views, unit_groups = _structured(model, optimizer, settings, self._granularity)
        names = [name for name, _ in unwrap(model).named_parameters()]
        _resolve_ema(ema, names, params)
        groups = _check_tied([*tied, *unit_groups], params, settings.granularity, views)
        self._settings = settings
        self._method = METHODS[settings.method]
        self._model = unwrap(model)
        self._optimizer = optimizer
        self._ema = ema
        self._names = names
        self._step = 0
        self._version = 0  # counts mask changes: a condensed network is rebuilt on a new one
        self._last: dict[str, Any] = _no_update(list(params))
        self._layers = self._initial_layers(params, views, groups, settings, seed)
        by_name = {layer.name: layer for layer in self._layers}
        lead = {name for group in groups for name in group}
        self._tied = [list(group) for group in groups]
        # update units: every tied group, then every other layer alone
        self._units = [[by_name[name] for name in group] for group in groups]
        self._units += [[layer] for layer in self._layers if layer.name not in lead]
        self._apply_masks()
        self._masks = types.MappingProxyType({layer.name: layer.mask for layer in self._layers})
        self._handle: Any = optimizer.register_step_post_hook(self._after_step)
        # a loaded optimizer state holds new tensors: the cached lists must be rebuilt
        self._load_handle: Any = optimizer.register_load_state_dict_post_hook(
            self._forget_state_lists
        )

    def _initial_layers(
        self,
        params: dict[str, nn.Parameter],
        views: dict[str, Unstructured],
        groups: list[list[str]],
        settings: SparseSettings,
        seed: int,
    ) -> list[_Layer]:
        """The layers with their initial masks: random units at each layer's density (a tied
        group draws once, for its first member)."""
        shapes = {name: tuple(p.shape) for name, p in params.items()}
        unit_shapes = {name: views[name].unit_shape(shape) for name, shape in shapes.items()}
        plan = self._method.plan(
            shapes,
            self._granularity,
            settings.sparsity,
            settings.distribution,
            settings.erk_power_scale,
            groups,
            views,
        )
        # Layers the granularity cannot structure (n:m with a row length not a multiple of m);
        # not worth a word for the dense baseline, which structures nothing.
        cannot = [n for n, u in unit_shapes.items() if u is None]
        self._kept_dense = [] if self._method.all_dense else cannot
        if self._kept_dense:
            warnings.warn(
                f"granularity {settings.granularity!r} cannot apply to {self._kept_dense}; "
                "kept dense",
                stacklevel=3,
            )
        layers, drawn = [], {}  # drawn: a tied group's units, drawn for its first member
        lead = {name: group[0] for group in groups for name in group}
        for index, (name, param) in enumerate(params.items()):
            view = views[name]
            units = None if plan[name] is None else unit_shapes[name]
            if units is None or plan[name] == math.prod(units):
                mask = torch.ones(param.shape, dtype=torch.bool)
            else:
                key = lead.get(name, name)
                if key not in drawn:
                    generator = seeded_generator(seed, 0, index)
                    drawn[key] = view.random_units(units, plan[name], generator)
                mask = view.expand(drawn[key], param.shape)
            mask = mask.to(param.device)
            layer = _Layer(name, index, param, mask, mask, mask.clone(), 0, units, view)
            layers.append(layer)
            self._refresh(layer)
        return layers

    # ------------------------------------------------------------------ properties
    @property
    def masks(self) -> Mapping[str, torch.Tensor]:
        """Read-only mapping from parameter name to its boolean mask (True = active)."""
        return self._masks

    @property
    def step(self) -> int:
        """Optimizer steps seen (steps skipped by a GradScaler are not counted)."""
        return self._step

    @property
    def mask_version(self) -> int:
        """Grows whenever the masks may have changed (an update, a loaded state)."""
        return self._version

    def dense_gradient_next(self) -> bool:
        """Whether the next optimizer step updates the masks by the dense gradient (RigL):
        that step needs the gradient of every weight, active or not."""
        cfg = self._config
        last = stop_step(cfg["total_steps"], cfg["stop_fraction"])
        return self._method.needs_dense_grad and is_update_step(
            self._step + 1, cfg["update_interval"], last
        )

    @property
    def density(self) -> float:
        """Global density over all maskable weights."""
        return sum(layer.active for layer in self._layers) / self._numel()

    @property
    def method(self) -> str:
        """The sparse training method."""
        return self._config["method"]

    @property
    def granularity(self) -> str:
        """The mask granularity: ``"unstructured"``, ``"channel"`` or ``"n:m"``."""
        return self._config["granularity"]

    @property
    def config(self) -> dict[str, Any]:
        """A copy of the configuration (method, sparsity, schedule, seed, ...)."""
        return dict(self._config)

    @property
    def settings(self) -> SparseSettings:
        """The settings it was built with."""
        return self._settings

    # ------------------------------------------------------------------ hooks
    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        # A fused optimizer under GradScaler is always called and skips internally on inf;
        # this one sync matches the one GradScaler itself makes for other optimizers.
        found_inf = getattr(optimizer, "found_inf", None)
        if found_inf is not None and bool(found_inf):
            return
        self._step += 1
        with torch.no_grad():
            if self._hot_params:
                torch._foreach_mul_(self._hot_params, self._hot_masks)
                self._zero_inactive_state()
            cfg = self._config
            last = stop_step(cfg["total_steps"], cfg["stop_fraction"])
            if self._method.updates_masks and is_update_step(
                self._step, cfg["update_interval"], last
            ):
                self._update(
                    prune_fraction(self._step, cfg["prune_ratio"], cfg["prune_schedule"], last),
                    min(1.0, self._step / last) if last > 0 else 1.0,
                )

    def _optimizer_state(self, layer: _Layer) -> list[torch.Tensor]:
        """The optimizer-state tensors of a layer's weight, which the engine zeroes per entry.

        Scalars (Adam's ``step``) are left alone; any other shape than the weight's (a factored
        second moment, a flattened buffer) cannot be zeroed entry by entry, so it is an error
        rather than state that silently leaks across mask changes.
        """
        found = []
        for key, state in self._optimizer.state.get(layer.param, {}).items():
            if not torch.is_tensor(state) or state.dim() == 0:
                continue
            if state.shape != layer.param.shape:
                raise ValueError(
                    f"{type(self._optimizer).__name__} keeps state {key!r} of shape "
                    f"{tuple(state.shape)} for {layer.name!r} of shape {tuple(layer.param.shape)}; "
                    "sparse training zeroes optimizer state at inactive weights and can only do "
                    "so for state shaped like the parameter (use e.g. SGD, Adam or AdamW)"
                )
            found.append(state)
        return found

    def _zero_inactive_state(self) -> None:
        """Zero the optimizer state at inactive entries (gradients are not masked, so the
        step wrote there), so that it is exactly as sparse as the weights.

        The (state, mask) lists are built once the optimizer has made its state and kept until
        the masks or the optimizer's state are replaced, so a step costs one multiply.
        """
        lists = self._state_lists
        if lists is None:
            lists, with_state = ([], []), 0
            for layer in self._hot_layers:
                found = self._optimizer_state(layer)
                with_state += bool(found)
                for state in found:
                    same = state.dtype == layer.fmask.dtype and state.device == layer.fmask.device
                    lists[0].append(state)
                    lists[1].append(
                        layer.fmask if same else layer.mask.to(state.device, state.dtype)
                    )
            if with_state == len(self._hot_layers):  # else some state is still to be made
                self._state_lists = lists
        if lists[0]:
            torch._foreach_mul_(*lists)

    def _forget_state_lists(self, *args: Any) -> None:
        self._state_lists: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None

    def _update(self, fraction: float, progress: float = 1.0) -> None:
        """Drop and regrow ``fraction`` of every layer's active units (the reference RigL rule).

        A just-dropped unit may be regrown; it keeps its value and optimizer state. Only the
        net changes are zeroed: dropped weights vanish, new connections start at zero with
        zero optimizer state. A tied group is one layer here: its members' scores per channel
        are joined by their L2 norm (the norm of the channel's weights over all members).
        """
        start = time.perf_counter()
        method = self._method
        emas = self._ema_tensors()
        dropped = {layer.name: 0 for layer in self._layers}
        grown = dict(dropped)
        for members in self._units:
            lead = members[0]
            if lead.units is None:
                continue
            units = math.prod(lead.units)
            current = lead.view.units(lead.mask)
            active = int(current.sum())
            k = math.floor(fraction * active)  # as in the reference: int(p * active)
            # A dense layer can only regrow what it drops; without a gradient RigL cannot rank.
            no_grad = any(m.param.grad is None for m in members)
            idle = k == 0 and not lead.view.scheduled  # a schedule may still remove rows
            if idle or active == units or (method.needs_dense_grad and no_grad):
                continue
            scores = [
                LayerScores(
                    m.param, m.param.grad, m.view, self._config["seed"], self._step, m.index
                )
                for m in members
            ]
            chosen = lead.view.select(
                current,
                _joined([method.drop_score(s) for s in scores]),
                _joined([method.grow_score(s) for s in scores]),
                k,
                progress,
            )
            for layer in members:
                new = layer.view.expand(chosen, layer.param.shape)
                dropped[layer.name] = grown[layer.name] = self._set_mask(layer, new, emas)
        self._forget_state_lists()  # masks in another dtype were copied
        self._version += 1
        if any(layer.param.is_cuda for layer in self._layers):
            torch.cuda.synchronize()
        self._last = {
            "step": self._step,
            "prune_fraction": fraction,
            "time_s": time.perf_counter() - start,
            "dropped": dropped,
            "grown": grown,
        }

    def _set_mask(self, layer: _Layer, new: torch.Tensor, emas: Mapping[str, torch.Tensor]) -> int:
        """Give ``layer`` the mask ``new``; zero the weights, optimizer and EMA entries that
        changed. Returns the number of weights that left the active set (one sync)."""
        lost, gained = layer.mask & ~new, new & ~layer.mask
        changed = lost | gained
        layer.mask.copy_(new)
        layer.fmask.copy_(new)
        layer.ever |= new
        layer.param.masked_fill_(changed, 0)
        for state in self._optimizer_state(layer):
            state.masked_fill_(changed.to(state.device), 0)
        if layer.name in emas:  # the live value at every changed entry is zero
            emas[layer.name].masked_fill_(changed.to(emas[layer.name].device), 0)
        # every granularity keeps a layer's density: as many grown as dropped
        return int(lost.sum())

    # ------------------------------------------------------------------ masking helpers
    def _ema_tensors(self) -> dict[str, torch.Tensor]:
        """The EMA's maskable tensors by name, empty without an EMA."""
        params = {layer.name: layer.param for layer in self._layers}
        return _resolve_ema(self._ema, self._names, params)

    def _numel(self) -> int:
        return sum(layer.mask.numel() for layer in self._layers)

    def _refresh(self, layer: _Layer) -> None:
        """Recount a layer's active entries and rebuild its multiply mask if it is sparse."""
        layer.active = int(layer.mask.sum())
        if layer.active < layer.mask.numel():
            layer.fmask = torch.empty_like(layer.param).copy_(layer.mask)
        else:
            layer.fmask = layer.mask  # dense layers are never multiplied

    def _apply_masks(self) -> None:
        """Zero masked entries of the model (and EMA) and cache the per-step multiply lists."""
        sparse = [layer for layer in self._layers if layer.active < layer.mask.numel()]
        self._version += 1
        self._hot_layers = sparse
        self._forget_state_lists()
        self._hot_params = [layer.param for layer in sparse]
        self._hot_masks = [layer.fmask for layer in sparse]
        emas = self._ema_tensors()
        with torch.no_grad():
            for layer in sparse:
                layer.param.mul_(layer.fmask)
                if layer.name in emas:
                    ema = emas[layer.name]
                    ema.mul_(layer.mask.to(ema.device, ema.dtype))

    # ------------------------------------------------------------------ public API
    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """Clip the gradients of ``model`` by their norm over the *active* entries.

        Masked-position gradients are not part of the sparse model, so they do not count
        towards the norm; the ``.grad`` storage itself is only scaled, never masked (RigL
        reads it dense). Under AMP call ``scaler.unscale_(optimizer)`` first.
        Returns the total norm (a tensor, no host sync).
        """
        fmasks = {id(p): m for p, m in zip(self._hot_params, self._hot_masks)}
        grads, parts = [], []
        for p in self._model.parameters():
            if p.grad is None:
                continue
            grads.append(p.grad)
            g = p.grad * fmasks[id(p)] if id(p) in fmasks else p.grad
            parts.append(torch.linalg.vector_norm(g, norm_type))
        if not grads:
            return torch.tensor(0.0)
        device = parts[0].device
        total = torch.linalg.vector_norm(torch.stack([n.to(device) for n in parts]), norm_type)
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        torch._foreach_mul_(grads, [coef.to(g.device) for g in grads])
        return total

    def stats(self) -> dict[str, Any]:
        """Density, churn of the last update, in-time over-parameterisation rate, timing.

        Keys: ``step``, ``density``, ``sparsity``, ``active``, ``maskable``,
        ``layer_density`` (name -> float), ``itop_rate`` (fraction of maskable weights ever
        active), ``last_update_step`` (None before the first update), ``prune_fraction``,
        ``dropped``, ``grown`` (weights that left / joined the active set at the last update; a
        regrown just-dropped weight is neither), ``churn`` (dropped / active), ``layer_churn``
        (name -> {"dropped", "grown"}), ``update_time_s`` (wall time of the last update),
        ``granularity`` and ``kept_dense`` (layers the granularity cannot structure).
        """
        active = sum(layer.active for layer in self._layers)
        total = self._numel()
        ever = sum(int(layer.ever.sum()) for layer in self._layers)
        last = self._last
        dropped, grown = sum(last["dropped"].values()), sum(last["grown"].values())
        return {
            "step": self._step,
            "density": active / total,
            "sparsity": 1.0 - active / total,
            "active": active,
            "maskable": total,
            "layer_density": {ly.name: ly.active / ly.mask.numel() for ly in self._layers},
            "itop_rate": ever / total,
            "last_update_step": None if last["step"] < 0 else last["step"],
            "prune_fraction": last["prune_fraction"],
            "dropped": dropped,
            "grown": grown,
            "churn": dropped / active if active else 0.0,
            "layer_churn": {
                name: {"dropped": last["dropped"][name], "grown": last["grown"][name]}
                for name in last["dropped"]
            },
            "update_time_s": last["time_s"],
            "granularity": self.granularity,
            "kept_dense": list(self._kept_dense),
        }

    def verify_consistent(self) -> bool:
        """Check that every rank holds the same masks and step (one all-reduce).

        Returns True (also when torch.distributed is not initialised); raises
        `RuntimeError` naming the differing layers otherwise.
        """
        if not (dist.is_available() and dist.is_initialized()):
            return True
        sums = []
        for layer in self._layers:
            idx = layer.mask.reshape(-1).nonzero().reshape(-1).to(torch.int64)
            sums.append(((idx * 2654435761 + 97) % 2147483647).sum().cpu())
        local = torch.stack([*sums, torch.tensor(self._step)])
        device = torch.device("cpu")
        if dist.get_backend() == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        # max of (c, -c) gives max and -min of every checksum in a single collective.
        both = torch.cat([local, -local]).to(device)
        dist.all_reduce(both, op=dist.ReduceOp.MAX)
        both = both.cpu()
        n = local.numel()
        differ = (both[:n] != -both[n:]).tolist()
        if any(differ):
            names = [layer.name for layer in self._layers] + ["<step>"]
            bad = [name for name, d in zip(names, differ) if d]
            raise RuntimeError(f"sparse masks differ across ranks for {bad}")
        return True

    def state_dict(self) -> dict[str, Any]:
        """Masks, step, schedule and seed (RNG) as plain tensors/numbers/strings.

        Random draws come from generators seeded by ``(seed, step, layer)``, so ``seed`` and
        ``step`` are the whole RNG state. Loads with ``torch.load(weights_only=True)``.
        """
        return {
            "format": _STATE_FORMAT,
            **self._config,
            "step": self._step,
            "tied": [list(group) for group in self._tied],
            "masks": {layer.name: layer.mask.cpu().clone() for layer in self._layers},
            "ever_active": {layer.name: layer.ever.cpu().clone() for layer in self._layers},
            "last_update": {
                k: (dict(v) if isinstance(v, dict) else v) for k, v in self._last.items()
            },
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore masks, step and schedule, and re-apply the masks to model (and EMA)."""
        if state.get("format") != _STATE_FORMAT:
            raise ValueError(f"state must come from SparseTraining.state_dict ({_STATE_FORMAT})")
        # saved before granularity (and chase's channel_sparsity) existed: their defaults
        state = {
            "granularity": "unstructured",
            "channel_sparsity": 0.5,
            "min_salient": 0.3,
            **state,
        }
        for key in ("method", "granularity"):
            if state[key] != self._config[key]:
                raise ValueError(
                    f"state was saved with {key}={state[key]!r}, this is {self._config[key]!r}"
                )
        if [list(g) for g in state.get("tied", [])] != self._tied:
            raise ValueError("state was saved with other tied channel groups than this engine's")
        config = {key: state[key] for key in self._config}
        _check_config(config)
        masks = state["masks"]
        if set(masks) != {layer.name for layer in self._layers}:
            raise ValueError("state masks name other parameters than this model's maskable ones")
        for layer in self._layers:
            if tuple(masks[layer.name].shape) != tuple(layer.mask.shape):
                raise ValueError(f"state mask for {layer.name!r} has another shape")
        self._config = config
        self._step = int(state["step"])
        last = state["last_update"]
        self._last = {k: (dict(v) if isinstance(v, dict) else v) for k, v in last.items()}
        for layer in self._layers:
            layer.mask.copy_(masks[layer.name])
            layer.ever.copy_(state["ever_active"][layer.name])
            self._refresh(layer)
        self._apply_masks()

    def remove(self) -> None:
        """Detach from the optimizer; masks stop being enforced. Safe to call twice."""
        if self._handle is not None:
            self._handle.remove()
            self._load_handle.remove()
            self._handle = None

    def __enter__(self) -> "SparseTraining":
        """Use as a context manager that detaches on exit."""
        return self

    def __exit__(self, *exc: object) -> None:
        """Detach the hooks."""
        self.remove()


def _joined(scores: list[torch.Tensor]) -> torch.Tensor:
    """One score per unit of a tied group: the L2 norm over its members' scores."""
    if len(scores) == 1:
        return scores[0]
    return torch.linalg.vector_norm(torch.stack(scores), dim=0)


def _check_tied(
    tied: Iterable[Iterable[str]],
    params: Mapping[str, nn.Parameter],
    granularity: str,
    views: Mapping[str, Unstructured],
) -> list[list[str]]:
    """``tied`` as lists of names in parameter order, validated; groups of one are dropped."""
    order = {name: i for i, name in enumerate(params)}
    groups = [sorted(set(group), key=lambda n: order.get(n, -1)) for group in tied]
    groups = [group for group in groups if len(group) > 1]
    if groups and granularity not in ("channel", "unit"):
        raise ValueError(f"tied channels need granularity 'channel', got {granularity!r}")
    seen: set[str] = set()
    for group in groups:
        unknown = [name for name in group if name not in params]
        if unknown:
            raise ValueError(f"tied names {unknown[:3]} are not maskable parameters of model")
        if seen & set(group):
            raise ValueError(f"tied groups overlap at {sorted(seen & set(group))[:3]}")
        seen |= set(group)
        rows = {views[name].unit_shape(params[name].shape)[0] for name in group}
        if len(rows) > 1:
            raise ValueError(f"tied parameters {group[:3]}... have different row counts {rows}")
    return groups


def _no_update(names: list[str]) -> dict[str, Any]:
    """The ``last update`` record before any update happened."""
    zeros = dict.fromkeys(names, 0)
    return {
        "step": -1,
        "prune_fraction": 0.0,
        "time_s": 0.0,
        "dropped": zeros,
        "grown": dict(zeros),
    }
