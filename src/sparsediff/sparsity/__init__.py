"""Sparse-to-sparse training engine: Static, RigL, MagRan and a dense baseline.

Methods are objects in the ``METHODS`` registry (name -> `Method`); masks are unstructured,
per channel or n:m (``granularity``). ``SparseTraining`` attaches to a model and its
optimizer through optimizer step hooks; ``SparseSettings`` holds its choices, defaults and
rules (a run config's ``sparse`` section is one); ``flops`` counts parameters and
inference/training FLOPs of the masked model.
"""

from . import flops
from .distributions import DISTRIBUTIONS, layer_densities
from .engine import SparseTraining, check_settings
from .granularity import parse_granularity
from .methods import METHODS, Method
from .schedules import SCHEDULES, prune_fraction
from .selection import default_maskable, select_parameters
from .settings import SparseSettings

__all__ = [
    "DISTRIBUTIONS",
    "METHODS",
    "Method",
    "SCHEDULES",
    "SparseSettings",
    "SparseTraining",
    "check_settings",
    "default_maskable",
    "flops",
    "layer_densities",
    "parse_granularity",
    "prune_fraction",
    "select_parameters",
]
