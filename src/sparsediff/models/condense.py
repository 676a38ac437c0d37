"""Condense a channel-sparse denoiser into a smaller dense network with the same outputs.

A *dead* row (output channel) of a Linear/Conv weight is one whose weights are all exactly zero.
It is read from the weights alone, so no mask is needed and the rewrite is exact for any weights.
A dead row does not output zero: it outputs its **bias**, a constant. Everything below keeps
that constant's effect, so the condensed network computes the same function (up to float
rounding; ``docs/speedups.md`` has the derivations):

* :class:`RowSparse` — any Linear/Conv computes only its live rows; dead rows get their bias.
  This is all that can be done for channels of the residual stream (conv_in, every block's
  output conv, shortcut, down/upsamplers, attention output): a stream channel has many writers
  with independent masks and feeds GroupNorms, so it is never removed.
* :class:`CondensedResnet` — a diffusers ``ResnetBlock2D``'s internal channels (conv1 → +time
  → norm2 → SiLU → conv2) are private to the block. A dead conv1 channel is removed from conv1,
  the time projection, norm2 and conv2's inputs, but it still holds a per-sample constant
  (conv1 bias + time projection), and GroupNorm mixes it into its group's mean and variance.
  So norm2 is computed exactly from the live channels' statistics plus the dead constants, and
  the constant, after norm and SiLU, reaches conv2 through its zero padding: a spatially
  constant input channel contributes ``u · (sum of the kernel taps that fall inside the
  image)``, which depends on the position only near the border (:func:`_constant_through_conv`).
* :class:`CondensedAttention` — a dead key channel is a constant over keys, so it shifts every
  query's scores by a constant and softmax ignores it: the channel leaves q and k. A dead value
  channel is a constant whose attention average is itself: it is folded into the output
  projection's bias. Heads keep equal widths (the largest per-head count; extra kept channels
  are exact too) and the softmax scale stays the original ``1/sqrt(head_dim)``.

``torch-pruning``'s dependency graph is not used: its channel removal deletes a channel, which
is only exact for channels that are exactly zero and outside every GroupNorm group, which does
not hold for dead channels with a bias. The couplings that matter here are local to a block, and
the stream channels that couple blocks are never removed.

The save format is ``condensed.json`` (the plan: kept rows per rewritten module) and
``condensed.safetensors`` (the condensed state dict); :func:`load_condensed` rebuilds the
condensed network from the plain model by re-applying the plan, then loads the weights.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from sparsediff.io import read_json, write_json
from sparsediff.weights import load_weights, save_weights

FORMAT = "sparsediff.condensed/1"
PLAN_FILE = "condensed.json"
WEIGHTS_FILE = "condensed.safetensors"

_ROW_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
# Modules that read their layers' weights directly instead of calling them: left alone.
_READS_WEIGHTS = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


# ---------------------------------------------------------------------- what is dead
def live_rows(weight: torch.Tensor) -> list[int]:
    """Rows of ``weight`` with a non-zero entry (at least one row: keeping a dead row is exact)."""
    alive = weight.detach().reshape(weight.shape[0], -1).ne(0).any(dim=1)
    rows = alive.nonzero().flatten().tolist()
    return rows or [0]


def _head_rows(weight: torch.Tensor, heads: int) -> list[int]:
    """Live rows of each head, every head padded with dead rows to the widest head's count."""
    width = weight.shape[0] // heads
    alive = weight.detach().reshape(weight.shape[0], -1).ne(0).any(dim=1).view(heads, width)
    keep = max(1, int(alive.sum(dim=1).max()))
    rows = []
    for h in range(heads):
        # live rows first, then the lowest dead ones; sorted so heads keep their channel order
        order = sorted(range(width), key=lambda j: (not bool(alive[h, j]), j))[:keep]
        rows += [h * width + j for j in sorted(order)]
    return rows


def _index(rows: Sequence[int]) -> torch.Tensor:
    return torch.as_tensor(list(rows), dtype=torch.long)


def _complement(rows: Sequence[int], size: int) -> list[int]:
    kept = set(rows)
    return [i for i in range(size) if i not in kept]


def _bias(layer: nn.Module) -> torch.Tensor:
    if layer.bias is not None:
        return layer.bias.detach()
    return layer.weight.new_zeros(layer.weight.shape[0])


