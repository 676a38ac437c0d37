"""What runs any pipeline: the workflows behind the command line.

* :mod:`.run` — the run skeleton every pipeline shares: ``train`` (claim and lock the run
  directory, prepare, train with the shared loop, write the final weights and samples),
  ``load_run`` and ``write_samples``.
* :mod:`.evaluation` — the evaluation protocol over any pipeline (``evaluate``,
  ``noise_floors``) and its typed records.
* :mod:`.export` — a finished run for use outside sparsediff (``export_run``: diffusers
  folders, model cards) and ``condense_run`` (dead channels out, a smaller network).
"""

from sparsediff.workflows.evaluation import evaluate, noise_floors
from sparsediff.workflows.run import load_run, train, write_samples

__all__ = ["evaluate", "load_run", "noise_floors", "train", "write_samples"]
