"""The diffusion model families behind one interface, each with the config sections it owns.

* :mod:`.base` — the :class:`Pipeline` interface and :class:`FamilyConfig` (what every family's
  config holds); :mod:`.ldm` (Latent Diffusion) and :mod:`.chirodiff` (ChiroDiff) implement it.
* :mod:`.registry` — the pipelines by name, and so :func:`load_config` (a run's config is its
  pipeline's ``config_class``).

What runs any family (train, sample, evaluate, export, condense) is ``sparsediff.workflows``.
"""

from sparsediff.pipelines.base import FamilyConfig, Pipeline, sample_seeds
from sparsediff.pipelines.registry import (
    PIPELINES,
    absolute_overrides,
    get_pipeline,
    load_config,
    read_run_config,
)

__all__ = [
    "PIPELINES",
    "FamilyConfig",
    "Pipeline",
    "absolute_overrides",
    "get_pipeline",
    "load_config",
    "read_run_config",
    "sample_seeds",
]
