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
* :class:`CondensedGRU` — a GRU trained with ``unit`` granularity: a dead hidden unit outputs
  exactly zero (its biases are masked with it), so it leaves the GRU and the next layer's
  input columns; one narrower single-layer GRU per layer (``condense/recurrent.py``).
* :class:`CondensedFeedForward` — a transformer's MLP (diffusers ``FeedForward``): a dead hidden
  neuron outputs ``act(bias)`` for every token, folded into the output bias.
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

from .modules import CondensedAttention, CondensedResnet, NarrowHead, NarrowNorm, NarrowResample
from .plan import alive, apply_plan, condense, condensed_tensors, plan_condense
from .recurrent import CondensedGRU
from .rows import RowSparse, constant_through_conv, live_rows
from .storage import (
    CONDENSED_ENTRIES,
    FORMAT,
    PLAN_FILE,
    WEIGHTS_FILE,
    load_condensed,
    read_condensed_info,
    save_condensed,
)

__all__ = [
    "CONDENSED_ENTRIES",
    "FORMAT",
    "PLAN_FILE",
    "WEIGHTS_FILE",
    "CondensedAttention",
    "CondensedGRU",
    "CondensedResnet",
    "NarrowHead",
    "NarrowNorm",
    "NarrowResample",
    "RowSparse",
    "alive",
    "apply_plan",
    "condense",
    "condensed_tensors",
    "constant_through_conv",
    "live_rows",
    "load_condensed",
    "plan_condense",
    "read_condensed_info",
    "save_condensed",
]
