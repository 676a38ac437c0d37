"""Condense a channel-sparse denoiser into a smaller dense network with the same outputs.

A *dead* row (output channel) of a Linear/Conv weight is one whose weights are all exactly zero.
It is read from the weights alone, so no mask is needed and the rewrite is exact for any weights.
A dead row does not output zero: it outputs its **bias**, a constant. Everything below keeps
that constant's effect, so the condensed network computes the same function (up to float
rounding; ``docs/speedups.md`` has the derivations):

* :class:`RowSparse` — any other Linear/Conv computes only its live rows; dead rows get their
  bias.
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
* The residual stream of a diffusers ``UNet2DModel`` (:func:`_stream`): a stream channel that is
  dead in every layer writing its segment (train with ``models.unet.stream_groups`` tied) holds
  a constant made of biases only. It is followed through the network, and every module that
  reads the stream (:class:`NarrowNorm` for its GroupNorms, the resnets, attentions,
  :class:`NarrowResample`, :class:`NarrowHead`) gets only the live channels plus the constants'
  values, so the stream itself is narrower.

``torch-pruning``'s dependency graph is not used: its channel removal deletes a channel, which
is only exact for channels that are exactly zero and outside every GroupNorm group, which does
not hold for dead channels with a bias.

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

FORMAT = "sparsediff.condensed/2"
PLAN_FILE = "condensed.json"
WEIGHTS_FILE = "condensed.safetensors"
CONDENSED_ENTRIES = (PLAN_FILE, WEIGHTS_FILE)

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


def _conv_fold(conv: nn.Module, rows: Sequence[int], dead: Sequence[int]) -> torch.Tensor:
    """``conv``'s kernels from the ``dead`` inputs to ``rows``, as ``(dead, rows * kh * kw)``
    for :func:`_constant_through_conv`."""
    fold = conv.weight.detach()[_index(rows)][:, _index(dead)]
    return fold.transpose(0, 1).reshape(len(dead), fold[:, :1].numel()).clone()


def _positions(rows: Sequence[int], within: Sequence[int]) -> list[int]:
    """Where each of ``rows`` sits in ``within`` (rows must all be in it)."""
    where = {channel: i for i, channel in enumerate(within)}
    return [where[row] for row in rows]


class NarrowNorm(nn.Module):
    """A GroupNorm over a tensor that holds only its ``live`` channels; every other channel is
    constant over positions (one value per sample) and is passed as that value.

    Exact because all channels have the same position count: the group statistics come from
    per-channel ones, ``mean_g = mean_c(m_c)``, ``var_g = mean_c(var_c + (m_c - mean_g)^2)``,
    with ``m = value``, ``var = 0`` for a constant channel.
    """

    def __init__(self, norm: nn.GroupNorm, live: Sequence[int]) -> None:
        super().__init__()
        width = norm.num_channels
        order = list(live) + _complement(live, width)  # kept-first position -> channel
        self.eps = norm.eps
        ones = torch.ones(width, device=norm.weight.device if norm.affine else None)
        gamma = norm.weight.detach() if norm.affine else ones
        beta = norm.bias.detach() if norm.affine else ones * 0
        self.gamma = nn.Parameter(gamma[_index(order)].clone())
        self.beta = nn.Parameter(beta[_index(order)].clone())
        # kept-first position -> norm group, as matrices: (width, groups) averages a group's
        # channels, (groups, width) hands a group's value to its channels
        groups = norm.num_groups
        group = F.one_hot(_index(order) // (width // groups), groups).to(gamma)
        self.register_buffer("average", group / group.sum(0), persistent=False)
        self.register_buffer("spread", group.T.contiguous(), persistent=False)

    def forward(self, h: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``h`` ``(B, live, *positions)``; ``values`` ``(B, width)``: a per-sample shift of
        each live channel (added before normalising), then the constant channels' values.
        Returns the live channels normalised and the constant channels' normalised values.
        In float32 at least, two-pass (``torch.var_mean`` is ~10x slower here on CPU)."""
        live, dims = h.shape[1], tuple(range(2, h.dim()))
        high = torch.promote_types(h.dtype, torch.float32)
        mean_h = h.mean(dim=dims, keepdim=True, dtype=high)
        var = (h - mean_h).square().mean(dim=dims)  # a constant channel's is 0
        mean = F.pad(mean_h.flatten(1), (0, values.shape[1] - live)) + values
        average, spread = self.average.to(high), self.spread.to(high)
        dev = mean - mean @ average @ spread  # channel mean - its group's mean
        group_var = var @ average[:live] + dev.square() @ average
        scale = (group_var + self.eps).rsqrt() @ spread * self.gamma
        # (h + shift - group mean) * scale + beta, the live shift folded into one addcmul
        shift = torch.addcmul(self.beta.to(high), values - mean + dev, scale)
        shift, scale = shift.to(h.dtype), scale.to(h.dtype)
        view = (h.shape[0], live) + (1,) * len(dims)
        normed = torch.addcmul(shift[:, :live].reshape(view), h, scale[:, :live].reshape(view))
        return normed, shift[:, live:]


