"""Which parameters of a model are sparse (maskable)."""

from collections.abc import Iterable
from fnmatch import fnmatchcase

from torch import nn
from torch.nn.parallel import DataParallel, DistributedDataParallel

CONV_LAYERS = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)
# Modules whose `weight` is a dense matrix/kernel that sparse training prunes.
_WEIGHT_LAYERS = (nn.Linear, *CONV_LAYERS)
# MultiheadAttention input projections (out_proj is an nn.Linear and is caught above).
_MHA_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")


def unwrap(model: nn.Module) -> nn.Module:
    """Return the inner module of DistributedDataParallel / DataParallel / torch.compile.

    Parameter names are those of the inner module (no ``module.`` or ``_orig_mod.``
    prefix), so masks and state dicts are the same whether a wrapper or the plain module
    is passed.
    """
    while True:
        if isinstance(model, (DistributedDataParallel, DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile
            model = model._orig_mod
        else:
            return model


def default_maskable(model: nn.Module) -> list[str]:
    """Names of the parameters that are sparse by default.

    Weights of Linear, Conv1d/2d/3d, ConvTranspose1d/2d/3d, the weight matrices of
    RNN/GRU/LSTM (``weight_ih_l*``, ``weight_hh_l*``, ``weight_hr_l*``, incl. ``_reverse``)
    and MultiheadAttention projections. Biases, norms and embeddings stay dense.
    """
    canonical = {id(p): n for n, p in model.named_parameters()}
    found: list[str] = []
    for module in model.modules():
        candidates: list[nn.Parameter | None] = []
        if isinstance(module, _WEIGHT_LAYERS):
            candidates.append(module.weight)
        elif isinstance(module, nn.RNNBase):
            candidates += [p for n, p in module.named_parameters(recurse=False) if "weight" in n]
        elif isinstance(module, nn.MultiheadAttention):
            candidates += [getattr(module, n, None) for n in _MHA_WEIGHTS]
        for p in candidates:
            # Shared parameters are reported once, under their canonical name.
            if isinstance(p, nn.Parameter) and id(p) in canonical:
                name = canonical[id(p)]
                if name not in found:
                    found.append(name)
    return found


def _patterns(value: str | Iterable[str] | None, argument: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):  # a lone pattern, not an iterable of characters
        return (value,)
    patterns = tuple(value)
    if not all(isinstance(p, str) for p in patterns):
        raise ValueError(f"{argument} must be glob patterns (strings), got {value!r}")
    return patterns


def select_parameters(
    model: nn.Module,
    include: str | Iterable[str] | None = None,
    exclude: str | Iterable[str] | None = (),
) -> dict[str, nn.Parameter]:
    """Maskable parameters of ``model`` by name, in ``named_parameters()`` order.

    The default set (see `default_maskable`) is extended by the glob patterns in
    ``include`` and reduced by those in ``exclude`` (exclude wins). Patterns are matched
    with `fnmatch.fnmatchcase` against full parameter names, e.g. ``"conv_in.*"``.
    A pattern that matches no parameter raises `ValueError` (it is most likely a typo).
    """
    model = unwrap(model)
    named = dict(model.named_parameters())
    chosen = set(default_maskable(model))
    for argument, value in (("include", include), ("exclude", exclude)):
        for pattern in _patterns(value, argument):
            matched = {n for n in named if fnmatchcase(n, pattern)}
            if not matched:
                raise ValueError(
                    f"{argument} pattern {pattern!r} matches no parameter name; "
                    f"names look like {list(named)[:4]}"
                )
            chosen = chosen | matched if argument == "include" else chosen - matched
    return {n: p for n, p in named.items() if n in chosen}
