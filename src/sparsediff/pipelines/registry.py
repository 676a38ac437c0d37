"""The pipelines by name: the one place that maps ``config.pipeline`` to a class."""

from __future__ import annotations

from sparsediff.pipelines.base import Pipeline
from sparsediff.pipelines.chirodiff import ChiroDiff
from sparsediff.pipelines.ldm import LatentDiffusion

PIPELINES: dict[str, type[Pipeline]] = {
    LatentDiffusion.name: LatentDiffusion,
    ChiroDiff.name: ChiroDiff,
}


def get_pipeline(name: str) -> type[Pipeline]:
    """The pipeline class registered as ``name``."""
    try:
        return PIPELINES[name]
    except KeyError:
        raise ValueError(f"pipeline = {name!r}; registered: {', '.join(PIPELINES)}") from None
