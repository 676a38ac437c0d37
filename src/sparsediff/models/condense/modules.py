"""The narrow modules a condensed UNet is built of: exact rewrites of diffusers' ResnetBlock2D and
Attention, the GroupNorms, resamplers and head that read a narrower residual stream."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .rows import (
    Derived,
    add_rows,
    bias_of,
    complement,
    constant_through_conv,
    conv_fold,
    index_of,
    layer_slice,
    positions,
    prefixed,
    rows_plus,
    sliced,
)


class NarrowNorm(Derived):
    """A GroupNorm over a tensor that holds only its ``live`` channels; every other channel is
    constant over positions (one value per sample) and is passed as that value.

    Exact because all channels have the same position count: the group statistics come from
    per-channel ones, ``mean_g = mean_c(m_c)``, ``var_g = mean_c(var_c + (m_c - mean_g)^2)``,
    with ``m = value``, ``var = 0`` for a constant channel.
    """

    def __init__(self, norm: nn.GroupNorm, live: Sequence[int]) -> None:
        super().__init__()
        width = norm.num_channels
        order = self._index("order", list(live) + complement(live, width))  # position -> channel
        self.eps = norm.eps
        # kept-first position -> norm group, as matrices: (width, groups) averages a group's
        # channels, (groups, width) hands a group's value to its channels
        groups = norm.num_groups
        ref = norm.weight if norm.affine else torch.ones(())
        group = F.one_hot(order // (width // groups), groups).to(ref)
        self.register_buffer("average", group / group.sum(0), persistent=False)
        self.register_buffer("spread", group.T.contiguous(), persistent=False)
        self._own(self.tensors(norm))

    def tensors(self, norm: nn.GroupNorm) -> dict[str, torch.Tensor]:
        """The affine parameters, kept channels first."""
        if not norm.affine:
            ones = torch.ones(norm.num_channels, device=self.ix_order.device)
            return {"gamma": ones, "beta": ones * 0}
        return {"gamma": norm.weight[self.ix_order], "beta": norm.bias[self.ix_order]}

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


class _NarrowInput(Derived):
    """Holds what a module that reads a narrowed stream needs: the input's constant channels
    (``dead``, their fixed values ``in_const``: they come from biases only)."""

    def _narrow_input(self, layer: nn.Module, inputs: Sequence[int] | None) -> list[int]:
        """Record the inputs of ``layer`` (the first that reads the stream); the dead ones."""
        width = layer.weight.shape[1]
        inputs = list(range(width)) if inputs is None else list(inputs)
        dead = complement(inputs, width)
        self.inputs, self.dead_in = inputs, dead
        self._index("inputs", inputs)
        self._index("dead_in", dead)
        return dead

    def _in_const(self, layer: nn.Module, const: Any) -> torch.Tensor:
        """The constant inputs' values (``const``; None: zeros)."""
        return layer.weight.new_zeros(len(self.dead_in)) if const is None else const

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
        dead_in = self._narrow_input(block.conv1, inputs)
        outputs = list(range(block.conv2.out_channels)) if outputs is None else list(outputs)
        dead1 = complement(live1, width)
        self._index("live1", live1)
        self._index("dead1", dead1)
        self._index("order", list(live1) + dead1)  # kept-first position -> channel
        self._index("live2", live2)
        self._index("outputs", outputs)
        self.act = block.nonlinearity
        self.norm1 = NarrowNorm(block.norm1, self.inputs) if dead_in else block.norm1
        self.skip_time_act = block.skip_time_act
        self.output_scale_factor = block.output_scale_factor
        self.conv1 = sliced(block.conv1, live1, self.inputs)
        # One projection for the live channels' time shift and the dead channels' values: a
        # dead conv1 channel is its bias plus its time shift, constant over pixels.
        self.time = sliced(block.time_emb_proj, list(live1) + dead1)
        self.norm2 = NarrowNorm(block.norm2, live1)
        self.conv2 = sliced(block.conv2, live2, live1, bias=False)
        self.shortcut = None
        if block.conv_shortcut is not None:
            self._index("live_sc", live_sc)
            self.shortcut = sliced(block.conv_shortcut, live_sc, self.inputs, bias=False)
        elif self.inputs != outputs:
            raise ValueError("an identity shortcut reads and writes the same stream channels")
        # where conv2's and the shortcut's live rows land among the block's outputs
        self.register_buffer("live2", index_of(positions(live2, outputs)), persistent=False)
        self.register_buffer(
            "live_sc", index_of(positions(live_sc or [], outputs)), persistent=False
        )
        self._own(self.tensors(block, in_const), buffers=("in_const",))

    def tensors(self, block: nn.Module, in_const: Any = None) -> dict[str, torch.Tensor]:
        """The narrow layers, the folds of constant inputs, the time projection with the dead
        channels' biases, and the output constant (conv2's and the shortcut's biases)."""
        t = {} if not self.dead_in else prefixed("norm1.", self.norm1.tensors(block.norm1))
        t.update(layer_slice(block.conv1, self.ix_live1, self.ix_inputs, prefix="conv1."))
        t["fold1"] = conv_fold(block.conv1, self.ix_live1, self.ix_dead_in)
        dead_bias = bias_of(block.conv1)[self.ix_dead1]
        time = layer_slice(block.time_emb_proj, self.ix_order, prefix="time.")
        time["time.bias"] = time["time.bias"] + F.pad(dead_bias, (len(self.ix_live1), 0))
        t.update(time)
        t.update(prefixed("norm2.", self.norm2.tensors(block.norm2)))
        t.update(layer_slice(block.conv2, self.ix_live2, self.ix_live1, False, "conv2."))
        t["fold"] = conv_fold(block.conv2, self.ix_live2, self.ix_dead1)
        constant = bias_of(block.conv2)
        sc = block.conv_shortcut
        if sc is not None:
            t.update(layer_slice(sc, self.ix_live_sc, self.ix_inputs, False, "shortcut."))
            t["fold_sc"] = conv_fold(sc, self.ix_live_sc, self.ix_dead_in)
            constant = constant + bias_of(sc)
        t["constant"] = constant[self.ix_outputs]
        t["in_const"] = self._in_const(block.conv1, in_const)
        return t

    def forward(self, x: torch.Tensor, temb: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """``(shortcut(x) + conv2(SiLU(norm2(conv1(SiLU(norm1(x))) + time))))/scale``."""
        if self.dead_in:
            h, u = self.norm1(x, self._norm_values(x))
            h = self.conv1(self.act(h))
            h = h + constant_through_conv(
                self.act(u), self.fold1, self.conv1, x.shape[2:], h.shape[2:]
            )
        else:
            h = self.conv1(self.act(self.norm1(x)))
        time = self.time(temb if self.skip_time_act else self.act(temb))
        h, u = self.norm2(h, time)
        y = self.conv2(self.act(h))
        if u.shape[1]:
            y = y + constant_through_conv(
                self.act(u), self.fold, self.conv2, h.shape[2:], y.shape[2:]
            )
        if self.shortcut is None:
            out = x + self.constant.to(y.dtype)[None, :, None, None]
        else:
            short = self.shortcut(x)
            if self.dead_in:  # the constant inputs, through the shortcut conv
                const = self.in_const.to(x.dtype)[None]
                short = short + constant_through_conv(
                    const, self.fold_sc, self.shortcut, x.shape[2:], short.shape[2:]
                )
            out = rows_plus(short, 1, self.live_sc, self.constant)
        out = add_rows(out, 1, self.live2, y)
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
        dead_in = self._narrow_input(attn.to_q, inputs)
        self._index("qk", qk)
        self._index("v", v)
        self._index("out", out)
        self._index("dead_v", complement(v, attn.to_v.out_features))
        self.heads = attn.heads
        self.scale = (attn.to_k.out_features // attn.heads) ** -0.5  # SDPA's default, kept
        self.group_norm = attn.group_norm
        if dead_in and attn.group_norm is not None:
            self.group_norm = NarrowNorm(attn.group_norm, self.inputs)
        self.residual_connection = attn.residual_connection
        self.rescale_output_factor = attn.rescale_output_factor
        self.to_q = sliced(attn.to_q, qk, self.inputs)
        self.to_k = sliced(attn.to_k, qk, self.inputs)
        self.to_v = sliced(attn.to_v, v, self.inputs)
        self.to_out = sliced(proj, out, v, bias=False)
        self.register_buffer("out_rows", index_of(positions(out, self.inputs)), persistent=False)
        self._own(self.tensors(attn, in_const), buffers=("in_const",))

    def tensors(self, attn: nn.Module, in_const: Any = None) -> dict[str, torch.Tensor]:
        """The narrow projections, the constant inputs' weights (``fold_*``, ``(rows, dead)``)
        and the output bias, into which the dead value channels fold: a dead value channel
        averages to its bias, so its share of the output is a constant."""
        t = {}
        if isinstance(self.group_norm, NarrowNorm):
            t.update(prefixed("group_norm.", self.group_norm.tensors(attn.group_norm)))
        for key, rows in (("q", self.ix_qk), ("k", self.ix_qk), ("v", self.ix_v)):
            layer = getattr(attn, f"to_{key}")
            t.update(layer_slice(layer, rows, self.ix_inputs, prefix=f"to_{key}."))
            t[f"fold_{key}"] = layer.weight[rows][:, self.ix_dead_in]
        proj, dead_v = attn.to_out[0], self.ix_dead_v
        t.update(layer_slice(proj, self.ix_out, self.ix_v, False, "to_out."))
        bias = bias_of(proj) + proj.weight[:, dead_v] @ bias_of(attn.to_v)[dead_v]
        t["out_bias"] = bias[self.ix_inputs]
        t["in_const"] = self._in_const(attn.to_q, in_const)
        return t

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
        o = rows_plus(self.to_out(o), -1, self.out_rows, self.out_bias)
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
        self._narrow_input(module.conv, inputs)
        self._index("outputs", outputs)
        self.up = bool(getattr(module, "interpolate", False))
        self.conv = sliced(module.conv, outputs, self.inputs)
        self._own(self.tensors(module, in_const), buffers=("in_const",))

    def tensors(self, module: nn.Module, in_const: Any = None) -> dict[str, torch.Tensor]:
        """The narrow convolution and the fold of its constant inputs."""
        t = layer_slice(module.conv, self.ix_outputs, self.ix_inputs, prefix="conv.")
        t["fold"] = conv_fold(module.conv, self.ix_outputs, self.ix_dead_in)
        t["in_const"] = self._in_const(module.conv, in_const)
        return t

    def forward(self, x: torch.Tensor, output_size: Any = None, *args: Any, **kwargs: Any) -> Any:
        """The resampled stream (its live channels)."""
        if self.up:
            size = {"scale_factor": 2.0} if output_size is None else {"size": output_size}
            x = F.interpolate(x.contiguous(), mode="nearest", **size)
        y = self.conv(x)
        if self.dead_in:
            const = self.in_const.to(x.dtype)[None]
            y = y + constant_through_conv(const, self.fold, self.conv, x.shape[2:], y.shape[2:])
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
        self._narrow_input(conv, inputs)
        self._index("rows", range(conv.out_channels))
        self.norm, self.act = NarrowNorm(norm, self.inputs), act
        self.conv = sliced(conv, range(conv.out_channels), self.inputs)
        self._own(self.tensors(norm, conv, in_const), buffers=("in_const",))

    def tensors(
        self, norm: nn.GroupNorm, conv: nn.Conv2d, in_const: Any = None
    ) -> dict[str, torch.Tensor]:
        """The narrow norm and convolution, and the fold of the constant inputs."""
        t = prefixed("norm.", self.norm.tensors(norm))
        t.update(layer_slice(conv, self.ix_rows, self.ix_inputs, prefix="conv."))
        t["fold"] = conv_fold(conv, self.ix_rows, self.ix_dead_in)
        t["in_const"] = self._in_const(conv, in_const)
        return t

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The model's output at full width."""
        h, u = self.norm(x, self._norm_values(x))
        y = self.conv(self.act(h))
        return y + constant_through_conv(
            self.act(u), self.fold, self.conv, x.shape[2:], y.shape[2:]
        )


class CondensedFeedForward(Derived):
    """A diffusers ``FeedForward`` (``proj`` → activation → dropout 0 → ``out``) without its
    dead hidden neurons.

    A dead neuron (a zero row of ``proj``) outputs ``act(bias)``, the same for every token: its
    share of the output, ``out.weight[:, dead] @ act(bias[dead])``, is folded into the output
    bias, and ``out`` reads only the live neurons. Exact for any weights.
    """

    def __init__(self, ff: nn.Module, rows: Sequence[int]) -> None:
        super().__init__()
        first, last = ff.net[0], ff.net[-1]
        self._index("rows", rows)
        self._index("dead", complement(rows, first.proj.out_features))
        self.proj = sliced(first.proj, rows)
        self.act = copy.deepcopy(first)
        self.act.proj = nn.Identity()  # the activation module keeps its own kind of GELU
        self.out = sliced(last, range(last.out_features), rows)
        self._own(self.tensors(ff))

    def tensors(self, ff: nn.Module) -> dict[str, torch.Tensor]:
        """The live neurons' rows and columns; the dead ones' outputs in the output bias."""
        first, last = ff.net[0], ff.net[-1]
        t = layer_slice(first.proj, self.ix_rows, prefix="proj.")
        t["out.weight"] = last.weight[:, self.ix_rows]
        constant = self.act(bias_of(first.proj)[self.ix_dead])  # what each dead neuron outputs
        t["out.bias"] = bias_of(last) + last.weight[:, self.ix_dead] @ constant
        return t

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The block's output for all tokens."""
        return self.out(self.act(self.proj(hidden_states)))
