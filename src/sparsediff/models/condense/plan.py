"""Which modules of a model can be condensed, and how: the plan (kept rows per module), and
its application to a plain model."""

from __future__ import annotations

import copy
import functools
from typing import Any

import torch
from torch import nn

from .modules import (
    CondensedAttention,
    CondensedFeedForward,
    CondensedResnet,
    NarrowHead,
    NarrowResample,
)
from .recurrent import CondensedGRU, gru_issue, live_units
from .rows import (
    RowSparse,
    bias_of,
    complement,
    head_rows,
    index_of,
    layer_slice,
    live_rows,
    prefixed,
    sliced,
)

_ROW_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
# Modules that read their layers' weights directly instead of calling them: left alone.
_READS_WEIGHTS = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


# ---------------------------------------------------------------------- which blocks
def _resnet_issue(block: nn.Module) -> str | None:
    """Why a ResnetBlock2D cannot be condensed (None: it can)."""
    convs = [block.conv1, block.conv2] + ([block.conv_shortcut] if block.conv_shortcut else [])
    if block.upsample is not None or block.downsample is not None:
        return "up/downsampling resnet"
    if block.time_embedding_norm != "default" or block.time_emb_proj is None:
        return "time embedding other than 'default'"
    if not isinstance(block.norm2, nn.GroupNorm) or block.dropout.p != 0:
        return "norm2 is not a GroupNorm or dropout > 0"
    if not all(isinstance(c, nn.Conv2d) and c.groups == 1 for c in convs):
        return "grouped or non-2-D convolution"
    if block.conv2.padding_mode != "zeros" or isinstance(block.conv2.padding, str):
        return "conv2 padding is not explicit zeros"
    return None