def _sliced(
    layer: nn.Module, rows: Sequence[int], cols: Sequence[int] | None = None, bias: bool = True
) -> nn.Module:
    """A copy of a Linear/Conv with only ``rows`` (and input ``cols``) of its weight."""
    new = copy.deepcopy(layer)
    with torch.no_grad():
        weight = layer.weight.detach()[_index(rows)]
        if cols is not None:
            weight = weight[:, _index(cols)]
        new.weight = nn.Parameter(weight.clone())
        new.bias = nn.Parameter(_bias(layer)[_index(rows)].clone()) if bias else None
    if isinstance(new, nn.Linear):
        new.out_features, new.in_features = weight.shape[0], weight.shape[1]
    else:
        new.out_channels, new.in_channels = weight.shape[0], weight.shape[1]
    return new


def _add_rows(out: torch.Tensor, dim: int, rows: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``out[rows] += y`` along ``dim``, in place (a plain add when every row is live)."""
    if rows.numel() == out.shape[dim]:
        return out.add_(y)
    return out.index_add_(dim, rows, y)


def _rows_plus(
    y: torch.Tensor, dim: int, rows: torch.Tensor, constant: torch.Tensor
) -> torch.Tensor:
    """A full-width tensor: ``constant`` (per row) everywhere, plus ``y`` at ``rows``."""
    view = [1] * y.dim()
    view[dim] = -1
    constant = constant.to(y.dtype).view(view)
    if rows.numel() == constant.numel():
        return y + constant
    shape = list(y.shape)
    shape[dim] = constant.numel()
    return constant.expand(shape).clone().index_add_(dim, rows, y)


# ---------------------------------------------------------------------- rewrites
class RowSparse(nn.Module):
    """A Linear or Conv that computes only its live output rows; dead rows output their bias."""

    def __init__(self, layer: nn.Module, rows: Sequence[int]) -> None:
        super().__init__()
        self.layer = _sliced(layer, rows, bias=False)
        self.bias = nn.Parameter(_bias(layer).clone())  # all rows: the dead ones' outputs
        self.register_buffer("rows", _index(rows), persistent=False)
        self.dim = -1 if isinstance(layer, nn.Linear) else 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The layer's output at full width."""
        return _rows_plus(self.layer(x), self.dim, self.rows, self.bias)


def _taps(
    size: int, out: int, kernel: int, stride: int, padding: int, dilation: int, device: Any
) -> torch.Tensor:
    """``(out, kernel)``: True where kernel tap ``i`` of output position ``y`` is in the input."""
    pos = torch.arange(out, device=device)[:, None] * stride - padding
    pos = pos + torch.arange(kernel, device=device)[None, :] * dilation
    return (pos >= 0) & (pos < size)


@functools.lru_cache(maxsize=64)
def _inside(
    size: tuple[int, ...], out: tuple[int, ...], conv: tuple, device: Any, dtype: torch.dtype
) -> torch.Tensor:
    """``(kh*kw, H_out*W_out)`` 0/1: which taps of each output pixel fall inside the image;
    depends on sizes only, so every sampler step of every block reuses it."""
    (kh, kw), stride, padding, dilation = conv
    rows = _taps(size[0], out[0], kh, stride[0], padding[0], dilation[0], device).to(dtype)
    cols = _taps(size[1], out[1], kw, stride[1], padding[1], dilation[1], device).to(dtype)
    return (rows.T[:, None, :, None] * cols.T[None, :, None, :]).reshape(kh * kw, -1)


def _constant_through_conv(
    u: torch.Tensor, weight: torch.Tensor, conv: nn.Conv2d, size: Sequence[int], out: Sequence[int]
) -> torch.Tensor:
    """``conv2d`` (no bias) of input channels that are constant per sample, exactly.

    ``u`` ``(B, D)`` are the constants, ``weight`` ``(D, O * kh * kw)`` (conv's kernels
    over those inputs, transposed and flattened). With zero padding an
    output position sees only the taps that fall inside the image, so the result is
    ``sum_ij (sum_d u_d W_odij) R_yi Q_xj`` with 0/1 tap masks ``R`` (rows) and ``Q`` (columns):
    two small matmuls instead of a convolution over ``D`` constant planes.
    """
    kh, kw = conv.kernel_size
    o = weight.shape[1] // (kh * kw)
    per_tap = u @ weight  # (B, O*kh*kw)
    geometry = (conv.kernel_size, conv.stride, conv.padding, conv.dilation)
    inside = _inside(tuple(size), tuple(out), geometry, u.device, u.dtype)
    return (per_tap.view(-1, kh * kw) @ inside).view(u.shape[0], o, *out)


class CondensedResnet(nn.Module):
    """A diffusers ``ResnetBlock2D`` without its dead internal channels, same outputs.

    ``live1``: the kept conv1 channels (with their time shift, norm2 and conv2's inputs);
    ``live2`` / ``live_sc``: the live rows of conv2 and of the shortcut conv (the block's output
    lies in the residual stream, so their dead rows are constants added at full width).
    Internally the conv1 channels are ordered live first, then dead.
    """

    def __init__(
        self,
        block: nn.Module,
        live1: Sequence[int],
        live2: Sequence[int],
        live_sc: Sequence[int] | None,
    ) -> None:
        super().__init__()
        norm, width = block.norm2, block.conv1.out_channels
        dead1 = _complement(live1, width)
        order = list(live1) + dead1  # kept-first position -> channel
        self.norm1, self.act = block.norm1, block.nonlinearity
        self.skip_time_act = block.skip_time_act
        self.output_scale_factor = block.output_scale_factor
        self.groups, self.eps = norm.num_groups, norm.eps
        self.conv1 = _sliced(block.conv1, live1)
        # One projection for the live channels' time shift and the dead channels' values: a
        # dead conv1 channel is its bias plus its time shift, constant over pixels.
        self.time = _sliced(block.time_emb_proj, order)
        with torch.no_grad():
            self.time.bias[len(live1) :] += _bias(block.conv1)[_index(dead1)]
        ones = block.conv1.weight.new_ones(width)
        gamma = norm.weight.detach() if norm.weight is not None else ones
        beta = norm.bias.detach() if norm.bias is not None else ones * 0
        self.gamma = nn.Parameter(gamma[_index(order)].clone())
        self.beta = nn.Parameter(beta[_index(order)].clone())
        self.conv2 = _sliced(block.conv2, live2, live1, bias=False)
        # conv2's kernels over the dead inputs as (dead, out * kh * kw), for one matmul
        fold = block.conv2.weight.detach()[_index(live2)][:, _index(dead1)]
        taps = block.conv2.kernel_size[0] * block.conv2.kernel_size[1]
        fold = fold.transpose(0, 1).reshape(len(dead1), len(live2) * taps)
        self.fold = nn.Parameter(fold.clone())
        # conv2's and the shortcut's biases, added at full width (a dead row outputs only these)
        constant = _bias(block.conv2).clone()
        self.shortcut = None
        if block.conv_shortcut is not None:
            self.shortcut = _sliced(block.conv_shortcut, live_sc, bias=False)
            constant += _bias(block.conv_shortcut)
        self.constant = nn.Parameter(constant)
        self.register_buffer("live2", _index(live2), persistent=False)
        self.register_buffer("live_sc", _index(live_sc or []), persistent=False)
        # channel -> kept-first position, and kept-first position -> norm group
        self.register_buffer("position", _index(order).argsort(), persistent=False)
        self.register_buffer("group", _index(order) // (width // self.groups), persistent=False)

    def _norm2(self, h: torch.Tensor, time: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact norm2 over live channels ``h`` (before their time shift) and dead constants.

        ``time`` holds the live channels' time shifts, then the dead channels' values
        (kept-first order). Returns the live channels normalised and the dead channels'
        normalised constants. Group statistics come from per-channel ones (all channels have
        the same pixel count): the mean of the channel means, and the mean of (channel variance
        + squared distance of the channel mean to the group mean); a dead channel has mean =
        its value and variance 0, and the time shift moves a live channel's mean only. In
        float32 at least, two-pass (``torch.var_mean`` is ~10x slower here on CPU).
        """
        batch, live = h.shape[0], h.shape[1]
        high = torch.promote_types(h.dtype, torch.float32)
        mean_h = h.mean(dim=(2, 3), keepdim=True, dtype=high)
        var = (h - mean_h).square().mean(dim=(2, 3))
        mean = torch.cat([mean_h[:, :, 0, 0], torch.zeros_like(time[:, live:])], 1) + time
        var = F.pad(var, (0, time.shape[1] - live))  # kept-first order
        grouped = (batch, self.groups, -1)
        mean_g, var_g = mean[:, self.position].view(grouped), var[:, self.position].view(grouped)
        group_mean = mean_g.mean(dim=2)
        group_var = (var_g + (mean_g - group_mean[:, :, None]).square()).mean(dim=2)
        scale = (group_var + self.eps).rsqrt()[:, self.group] * self.gamma
        # (h + time - group mean) * scale + beta, with the time shift folded into the shift
        shift = self.beta + (time - group_mean[:, self.group]) * scale
        shift, scale = shift.to(h.dtype), scale.to(h.dtype)
        normed = torch.addcmul(shift[:, :live, None, None], h, scale[:, :live, None, None])
        return normed, shift[:, live:]

    def forward(self, x: torch.Tensor, temb: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """``(shortcut(x) + conv2(SiLU(norm2(conv1(SiLU(norm1(x))) + time))))/scale``."""
        h = self.conv1(self.act(self.norm1(x)))
        time = self.time(temb if self.skip_time_act else self.act(temb))
        h, u = self._norm2(h, time)
        y = self.conv2(self.act(h))
        if u.shape[1]:
            y = y + _constant_through_conv(
                self.act(u), self.fold, self.conv2, h.shape[2:], y.shape[2:]
            )
        if self.shortcut is None:
            out = x + self.constant.to(y.dtype)[None, :, None, None]
        else:
            out = _rows_plus(self.shortcut(x), 1, self.live_sc, self.constant)
        out = _add_rows(out, 1, self.live2, y)
        return out if self.output_scale_factor == 1 else out / self.output_scale_factor


class CondensedAttention(nn.Module):
    """A diffusers self-``Attention`` (``AttnProcessor2_0``) without dead key/value channels.

    ``qk``: kept query/key channels (head-major, equal count per head), ``v``: kept value
    channels, ``out``: live rows of the output projection.
    """

    def __init__(
        self, attn: nn.Module, qk: Sequence[int], v: Sequence[int], out: Sequence[int]
    ) -> None:
        super().__init__()
        proj = attn.to_out[0]
        self.heads = attn.heads
        self.scale = (attn.to_k.out_features // attn.heads) ** -0.5  # SDPA's default, kept
        self.group_norm = attn.group_norm
        self.residual_connection = attn.residual_connection
        self.rescale_output_factor = attn.rescale_output_factor
        self.to_q, self.to_k = _sliced(attn.to_q, qk), _sliced(attn.to_k, qk)
        self.to_v = _sliced(attn.to_v, v)
        dead_v = _index(_complement(v, attn.to_v.out_features))
        # A dead value channel averages to its bias: its share of the output is a constant.
        folded = copy.deepcopy(proj)
        with torch.no_grad():
            folded.weight = nn.Parameter(proj.weight.detach()[:, _index(v)].clone())
            folded.in_features = len(v)
            folded.bias = nn.Parameter(
                _bias(proj) + proj.weight.detach()[:, dead_v] @ _bias(attn.to_v)[dead_v]
            )
        full = len(out) == proj.out_features
        self.to_out = folded if full else RowSparse(folded, out)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Self-attention with the residual connection, as ``AttnProcessor2_0``."""
        if args or any(
            kwargs.get(k) is not None for k in ("encoder_hidden_states", "attention_mask")
        ):
            raise ValueError("a condensed attention block is self-attention without a mask")
        residual, ndim = hidden_states, hidden_states.dim()
        if ndim == 4:
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
        batch = hidden_states.shape[0]
        if self.group_norm is not None:
            hidden_states = self.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, -1, self.heads, t.shape[-1] // self.heads).transpose(1, 2)

        q, k = split(self.to_q(hidden_states)), split(self.to_k(hidden_states))
        v = split(self.to_v(hidden_states))
        o = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        o = self.to_out(o.transpose(1, 2).reshape(batch, -1, self.heads * v.shape[-1]))
        if ndim == 4:
            o = o.transpose(-1, -2).reshape(batch, channels, height, width)
        if self.residual_connection:
            o = o + residual
        return o / self.rescale_output_factor


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


def _kinds() -> tuple[type, type]:
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import ResnetBlock2D

    return ResnetBlock2D, Attention


def plan_condense(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Which modules to rewrite and which rows they keep, read from the weights' zero rows.

    Entries (JSON-ready): ``{"kind": "resnet", "conv1", "conv2", "shortcut"}``,
    ``{"kind": "attention", "qk", "v", "out"}`` and ``{"kind": "rows", "rows"}``, with lists
    of kept row indices. Modules without a dead row are left out.
    """
    resnet_cls, attention_cls = _kinds()
    plan: dict[str, dict[str, Any]] = {}
    inside: list[str] = []  # blocks rewritten as a whole own their layers
    for name, module in model.named_modules():
        if isinstance(module, resnet_cls) and _resnet_issue(module) is None:
            sc = module.conv_shortcut
            entry = {
                "kind": "resnet",
                "conv1": live_rows(module.conv1.weight),
                "conv2": live_rows(module.conv2.weight),
                "shortcut": None if sc is None else live_rows(sc.weight),
            }
            sizes = [module.conv1.out_channels, module.conv2.out_channels]
            sizes += [] if sc is None else [sc.out_channels]
        elif isinstance(module, attention_cls) and _attention_issue(module) is None:
            entry = {
                "kind": "attention",
                "qk": _head_rows(module.to_k.weight, module.heads),
                "v": _head_rows(module.to_v.weight, module.heads),
                "out": live_rows(module.to_out[0].weight),
            }
            sizes = [module.to_k.out_features] * 2 + [module.to_out[0].out_features]
        else:
            if isinstance(module, _READS_WEIGHTS):
                inside.append(name + ".")
            continue
        kept = [entry[k] for k in entry if k != "kind" and entry[k] is not None]
        if any(len(rows) < size for rows, size in zip(kept, sizes)):
            plan[name] = entry
            inside.append(name + ".")
    for name, module in model.named_modules():
        if not name or name.startswith(tuple(inside)):
            continue
        if isinstance(module, _ROW_LAYERS) and getattr(module, "groups", 1) == 1:
            rows = live_rows(module.weight)
            if len(rows) < module.weight.shape[0]:
                plan[name] = {"kind": "rows", "rows": rows}
    return plan


def apply_plan(model: nn.Module, plan: dict[str, dict[str, Any]]) -> nn.Module:
    """Rewrite ``model`` in place by ``plan`` (from :func:`plan_condense`); returns it.

    The condensed modules are built from ``model``'s current weights; on a plain, freshly
    built model this gives the right shapes for :func:`load_condensed` to load into.
    """
    for name, entry in plan.items():
        module = model.get_submodule(name)
        kind = entry["kind"]
        if kind == "resnet":
            new = CondensedResnet(module, entry["conv1"], entry["conv2"], entry["shortcut"])
        elif kind == "attention":
            new = CondensedAttention(module, entry["qk"], entry["v"], entry["out"])
        elif kind == "rows":
            new = RowSparse(module, entry["rows"])
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
    return apply_plan(copy.deepcopy(model), plan), plan


# ---------------------------------------------------------------------- files
def save_condensed(
    model: nn.Module, plan: dict[str, dict[str, Any]], directory: str | Path, **info: Any
) -> Path:
    """Write ``condensed.json`` (format, plan, ``info``) and ``condensed.safetensors``."""
    directory = Path(directory)
    save_weights(model, directory / WEIGHTS_FILE)
    write_json(directory / PLAN_FILE, {"format": FORMAT, **info, "plan": plan})
    return directory


def read_condensed_info(directory: str | Path) -> dict[str, Any] | None:
    """The ``condensed.json`` record of ``directory``, or None if it holds no condensed model."""
    path = Path(directory) / PLAN_FILE
    if not path.exists():
        return None
    info = read_json(path)
    if info.get("format") != FORMAT:
        raise ValueError(f"{path}: not a condensed model ({FORMAT})")
    return info


def load_condensed(plain: nn.Module, directory: str | Path) -> nn.Module:
    """Rebuild the condensed network from a plain model of the same config and load it."""
    info = read_condensed_info(directory)
    if info is None:
        raise FileNotFoundError(f"{Path(directory) / PLAN_FILE} is missing")
    model = apply_plan(plain, info["plan"])
    model.load_state_dict(load_weights(Path(directory) / WEIGHTS_FILE))
    return model
