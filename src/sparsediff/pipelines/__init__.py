"""The diffusion pipelines behind one interface, and what runs them.

* :mod:`.base` — the :class:`Pipeline` interface; :mod:`.ldm` (Latent Diffusion) and
  :mod:`.chirodiff` (ChiroDiff) implement it; :mod:`.registry` maps config names to classes.
* :mod:`.run` — the run skeleton every pipeline shares (``train``, ``load_run``,
  ``write_samples``).
* :mod:`.evaluation` — the evaluation protocol over any pipeline (``evaluate``, ``noise_floors``).
"""

from sparsediff.pipelines.base import Pipeline
from sparsediff.pipelines.evaluation import evaluate, noise_floors
from sparsediff.pipelines.registry import PIPELINES, get_pipeline
from sparsediff.pipelines.run import load_run, train, write_samples

__all__ = [
    "PIPELINES",
    "Pipeline",
    "evaluate",
    "noise_floors",
    "get_pipeline",
    "load_run",
    "train",
    "write_samples",
]
