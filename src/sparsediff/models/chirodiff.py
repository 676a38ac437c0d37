"""ChiroDiff denoisers over pen-point sequences (bi-GRU and Transformer) and a masked loss.

Both models take a noisy padded batch ``x_t`` ``(B, L, 3)`` in the data representation
("velocity": dx, dy, pen; "absolute": x, y, pen), the diffusion time ``t`` ``(B,)`` and
valid ``lengths`` ``(B,)``, and return ``(B, L, 3)`` with exact zeros at padded positions.

Time convention: ``t`` is either a float tensor of normalised time in ``[0, 1]`` or an
integer tensor of timesteps, which is divided by ``num_timesteps`` (given to the model).
The network always sees both position and velocity, computed from the noisy input
(velocity mode: positions = cumsum of velocities; absolute mode: velocities = differences,
the first one being the first position), as in ChiroDiff.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from sparsediff.data.sketch_ops import REPRESENTATIONS

N_FEATURES = 5  # 2 position + 2 velocity + pen


def sequence_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """Boolean ``(B, max_len)`` mask, True at valid (non-padded) positions."""
    return torch.arange(max_len, device=lengths.device)[None, :] < lengths[:, None]


def position_velocity_features(
    x: torch.Tensor, lengths: torch.Tensor, representation: str = "velocity"
) -> torch.Tensor:
    """``(B, L, 5)`` features ``[x, y, dx, dy, pen]`` from a padded batch; zeros at padding."""
    mask = sequence_mask(lengths, x.shape[1]).unsqueeze(-1)
    # where, not multiply: padded values (even NaN/inf) must not leak into cumsum/diff.
    x = torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))
    xy, pen = x[..., :2], x[..., 2:]
    if representation == "velocity":
        pos, vel = torch.cumsum(xy, dim=1) * mask, xy
    elif representation == "absolute":
        pos, vel = xy, torch.diff(xy, dim=1, prepend=torch.zeros_like(xy[:, :1])) * mask
    else:
        raise ValueError(f"representation must be one of {REPRESENTATIONS}, got {representation!r}")
    return torch.cat([pos, vel, pen], dim=-1)


class RandomFourierTimeEmbedding(nn.Module):
    """``[sin(2 pi t W), cos(2 pi t W)]`` with fixed ``W ~ N(0, scale^2)`` stored as a buffer.

    ``W`` is a (persistent) buffer, not a parameter: it is neither trained nor sparsified.
    """

    def __init__(self, dim: int = 8, scale: float = 4.0, seed: int = 0) -> None:
        super().__init__()
        if dim % 2:
            raise ValueError(f"time embedding dim must be even, got {dim}")
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer("weight", torch.randn(dim // 2, generator=gen) * scale)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """Embed normalised times ``t`` ``(B,)`` into ``(B, dim)``."""
        proj = 2 * math.pi * t[:, None].to(self.weight.dtype) * self.weight[None, :]
        return torch.cat([proj.sin(), proj.cos()], dim=-1)


class _SequenceDenoiser(nn.Module):
    """Shared input handling: validation, features, time normalisation and embedding."""

    def __init__(
        self,
        representation: str,
        time_dim: int,
        fourier_scale: float,
        num_timesteps: int | None,
        seed: int,
    ) -> None:
        super().__init__()
        if representation not in REPRESENTATIONS:
            raise ValueError(f"representation must be one of {REPRESENTATIONS}")
        self.representation = representation
        self.num_timesteps = num_timesteps
        self.time_embedding = RandomFourierTimeEmbedding(time_dim, fourier_scale, seed)

    def _normalised_time(
        self, t: torch.Tensor | float, batch: int, device: torch.device
    ) -> torch.Tensor:
        t = torch.as_tensor(t, device=device)
        if not t.is_floating_point():
            if self.num_timesteps is None:
                raise ValueError("integer timesteps need num_timesteps; or pass t in [0, 1]")
            t = t.float() / self.num_timesteps
        return t.float().reshape(-1).expand(batch) if t.numel() == 1 else t.float()

    def _inputs(
        self, x_t: torch.Tensor, t: torch.Tensor | float, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch, length, _ = x_t.shape
        lengths = lengths.to(device=x_t.device, dtype=torch.long)
        if lengths.min() < 1 or lengths.max() > length:
            raise ValueError(f"lengths must lie in [1, {length}]")
        mask = sequence_mask(lengths, length)
        feats = position_velocity_features(x_t, lengths, self.representation)
        temb = self.time_embedding(self._normalised_time(t, batch, x_t.device)).to(x_t.dtype)
        return feats, temb[:, None, :].expand(batch, length, -1), mask


class BiGRUDenoiser(_SequenceDenoiser):
    """ChiroDiff bi-GRU: GRU(5 + time_dim -> hidden, bidirectional) -> Linear(2H -> H)
    -> [concat time embedding] -> Linear(H + time_dim -> 3).

    Defaults (3 layers, hidden 96, time_dim 8) give 416,859 parameters (~0.417 M).
    ``activation`` between the two linear layers: None follows the ChiroDiff code; "silu"
    or "tanh" are optional. Padded steps are skipped with packed sequences.
    """

    def __init__(
        self,
        representation: str = "velocity",
        hidden: int = 96,
        layers: int = 3,
        time_dim: int = 8,
        fourier_scale: float = 4.0,
        num_timesteps: int | None = None,
        dropout: float = 0.0,
        activation: str | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(representation, time_dim, fourier_scale, num_timesteps, seed)
        self.gru = nn.GRU(
            N_FEATURES + time_dim,
            hidden,
            num_layers=layers,
            bidirectional=True,
            batch_first=True,
            dropout=dropout if layers > 1 else 0.0,
        )
        self.proj = nn.Linear(2 * hidden, hidden)
        self.act = _activation(activation)
        self.out = nn.Linear(hidden + time_dim, 3)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Predict ``(B, L, 3)`` (noise or data, per the trainer) with zeros at padding."""
        feats, temb, mask = self._inputs(x_t, t, lengths)
        packed = pack_padded_sequence(
            torch.cat([feats, temb], -1), mask.sum(1).cpu(), batch_first=True, enforce_sorted=False
        )
        hid, _ = self.gru(packed)
        hid, _ = pad_packed_sequence(hid, batch_first=True, total_length=x_t.shape[1])
        out = self.out(torch.cat([self.act(self.proj(hid)), temb], -1))
        return out * mask.unsqueeze(-1).to(out.dtype)


