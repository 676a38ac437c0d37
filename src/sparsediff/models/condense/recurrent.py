"""A GRU without its dead hidden units (trained with ``sparse.granularity = "unit"``).

A dead unit has zero gate rows in both weights, a zero recurrent column and zero biases, so its
new-gate activation is ``tanh(0) = 0`` and its state stays exactly 0 from the zero initial
state. Removing it, and the next layer's input columns that read it, changes nothing. A fused
``nn.GRU`` has one width for every layer, so the condensed network is one single-layer GRU per
layer, each as wide as its wider direction's live units (the narrower direction keeps as many,
padded with dead units, which stay zero); the last layer's output is put back at full width
for whatever reads it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from .rows import Derived, index_of

_SFX = ("", "_reverse")


def gru_issue(gru: nn.GRU) -> str | None:
    """Why a GRU cannot be condensed (None: it can)."""
    if not gru.bias or gru.dropout or getattr(gru, "proj_size", 0):
        return "no biases, dropout or a projection"
    if not gru.batch_first:
        return "not batch_first"
    return None


def live_units(gru: nn.GRU) -> list[list[int]]:
    """Per layer, the kept units of each direction: its live ones (any non-zero gate row or
    bias), padded with its lowest dead ones to the wider direction's count."""
    hidden, dirs = gru.hidden_size, 1 + gru.bidirectional
    out = []
    for layer in range(gru.num_layers):
        alive = []
        for sfx in _SFX[:dirs]:
            rows = torch.zeros(hidden, dtype=torch.bool)
            for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                t = getattr(gru, f"{kind}_l{layer}{sfx}").detach().reshape(3, hidden, -1)
                rows |= t.ne(0).any(dim=2).any(dim=0).cpu()
            alive.append(rows)
        width = max(1, max(int(a.sum()) for a in alive))
        ranked = [sorted(range(hidden), key=lambda j, a=a: (not bool(a[j]), j)) for a in alive]
        out.append([sorted(r[:width]) for r in ranked])
    return out


class CondensedGRU(Derived):
    """``nn.GRU``'s forward (batch first, a tensor or a PackedSequence; zero initial state)
    through a narrower GRU per layer; ``keep[l][d]``: the units direction ``d`` of layer ``l``
    keeps (from :func:`live_units`)."""

    def __init__(self, gru: nn.GRU, keep: Sequence[Sequence[Sequence[int]]]) -> None:
        super().__init__()
        self.hidden, self.dirs = gru.hidden_size, 1 + gru.bidirectional
        self.keep = [[list(k) for k in kept] for kept in keep]
        self.layers = nn.ModuleList()
        reads = None  # the previous layer's kept outputs, as columns of this layer's input
        for layer, kept in enumerate(self.keep):
            self.layers.append(
                nn.GRU(
                    gru.input_size if reads is None else len(reads),
                    len(kept[0]),
                    batch_first=True,
                    bidirectional=gru.bidirectional,
                ).to(gru.weight_ih_l0.device, gru.weight_ih_l0.dtype)
            )
            for d in range(self.dirs):
                self._index(f"units_{layer}_{d}", kept[d])
                rows = [g * self.hidden + j for g in range(3) for j in kept[d]]  # 3 gates
                self._index(f"rows_{layer}_{d}", rows)
            if reads is not None:
                self._index(f"reads_{layer}", reads)
            reads = [d * self.hidden + j for d in range(self.dirs) for j in kept[d]]
        self.register_buffer("outputs", index_of(reads), persistent=False)  # the last layer's
        self._own(self.tensors(gru))

    def tensors(self, gru: nn.GRU) -> dict[str, torch.Tensor]:
        """Per layer and direction: the kept units' gate rows, their recurrent columns and
        the previous layer's kept outputs as input columns."""
        t = {}
        for layer in range(len(self.keep)):
            reads = getattr(self, f"ix_reads_{layer}", None)
            for d, sfx in enumerate(_SFX[: self.dirs]):
                rows = getattr(self, f"ix_rows_{layer}_{d}")
                w_ih = getattr(gru, f"weight_ih_l{layer}{sfx}")[rows]
                w_hh = getattr(gru, f"weight_hh_l{layer}{sfx}")[rows]
                new = f"layers.{layer}."
                t[f"{new}weight_ih_l0{sfx}"] = w_ih if reads is None else w_ih[:, reads]
                t[f"{new}weight_hh_l0{sfx}"] = w_hh[:, getattr(self, f"ix_units_{layer}_{d}")]
                for kind in ("bias_ih", "bias_hh"):
                    t[f"{new}{kind}_l0{sfx}"] = getattr(gru, f"{kind}_l{layer}{sfx}")[rows]
        return t

    def forward(self, x: Any, h0: Any = None) -> tuple[Any, torch.Tensor]:
        """The full GRU's ``(output, h_n)``; dead units output zeros."""
        if h0 is not None:
            raise ValueError("a condensed GRU starts from the zero state")
        finals = []
        for layer in self.layers:
            x, h_n = layer(x)
            finals.append(h_n)
        packed = isinstance(x, PackedSequence)
        data = x.data if packed else x
        full = data.new_zeros(*data.shape[:-1], self.dirs * self.hidden)
        full[..., self.outputs] = data
        if packed:
            full = PackedSequence(full, x.batch_sizes, x.sorted_indices, x.unsorted_indices)
        h_full = data.new_zeros(len(self.keep) * self.dirs, finals[0].shape[1], self.hidden)
        for layer, h_n in enumerate(finals):
            for d in range(self.dirs):
                h_full[layer * self.dirs + d][:, getattr(self, f"ix_units_{layer}_{d}")] = h_n[d]
        return full, h_full
