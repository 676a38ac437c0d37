"""Run the Linear layers of a 2:4-sparse model through semi-structured sparse GPU kernels.

``torch.sparse.to_sparse_semi_structured`` stores a weight with exactly 2 non-zeros in every
group of 4 consecutive weights of a row (the engine's ``granularity="2:4"`` pattern) as the
non-zeros plus metadata, and ``F.linear`` then runs the sparse tensor-core kernels
(cuSPARSELt, or CUTLASS where cuSPARSELt is missing). They need CUDA with compute capability
>= 8.0, float16/bfloat16 weights and both weight dimensions multiples of the backend's block
(e.g. 32 x 64 for CUTLASS bf16; the activations are padded by PyTorch). Convolutions have no
such kernel. Anywhere else the model runs dense, unchanged, with a one-line notice.

    model = model.to("cuda", torch.bfloat16).eval()
    report = to_semi_structured(model)   # in place; inference only (weights stop training)
    print(report.summary())
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from torch import nn

from .selection import CONV_LAYERS

_HALF = (torch.float16, torch.bfloat16)
# Modules that read their Linear layers' weights directly (fused paths): left dense.
_READS_WEIGHTS = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)
_FALLBACK_MIN_SHAPE = (32, 64)  # CUTLASS fp16/bf16, the stricter backend


@dataclass
class SemiStructuredReport:
    """What :func:`to_semi_structured` did: converted layers, skipped ones with the reason."""

    converted: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    backend: str | None = None
    notice: str | None = None  # one line when no layer runs through the kernels

    def summary(self) -> str:
        """One line: how many layers were converted, and the reasons for the others."""
        reasons: dict[str, int] = {}
        for reason in self.skipped.values():
            reasons[reason] = reasons.get(reason, 0) + 1
        why = "; ".join(f"{n} x {r}" for r, n in sorted(reasons.items(), key=lambda x: -x[1]))
        where = f" ({self.backend})" if self.backend else ""
        return f"2:4 kernels{where}: {len(self.converted)} Linear layers converted" + (
            f"; skipped {why}" if why else ""
        )


def _backend() -> type | None:
    """The semi-structured tensor class PyTorch would use here (None: none in this build)."""
    sparse = torch.sparse
    if not hasattr(sparse, "to_sparse_semi_structured"):
        return None
    cusparselt = getattr(torch.backends, "cusparselt", None)
    if cusparselt is not None and cusparselt.is_available():
        return sparse.SparseSemiStructuredTensorCUSPARSELT
    return sparse.SparseSemiStructuredTensorCUTLASS


def kernel_issue(device: torch.device | str) -> str | None:
    """Why the kernels cannot run on ``device`` (None: they can)."""
    device = torch.device(device)
    if _backend() is None:
        return "this PyTorch has no torch.sparse.to_sparse_semi_structured"
    if device.type != "cuda":
        return f"needs CUDA, the model is on {device.type}"
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 0):
        return f"needs compute capability >= 8.0, the GPU has {major}.{minor}"
    return None


def min_shape(dtype: torch.dtype) -> tuple[int, int]:
    """Smallest block (rows, columns) a weight's shape must be a multiple of."""
    table = getattr(_backend(), "_DTYPE_SHAPE_CONSTRAINTS", {})  # PyTorch's own table
    if dtype in table:
        return table[dtype].sparse_min_rows, table[dtype].sparse_min_cols
    return _FALLBACK_MIN_SHAPE


def is_two_four(weight: torch.Tensor) -> bool:
    """Whether every group of 4 consecutive weights of a row has at most 2 non-zeros."""
    if weight.dim() != 2 or weight.shape[1] % 4:
        return False
    return bool((weight.detach().reshape(-1, 4).ne(0).sum(dim=1) <= 2).all())


def linear_issue(weight: torch.Tensor, block: tuple[int, int] | None = None) -> str | None:
    """Why a Linear weight cannot be stored semi-structured (None: it can).

    ``block`` is the shape constraint (rows, columns); by default the backend's for the dtype.
    """
    if weight.dtype not in _HALF:
        return f"dtype {str(weight.dtype).removeprefix('torch.')} (needs float16 or bfloat16)"
    rows, cols = block or min_shape(weight.dtype)
    out, inp = weight.shape
    if out % rows or inp % cols:
        return f"shape not a multiple of ({rows}, {cols})"
    if not is_two_four(weight):
        return "not 2:4 sparse"
    return None


def _contiguous_input(module: nn.Module, args: tuple) -> tuple:
    """The sparse linear flattens its input with ``view``; a transposed activation (diffusers'
    attention after its GroupNorm) must be made contiguous first."""
    return (args[0].contiguous(), *args[1:])


def to_semi_structured(model: nn.Module, quiet: bool = False) -> SemiStructuredReport:
    """Convert every eligible Linear weight of ``model`` in place; returns the report.

    Eligible: a 2:4-sparse float16/bfloat16 weight whose shape fits the kernels, on a CUDA
    device with compute capability >= 8.0. Convolutions and Linear layers inside modules that
    read weights directly (``nn.MultiheadAttention``, ``nn.TransformerEncoderLayer``) are
    skipped. Where no layer can be converted the model is unchanged and a one-line notice is
    warned (unless ``quiet``) and kept in ``report.notice``. For inference: converted weights
    no longer train.
    """
    report = SemiStructuredReport()
    first = next(model.parameters(), None)
    device_issue = kernel_issue(first.device if first is not None else "cpu")
    backend = _backend()
    report.backend = getattr(backend, "BACKEND", None) if device_issue is None else None
    fused: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, _READS_WEIGHTS):
            fused.append(name + ".")
        if isinstance(module, CONV_LAYERS):
            report.skipped[name] = "convolution (no semi-structured kernel)"
        if not isinstance(module, nn.Linear):
            continue
        if name.startswith(tuple(fused)):
            reason = "inside a module that reads the weight directly"
        else:
            reason = device_issue or linear_issue(module.weight)
        if reason:
            report.skipped[name] = reason
            continue
        with torch.no_grad():
            sparse = backend.from_dense(module.weight.detach().contiguous())
        module.weight = nn.Parameter(sparse, requires_grad=False)
        module.register_forward_pre_hook(_contiguous_input)
        report.converted.append(name)
    if not report.converted:
        why = device_issue or "no eligible Linear layer"
        report.notice = f"2:4 semi-structured kernels not used ({why}); the model runs dense"
        if not quiet:
            warnings.warn(report.notice, stacklevel=2)
    return report
