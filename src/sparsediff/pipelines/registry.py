"""The pipelines by name: the one place that maps ``config.pipeline`` to a class, and so the
place that builds a run's config (each pipeline's ``config_class`` holds its sections)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sparsediff.config import (
    ConfigSource,
    RunConfig,
    absolute_paths,
    build_config,
    parse_override,
    read_source,
)
from sparsediff.pipelines.base import FamilyConfig, Pipeline
from sparsediff.pipelines.chirodiff import ChiroDiff
from sparsediff.pipelines.dit import LatentDiT
from sparsediff.pipelines.ldm import LatentDiffusion

PIPELINES: dict[str, type[Pipeline]] = {
    LatentDiffusion.name: LatentDiffusion,
    ChiroDiff.name: ChiroDiff,
    LatentDiT.name: LatentDiT,
}


def get_pipeline(name: str) -> type[Pipeline]:
    """The pipeline class registered as ``name``."""
    try:
        return PIPELINES[name]
    except (KeyError, TypeError):
        raise ValueError(f"pipeline = {name!r}; registered: {', '.join(PIPELINES)}") from None


def load_config(
    preset: str | Path | dict[str, Any] | None = None,
    overrides: dict[str, Any] | list[str] | None = None,
    paths_from_cwd: bool = False,
) -> FamilyConfig:
    """A run's config: its pipeline's defaults, then a preset (name, TOML path, a run's
    ``config.json`` or a dict), then overrides (dotted keys, or ``key=value`` texts).

    ``paths_from_cwd``: relative paths among the overrides are relative to the working
    directory (what a user typed), not to the run directory (what a preset says).
    """
    source = read_source(preset)
    if isinstance(overrides, list):
        overrides = dict(parse_override(o) for o in overrides)
    overrides = dict(overrides or {})
    config_class = _config_class(source, overrides)
    if paths_from_cwd:
        overrides = absolute_paths(overrides, config_class)
    return build_config(config_class, source, overrides)


def _config_class(source: ConfigSource, overrides: dict[str, Any]) -> type[FamilyConfig]:
    name = overrides.get("pipeline", source.table.get("pipeline", RunConfig.pipeline))
    return get_pipeline(name).config_class


def absolute_overrides(
    preset: str | Path | dict[str, Any] | None, overrides: dict[str, Any]
) -> dict[str, Any]:
    """``overrides`` with their relative paths made absolute against the working directory
    (paths typed by a user, e.g. in a study file), for the preset's pipeline."""
    return absolute_paths(overrides, _config_class(read_source(preset), dict(overrides)))


def read_run_config(run_dir: str | Path) -> FamilyConfig:
    """The resolved config a run wrote to its directory."""
    return load_config(Path(run_dir) / "config.json")