def _attention_issue(attn: nn.Module) -> str | None:
    """Why an Attention cannot be condensed (None: it can)."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    if not isinstance(attn.processor, AttnProcessor2_0):
        return f"processor {type(attn.processor).__name__}"
    if attn.is_cross_attention or attn.spatial_norm is not None:
        return "cross-attention or spatial norm"
    if attn.norm_q is not None or attn.norm_k is not None or attn.added_kv_proj_dim:
        return "q/k norms or added key/value projections"
    if attn.to_out[1].p != 0 or attn.to_v.out_features != attn.to_k.out_features:
        return "output dropout or unequal value width"
    return None


def _kinds() -> tuple[type, type, type]:
    from diffusers.models.attention import FeedForward
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import ResnetBlock2D

    return ResnetBlock2D, Attention, FeedForward


def _feedforward_issue(ff: nn.Module) -> str | None:
    """Why a FeedForward cannot be condensed (None: it can): proj → act → dropout 0 → out."""
    net = list(ff.net)
    if len(net) != 3 or not isinstance(getattr(net[0], "proj", None), nn.Linear):
        return "not proj, activation, dropout, output"
    if not isinstance(net[1], nn.Dropout) or net[1].p != 0 or not isinstance(net[2], nn.Linear):
        return "dropout > 0 or no Linear output"
    if type(net[0]).__name__ not in ("GELU", "ApproximateGELU") or net[0].proj.bias is None:
        return f"activation {type(net[0]).__name__} (gated or without bias)"
    return None


def alive(weight: torch.Tensor) -> torch.Tensor:
    """Per row of ``weight``: whether any of its weights is non-zero."""
    return weight.detach().reshape(weight.shape[0], -1).ne(0).any(dim=1)


def stream_live(model: nn.Module) -> dict[str, torch.Tensor]:
    """For a diffusers ``UNet2DModel``: per layer that writes the residual stream, the live
    channels of its segment (a channel is dead when its row is dead in every writer of the
    segment, ``models.unet.stream_groups``). Empty when the model is not a UNet the walk
    knows."""
    from sparsediff.models.unet import stream_groups

    try:
        groups = stream_groups(model)
    except (AttributeError, ValueError):
        return {}
    live = {}  # weight name of a writer -> live channels of its segment
    for group in groups:
        group_alive = functools.reduce(
            torch.logical_or, [alive(model.get_parameter(n)) for n in group]
        )
        live.update(dict.fromkeys(group, group_alive))
    return live


def _stream(
    model: nn.Module, live: dict[str, torch.Tensor] | None = None
) -> dict[str, tuple[Any, Any, Any]]:
    """For a diffusers ``UNet2DModel`` whose residual stream has dead channels: per module
    that reads or writes it, ``(inputs, in_const, outputs)``.

    A stream channel is dead when it is dead in every writer of its segment (``live``, from
    :func:`stream_live`; None: read from ``model``'s weights now); training with the
    writers tied makes that happen. A
    dead stream channel holds a constant that depends on biases only (each writer outputs its
    bias there, an identity shortcut or a residual connection adds what was there, an
    up-block concatenates saved streams), so it is followed through the network and every
    reader gets its input's live channels and the dead ones' values. ``inputs``/``outputs``
    are boolean masks of live channels (None where the module has none of that side);
    ``in_const`` the full-width values (0 at live channels). Empty when nothing is dead or
    the model is not a UNet the walk knows.
    """
    from sparsediff.models.unet import stream_steps

    live = stream_live(model) if live is None else live
    if all(bool(mask.all()) for mask in live.values()):
        return {}
    try:
        steps = stream_steps(model)
    except (AttributeError, ValueError):
        return {}
    found, skips = {}, []
    cur = const = None
    for kind, name in steps:
        module = model.get_submodule(name) if name else None
        if kind == "skip":
            skips.append((cur, const))
            continue
        if kind == "concat":
            saved, saved_const = skips.pop()
            cur, const = torch.cat([cur, saved]), torch.cat([const, saved_const])
            continue
        inputs, in_const = cur, const
        if (
            kind == "resnet"
            and _resnet_issue(module)
            or kind == "attention"
            and (_attention_issue(module) or not module.residual_connection)
        ):
            return {}  # a block the rewrites do not cover: the stream stays whole
        if kind == "conv_in":
            cur, const = live["conv_in.weight"], bias_of(module)
        elif kind == "resnet":
            if module.conv_shortcut is None:  # same segment: add to what is there
                const = (const + bias_of(module.conv2)) / module.output_scale_factor
            else:
                cur = live[f"{name}.conv2.weight"]
                const = bias_of(module.conv_shortcut) + bias_of(module.conv2)
                const = const / module.output_scale_factor
        elif kind == "attention":
            const = (const + bias_of(module.to_out[0])) / module.rescale_output_factor
        elif kind == "resample":
            cur, const = live[f"{name}.conv.weight"], bias_of(module.conv)
        const = const.masked_fill(cur, 0) if cur is not None else None
        found[name] = (inputs, in_const, None if kind == "head" else cur)
    return found


def _rows_of(mask: Any) -> list[int] | None:
    return None if mask is None else mask.nonzero().flatten().tolist()


def plan_condense(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Which modules to rewrite and which rows they keep, read from the weights' zero rows.

    Entries (JSON-ready): ``{"kind": "resnet", "conv1", "conv2", "shortcut", "inputs",
    "outputs"}``, ``{"kind": "attention", "qk", "v", "out", "inputs"}``, ``{"kind":
    "feedforward", "rows"}`` (a transformer's MLP: its live hidden neurons), ``{"kind": "gru",
    "keep"}`` (a GRU's kept units per layer and direction), ``{"kind": "rows", "rows"}``, and
    where a UNet's residual stream has dead channels (:func:`_stream`) ``{"kind": "slice",
    "rows"}`` (conv_in), ``{"kind": "resample", "inputs", "outputs"}`` and ``{"kind": "head",
    "inputs"}`` (conv_norm_out, conv_act, conv_out), with lists of kept row or channel indices
    (``inputs``/``outputs`` None: all). Modules without a dead row, on a stream without dead
    channels, are left out.
    """
    resnet_cls, attention_cls, feedforward_cls = _kinds()
    stream = _stream(model)
    plan: dict[str, dict[str, Any]] = {}
    inside: list[str] = []  # blocks rewritten as a whole own their layers
    for name, module in model.named_modules():
        inputs, _, outputs = stream.get(name, (None, None, None))
        narrow = name in stream and not all(m is None or bool(m.all()) for m in (inputs, outputs))
        if isinstance(module, resnet_cls) and _resnet_issue(module) is None:
            sc = module.conv_shortcut
            entry = {
                "kind": "resnet",
                "conv1": live_rows(module.conv1.weight),
                "conv2": live_rows(module.conv2.weight),
                "shortcut": None if sc is None else live_rows(sc.weight),
                "inputs": _rows_of(inputs),
                "outputs": _rows_of(outputs),
            }
            sizes = [module.conv1.out_channels, module.conv2.out_channels]
            sizes += [] if sc is None else [sc.out_channels]
        elif isinstance(module, attention_cls) and _attention_issue(module) is None:
            entry = {
                "kind": "attention",
                "qk": head_rows(module.to_k.weight, module.heads),
                "v": head_rows(module.to_v.weight, module.heads),
                "out": live_rows(module.to_out[0].weight),
                "inputs": _rows_of(inputs),
            }
            sizes = [module.to_k.out_features] * 2 + [module.to_out[0].out_features]
        elif isinstance(module, nn.GRU) and gru_issue(module) is None:
            entry = {"kind": "gru", "keep": live_units(module)}
            sizes = [module.hidden_size] * len(entry["keep"])
        elif isinstance(module, feedforward_cls) and _feedforward_issue(module) is None:
            entry = {"kind": "feedforward", "rows": live_rows(module.net[0].proj.weight)}
            sizes = [module.net[0].proj.out_features]
        elif narrow and name == "conv_in":
            entry, sizes = {"kind": "slice", "rows": _rows_of(outputs)}, []
        elif narrow and name == "conv_norm_out":
            entry, sizes = {"kind": "head", "inputs": _rows_of(inputs)}, []
            inside.append("conv_out.")
        elif narrow and name in stream:
            entry = {"kind": "resample", "inputs": _rows_of(inputs), "outputs": _rows_of(outputs)}
            sizes = []
        else:
            if isinstance(module, _READS_WEIGHTS):
                inside.append(name + ".")
            continue
        if not narrow:  # reads and writes all of its stream's channels
            entry.update(dict.fromkeys(("inputs", "outputs") & entry.keys()))
        keys = ("conv1", "conv2", "shortcut", "qk", "v", "out", "rows")
        kept = [entry[k] for k in keys if entry.get(k)]
        kept += [layer[0] for layer in entry.get("keep", [])]  # a GRU's layers
        if narrow or any(len(rows) < size for rows, size in zip(kept, sizes)):
            plan[name] = entry
            inside.append(name + ".")
    for name, module in model.named_modules():
        if not name or name in plan or name.startswith(tuple(inside)) or name + "." in inside:
            continue
        if isinstance(module, _ROW_LAYERS) and getattr(module, "groups", 1) == 1:
            rows = live_rows(module.weight)
            if len(rows) < module.weight.shape[0]:
                plan[name] = {"kind": "rows", "rows": rows}
    return plan


def _constants(
    model: nn.Module, live: dict[str, torch.Tensor] | None = None
) -> dict[str, torch.Tensor]:
    """Per module that reads a narrowed stream: the full-width values of its dead inputs."""
    return {name: spec[1] for name, spec in _stream(model, live).items() if spec[1] is not None}


def _input_const(constants: dict[str, torch.Tensor] | None, name: str, inputs: Any) -> Any:
    """The values of module ``name``'s dead stream inputs (None: zeros, or none dead)."""
    if constants is None or inputs is None:
        return None
    const = constants[name]
    return const[index_of(complement(inputs, const.numel())).to(const.device)]


def apply_plan(
    model: nn.Module,
    plan: dict[str, dict[str, Any]],
    constants: dict[str, torch.Tensor] | None = None,
) -> nn.Module:
    """Rewrite ``model`` in place by ``plan`` (from :func:`plan_condense`); returns it.

    The condensed modules are built from ``model``'s current weights; ``constants`` are the
    values of the dead stream channels each module reads (full width, from :func:`_stream`;
    None: zeros). On a plain, freshly built model this gives the right shapes for
    :func:`load_condensed` to load into (the values are saved with the weights).
    """
    for name, entry in plan.items():
        module = model.get_submodule(name)
        kind, inputs = entry["kind"], entry.get("inputs")
        const = _input_const(constants, name, inputs)
        if kind == "resnet":
            new = CondensedResnet(
                module,
                entry["conv1"],
                entry["conv2"],
                entry["shortcut"],
                inputs,
                entry.get("outputs"),
                const,
            )
        elif kind == "attention":
            new = CondensedAttention(module, entry["qk"], entry["v"], entry["out"], inputs, const)
        elif kind == "rows":
            new = RowSparse(module, entry["rows"])
        elif kind == "feedforward":
            new = CondensedFeedForward(module, entry["rows"])
        elif kind == "gru":
            new = CondensedGRU(module, entry["keep"])
        elif kind == "slice":
            new = sliced(module, entry["rows"])
        elif kind == "resample":
            new = NarrowResample(module, inputs, entry["outputs"], const)
        elif kind == "head":
            new = NarrowHead(module, model.conv_act, model.conv_out, inputs, const)
            model.conv_act, model.conv_out = nn.Identity(), nn.Identity()
        else:
            raise ValueError(f"unknown condensed module kind {kind!r} for {name!r}")
        model.set_submodule(name, new.to(next(module.parameters()).device))
    return model


@torch.no_grad()
def condense(model: nn.Module) -> tuple[nn.Module, dict[str, dict[str, Any]]]:
    """A condensed copy of ``model`` (same outputs, dead channels removed) and its plan.

    ``model`` is left unchanged. The copy is for inference: put it in ``eval()`` mode.
    """
    plan = plan_condense(model)
    return apply_plan(copy.deepcopy(model), plan, _constants(model)), plan


def condensed_tensors(
    model: nn.Module,
    plan: dict[str, dict[str, Any]],
    condensed: nn.Module,
    live: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Every parameter and stream constant of ``condensed`` (``model`` condensed by ``plan``)
    as a function of ``model``'s current parameters, by name: the rewritten modules'
    ``tensors`` (:class:`~.rows.Derived`), every other parameter ``model``'s own.

    With gradients enabled the tensors carry them back to ``model``'s parameters, so
    ``torch.func.functional_call(condensed, tensors, ...)`` computes ``model``'s function
    through the narrow network *and* trains ``model`` (``sparsediff.training.condensed``).
    The plan must still hold: no row that it drops may have come alive. ``live``: the stream's
    live channels the plan was made with (:func:`stream_live`; None: read from the weights).
    """
    constants = _constants(model, live)
    out: dict[str, torch.Tensor] = {}
    for name, entry in plan.items():
        new, src, kind = condensed.get_submodule(name), model.get_submodule(name), entry["kind"]
        const = _input_const(constants, name, entry.get("inputs"))
        if kind in ("resnet", "attention", "resample"):
            tensors = new.tensors(src, const)
        elif kind == "head":
            tensors = new.tensors(src, model.conv_out, const)
        elif kind == "slice":
            tensors = layer_slice(src, index_of(entry["rows"]).to(src.weight.device))
        else:
            tensors = new.tensors(src)
        out.update(prefixed(f"{name}.", tensors))
    for name, _ in condensed.named_parameters():
        if name not in out:
            out[name] = model.get_parameter(name)
    return out