class TransformerDenoiser(_SequenceDenoiser):
    """Transformer encoder variant: Linear(5 + time_dim -> width) + sinusoidal positions
    -> TransformerEncoder(width, heads, ff = 2 x width, key padding mask)
    -> [concat time embedding] -> Linear(width + time_dim -> 3).
    """

    def __init__(
        self,
        representation: str = "velocity",
        width: int = 128,
        layers: int = 4,
        heads: int = 4,
        time_dim: int = 8,
        fourier_scale: float = 4.0,
        num_timesteps: int | None = None,
        dropout: float = 0.0,
        seed: int = 0,
    ) -> None:
        super().__init__(representation, time_dim, fourier_scale, num_timesteps, seed)
        self.width = width
        self.embed = nn.Linear(N_FEATURES + time_dim, width)
        layer = nn.TransformerEncoderLayer(
            width,
            heads,
            dim_feedforward=2 * width,
            dropout=dropout,
            activation=F.silu,
            batch_first=True,
        )
        # Nested tensors would change the padded outputs' handling between train/eval.
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.out = nn.Linear(width + time_dim, 3)

    def _positions(self, length: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        pos = torch.arange(length, device=device, dtype=torch.float32)[:, None]
        freq = torch.exp(
            torch.arange(0, self.width, 2, device=device, dtype=torch.float32)
            * (-math.log(10000.0) / self.width)
        )
        pe = torch.zeros(length, self.width, device=device)
        pe[:, 0::2] = torch.sin(pos * freq)
        pe[:, 1::2] = torch.cos(pos * freq[: self.width // 2])
        return pe.to(dtype)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Predict ``(B, L, 3)`` with zeros at padding."""
        feats, temb, mask = self._inputs(x_t, t, lengths)
        h = self.embed(torch.cat([feats, temb], -1)) + self._positions(
            x_t.shape[1], x_t.device, x_t.dtype
        )
        h = self.encoder(h, src_key_padding_mask=~mask)
        out = self.out(torch.cat([h, temb], -1))
        return out * mask.unsqueeze(-1).to(out.dtype)


def _activation(name: str | None) -> nn.Module:
    table = {None: nn.Identity, "none": nn.Identity, "silu": nn.SiLU, "tanh": nn.Tanh}
    if name not in table:
        raise ValueError(f"activation must be one of {list(table)}, got {name!r}")
    return table[name]()


ARCHS: dict[str, type[nn.Module]] = {"birnn": BiGRUDenoiser, "transformer": TransformerDenoiser}


def build_chirodiff_denoiser(arch: str = "birnn", **kwargs: object) -> nn.Module:
    """The denoiser class ``ARCHS[arch]`` built with ``kwargs``."""
    if arch not in ARCHS:
        raise ValueError(f"unknown ChiroDiff architecture {arch!r} ({' | '.join(ARCHS)})")
    return ARCHS[arch](**kwargs)


def masked_mse(pred: torch.Tensor, target: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """MSE over valid points only: per sequence mean over its ``length x C`` values,
    then averaged over the batch (padded values have no effect)."""
    mask = sequence_mask(lengths.to(pred.device), pred.shape[1]).unsqueeze(-1)
    # where, not multiply: NaN/inf in padding would survive a multiplication by 0.
    sq = torch.where(
        mask, (pred - target).pow(2), torch.zeros((), dtype=pred.dtype, device=pred.device)
    )
    per_seq = sq.sum(dim=(1, 2)) / (lengths.to(pred.device).clamp(min=1) * pred.shape[-1])
    return per_seq.mean()