class _NarrowInput(nn.Module):
    """Holds what a module that reads a narrowed stream needs: the input's constant channels
    (``dead``, their fixed values ``const``: they come from biases only)."""

    def _narrow_input(
        self, layer: nn.Module, inputs: Sequence[int] | None, const: Any
    ) -> list[int]:
        """Record the inputs of ``layer`` (the first that reads the stream); the dead ones."""
        width = layer.weight.shape[1]
        inputs = list(range(width)) if inputs is None else list(inputs)
        dead = _complement(inputs, width)
        self.inputs, self.dead_in = inputs, dead
        values = layer.weight.new_zeros(len(dead)) if const is None else const.detach().clone()
        self.register_buffer("in_const", values)  # persistent: saved with the weights
        return dead

    def _norm_values(self, x: torch.Tensor) -> torch.Tensor:
        """``NarrowNorm`` values for a stream input: no shift, then the constants."""
        const = self.in_const.to(x.dtype).expand(x.shape[0], -1)
        return torch.cat([x.new_zeros(x.shape[0], x.shape[1]), const], 1)


class CondensedResnet(_NarrowInput):
    """A diffusers ``ResnetBlock2D`` without its dead internal channels, same outputs.

    ``live1``: the kept conv1 channels (with their time shift, norm2 and conv2's inputs);
    ``live2`` / ``live_sc``: the live rows of conv2 and of the shortcut conv. The block reads
    the stream's ``inputs`` channels (the others are constants ``in_const``) and writes its
    ``outputs`` channels (the others are constants the next block knows); None: all.
    Internally the conv1 channels are ordered live first, then dead.
    """

    def __init__(
        self,
        block: nn.Module,
        live1: Sequence[int],
        live2: Sequence[int],
        live_sc: Sequence[int] | None,
        inputs: Sequence[int] | None = None,
        outputs: Sequence[int] | None = None,
        in_const: Any = None,
    ) -> None:
        super().__init__()
        width = block.conv1.out_channels
        dead_in = self._narrow_input(block.conv1, inputs, in_const)
        outputs = list(range(block.conv2.out_channels)) if outputs is None else list(outputs)
        dead1 = _complement(live1, width)
        order = list(live1) + dead1  # kept-first position -> channel
        self.act = block.nonlinearity
        self.norm1 = NarrowNorm(block.norm1, self.inputs) if dead_in else block.norm1
        self.skip_time_act = block.skip_time_act
        self.output_scale_factor = block.output_scale_factor
        self.conv1 = _sliced(block.conv1, live1, self.inputs)
        self.fold1 = nn.Parameter(_conv_fold(block.conv1, live1, dead_in))
        # One projection for the live channels' time shift and the dead channels' values: a
        # dead conv1 channel is its bias plus its time shift, constant over pixels.
        self.time = _sliced(block.time_emb_proj, order)
        with torch.no_grad():
            self.time.bias[len(live1) :] += _bias(block.conv1)[_index(dead1)]
        self.norm2 = NarrowNorm(block.norm2, live1)
        self.conv2 = _sliced(block.conv2, live2, live1, bias=False)
        self.fold = nn.Parameter(_conv_fold(block.conv2, live2, dead1))
        # conv2's and the shortcut's biases on the output channels (a dead row outputs these)
        constant = _bias(block.conv2).clone()
        self.shortcut = None
        if block.conv_shortcut is not None:
            self.shortcut = _sliced(block.conv_shortcut, live_sc, self.inputs, bias=False)
            self.fold_sc = nn.Parameter(_conv_fold(block.conv_shortcut, live_sc, dead_in))
            constant += _bias(block.conv_shortcut)
        elif self.inputs != outputs:
            raise ValueError("an identity shortcut reads and writes the same stream channels")
        self.constant = nn.Parameter(constant[_index(outputs)].clone())
        self.register_buffer("live2", _index(_positions(live2, outputs)), persistent=False)
        self.register_buffer(
            "live_sc", _index(_positions(live_sc or [], outputs)), persistent=False
        )

    def forward(self, x: torch.Tensor, temb: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """``(shortcut(x) + conv2(SiLU(norm2(conv1(SiLU(norm1(x))) + time))))/scale``."""
        if self.dead_in:
            h, u = self.norm1(x, self._norm_values(x))
            h = self.conv1(self.act(h))
            h = h + _constant_through_conv(
                self.act(u), self.fold1, self.conv1, x.shape[2:], h.shape[2:]
            )
        else:
            h = self.conv1(self.act(self.norm1(x)))
        time = self.time(temb if self.skip_time_act else self.act(temb))
        h, u = self.norm2(h, time)
        y = self.conv2(self.act(h))
        if u.shape[1]:
            y = y + _constant_through_conv(
                self.act(u), self.fold, self.conv2, h.shape[2:], y.shape[2:]
            )
        if self.shortcut is None:
            out = x + self.constant.to(y.dtype)[None, :, None, None]
        else:
            short = self.shortcut(x)
            if self.dead_in:  # the constant inputs, through the shortcut conv
                const = self.in_const.to(x.dtype)[None]
                short = short + _constant_through_conv(
                    const, self.fold_sc, self.shortcut, x.shape[2:], short.shape[2:]
                )
            out = _rows_plus(short, 1, self.live_sc, self.constant)
        out = _add_rows(out, 1, self.live2, y)
        return out if self.output_scale_factor == 1 else out / self.output_scale_factor


class CondensedAttention(_NarrowInput):
    """A diffusers self-``Attention`` (``AttnProcessor2_0``) without dead key/value channels.

    ``qk``: kept query/key channels (head-major, equal count per head), ``v``: kept value
    channels, ``out``: live rows of the output projection. It reads and writes the stream's
    ``inputs`` channels (residual connection); the others are constants ``in_const``.
    """

    def __init__(
        self,
        attn: nn.Module,
        qk: Sequence[int],
        v: Sequence[int],
        out: Sequence[int],
        inputs: Sequence[int] | None = None,
        in_const: Any = None,
    ) -> None:
        super().__init__()
        proj = attn.to_out[0]
        dead_in = self._narrow_input(attn.to_q, inputs, in_const)
        self.heads = attn.heads
        self.scale = (attn.to_k.out_features // attn.heads) ** -0.5  # SDPA's default, kept
        self.group_norm = attn.group_norm
        if dead_in and attn.group_norm is not None:
            self.group_norm = NarrowNorm(attn.group_norm, self.inputs)
        self.residual_connection = attn.residual_connection
        self.rescale_output_factor = attn.rescale_output_factor
        self.to_q = _sliced(attn.to_q, qk, self.inputs)
        self.to_k = _sliced(attn.to_k, qk, self.inputs)
        self.to_v = _sliced(attn.to_v, v, self.inputs)
        # the constant input channels' weights, (rows, dead) per projection
        self.fold_q, self.fold_k, self.fold_v = (
            nn.Parameter(layer.weight.detach()[_index(rows)][:, _index(dead_in)].clone())
            for layer, rows in ((attn.to_q, qk), (attn.to_k, qk), (attn.to_v, v))
        )
        dead_v = _index(_complement(v, attn.to_v.out_features))
        # A dead value channel averages to its bias: its share of the output is a constant.
        self.to_out = _sliced(proj, out, v, bias=False)
        bias = _bias(proj) + proj.weight.detach()[:, dead_v] @ _bias(attn.to_v)[dead_v]
        self.out_bias = nn.Parameter(bias[_index(self.inputs)].clone())
        self.register_buffer("out_rows", _index(_positions(out, self.inputs)), persistent=False)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Self-attention with the residual connection, as ``AttnProcessor2_0``."""
        if args or any(
            kwargs.get(k) is not None for k in ("encoder_hidden_states", "attention_mask")
        ):
            raise ValueError("a condensed attention block is self-attention without a mask")
        residual, ndim = hidden_states, hidden_states.dim()
        if ndim == 4:
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channels, height * width)
        else:
            hidden_states = hidden_states.transpose(1, 2)
        batch = hidden_states.shape[0]
        u = self.in_const.to(hidden_states.dtype).expand(batch, -1)
        if isinstance(self.group_norm, NarrowNorm):
            hidden_states, u = self.group_norm(hidden_states, self._norm_values(hidden_states))
        elif self.group_norm is not None:
            hidden_states = self.group_norm(hidden_states)
        hidden_states = hidden_states.transpose(1, 2)

        def project(layer: nn.Linear, fold: torch.Tensor) -> torch.Tensor:
            t = layer(hidden_states)
            if self.dead_in:  # constant over tokens: a per-sample bias
                t = t + (u @ fold.T.to(u.dtype))[:, None, :]
            return t.view(batch, -1, self.heads, t.shape[-1] // self.heads).transpose(1, 2)

        q, k = project(self.to_q, self.fold_q), project(self.to_k, self.fold_k)
        v = project(self.to_v, self.fold_v)
        o = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        o = o.transpose(1, 2).reshape(batch, -1, self.heads * v.shape[-1])
        o = _rows_plus(self.to_out(o), -1, self.out_rows, self.out_bias)
        if ndim == 4:
            o = o.transpose(-1, -2).reshape(batch, -1, height, width)
        if self.residual_connection:
            o = o + residual
        return o / self.rescale_output_factor


class NarrowResample(_NarrowInput):
    """A diffusers ``Downsample2D``/``Upsample2D`` (a convolution, after a nearest 2x
    upsampling for ``Upsample2D``) that reads the stream's ``inputs`` channels (others:
    constants ``in_const``) and writes only its ``outputs`` rows."""

    def __init__(
        self,
        module: nn.Module,
        inputs: Sequence[int] | None,
        outputs: Sequence[int],
        in_const: Any = None,
    ) -> None:
        super().__init__()
        dead_in = self._narrow_input(module.conv, inputs, in_const)
        self.up = bool(getattr(module, "interpolate", False))
        self.conv = _sliced(module.conv, outputs, self.inputs)
        self.fold = nn.Parameter(_conv_fold(module.conv, outputs, dead_in))

    def forward(self, x: torch.Tensor, output_size: Any = None, *args: Any, **kwargs: Any) -> Any:
        """The resampled stream (its live channels)."""
        if self.up:
            size = {"scale_factor": 2.0} if output_size is None else {"size": output_size}
            x = F.interpolate(x.contiguous(), mode="nearest", **size)
        y = self.conv(x)
        if self.dead_in:
            const = self.in_const.to(x.dtype)[None]
            y = y + _constant_through_conv(const, self.fold, self.conv, x.shape[2:], y.shape[2:])
        return y


class NarrowHead(_NarrowInput):
    """``conv_out(act(conv_norm_out(x)))`` of a UNet whose last stream holds only its
    ``inputs`` channels (others: constants ``in_const``); the model's ``conv_act`` and
    ``conv_out`` become identities."""

    def __init__(
        self,
        norm: nn.GroupNorm,
        act: nn.Module,
        conv: nn.Conv2d,
        inputs: Sequence[int],
        in_const: Any = None,
    ) -> None:
        super().__init__()
        dead_in = self._narrow_input(conv, inputs, in_const)
        self.norm, self.act = NarrowNorm(norm, self.inputs), act
        rows = range(conv.out_channels)
        self.conv = _sliced(conv, rows, self.inputs)
        self.fold = nn.Parameter(_conv_fold(conv, rows, dead_in))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The model's output at full width."""
        h, u = self.norm(x, self._norm_values(x))
        y = self.conv(self.act(h))
        return y + _constant_through_conv(
            self.act(u), self.fold, self.conv, x.shape[2:], y.shape[2:]
        )


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


def _alive(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().reshape(weight.shape[0], -1).ne(0).any(dim=1)


def _stream(model: nn.Module) -> dict[str, tuple[Any, Any, Any]]:
    """For a diffusers ``UNet2DModel`` whose residual stream has dead channels: per module
    that reads or writes it, ``(inputs, in_const, outputs)``.

    A stream channel is dead when its row is dead in every layer that writes its segment
    (``models.unet.stream_groups``; training with those groups tied makes that happen). A
    dead stream channel holds a constant that depends on biases only (each writer outputs its
    bias there, an identity shortcut or a residual connection adds what was there, an
    up-block concatenates saved streams), so it is followed through the network and every
    reader gets its input's live channels and the dead ones' values. ``inputs``/``outputs``
    are boolean masks of live channels (None where the module has none of that side);
    ``in_const`` the full-width values (0 at live channels). Empty when nothing is dead or
    the model is not a UNet the walk knows.
    """
    from sparsediff.models.unet import stream_groups, stream_steps

    try:
        steps, groups = stream_steps(model), stream_groups(model)
    except (AttributeError, ValueError):
        return {}
    live = {}  # weight name of a writer -> live channels of its segment
    for group in groups:
        alive = functools.reduce(torch.logical_or, [_alive(model.get_parameter(n)) for n in group])
        live.update(dict.fromkeys(group, alive))
    if all(bool(mask.all()) for mask in live.values()):
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
            cur, const = live["conv_in.weight"], _bias(module)
        elif kind == "resnet":
            if module.conv_shortcut is None:  # same segment: add to what is there
                const = (const + _bias(module.conv2)) / module.output_scale_factor
            else:
                cur = live[f"{name}.conv2.weight"]
                const = _bias(module.conv_shortcut) + _bias(module.conv2)
                const = const / module.output_scale_factor
        elif kind == "attention":
            const = (const + _bias(module.to_out[0])) / module.rescale_output_factor
        elif kind == "resample":
            cur, const = live[f"{name}.conv.weight"], _bias(module.conv)
        const = const.masked_fill(cur, 0) if cur is not None else None
        found[name] = (inputs, in_const, None if kind == "head" else cur)
    return found


def _rows_of(mask: Any) -> list[int] | None:
    return None if mask is None else mask.nonzero().flatten().tolist()


def plan_condense(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Which modules to rewrite and which rows they keep, read from the weights' zero rows.

    Entries (JSON-ready): ``{"kind": "resnet", "conv1", "conv2", "shortcut", "inputs",
    "outputs"}``, ``{"kind": "attention", "qk", "v", "out", "inputs"}``, ``{"kind": "rows",
    "rows"}``, and where a UNet's residual stream has dead channels (:func:`_stream`)
    ``{"kind": "slice", "rows"}`` (conv_in), ``{"kind": "resample", "inputs", "outputs"}`` and
    ``{"kind": "head", "inputs"}`` (conv_norm_out, conv_act, conv_out), with lists of kept row
    or channel indices (``inputs``/``outputs`` None: all). Modules without a dead row, on a
    stream without dead channels, are left out.
    """
    resnet_cls, attention_cls = _kinds()
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
                "qk": _head_rows(module.to_k.weight, module.heads),
                "v": _head_rows(module.to_v.weight, module.heads),
                "out": live_rows(module.to_out[0].weight),
                "inputs": _rows_of(inputs),
            }
            sizes = [module.to_k.out_features] * 2 + [module.to_out[0].out_features]
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
        kept = [entry[k] for k in ("conv1", "conv2", "shortcut", "qk", "v", "out") if entry.get(k)]
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
        const = None
        if constants is not None and inputs is not None:
            const = constants[name][_index(_complement(inputs, constants[name].numel()))]
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
        elif kind == "slice":
            new = _sliced(module, entry["rows"])
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
    constants = {name: spec[1] for name, spec in _stream(model).items() if spec[1] is not None}
    return apply_plan(copy.deepcopy(model), plan, constants), plan


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
    if str(info.get("format", "")).startswith("sparsediff.condensed/") and info["format"] != FORMAT:
        raise ValueError(f"{path}: {info['format']} is an older layout; condense the run again")
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
