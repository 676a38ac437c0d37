"""Sparse-to-sparse training engine: Static, RigL, MagRan and a dense baseline.

``SparseTraining`` attaches to a model and its optimizer through optimizer step hooks;
``flops`` counts parameters and inference/training FLOPs of the masked model.
"""

from . import flops
from .distributions import DISTRIBUTIONS, layer_densities
from .engine import METHODS, SparseTraining
from .schedules import SCHEDULES, prune_fraction
from .selection import default_maskable, select_parameters

__all__ = [
    "DISTRIBUTIONS",
    "METHODS",
    "SCHEDULES",
    "SparseTraining",
    "default_maskable",
    "flops",
    "layer_densities",
    "prune_fraction",
    "select_parameters",
]
