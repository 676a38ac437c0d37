"""A condensed model on disk: ``condensed.json`` (format, plan, what was measured) and
``condensed.safetensors`` (the condensed state dict)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from sparsediff.io import read_json, write_json
from sparsediff.weights import load_weights, save_weights

from .plan import apply_plan

FORMAT = "sparsediff.condensed/2"
PLAN_FILE = "condensed.json"
WEIGHTS_FILE = "condensed.safetensors"
CONDENSED_ENTRIES = (PLAN_FILE, WEIGHTS_FILE)


def save_condensed(
    model: nn.Module, plan: dict[str, dict[str, Any]], directory: str | Path, **info: Any
) -> Path:
    """Write ``condensed.json`` (format, plan, ``info``) and ``condensed.safetensors``."""
    directory = Path(directory)
    save_weights(model, directory / WEIGHTS_FILE)
    write_json(directory / PLAN_FILE, {"format": FORMAT, **info, "plan": plan})
    return directory


def read_condensed_info(directory: str | Path) -> dict[str, Any] | None:
    """The ``condensed.json`` record of ``directory``, or None if it holds no condensed model."""
    path = Path(directory) / PLAN_FILE
    if not path.exists():
        return None
    info = read_json(path)
    if str(info.get("format", "")).startswith("sparsediff.condensed/") and info["format"] != FORMAT:
        raise ValueError(f"{path}: {info['format']} is an older layout; condense the run again")
    if info.get("format") != FORMAT:
        raise ValueError(f"{path}: not a condensed model ({FORMAT})")
    return info


def load_condensed(plain: nn.Module, directory: str | Path) -> nn.Module:
    """Rebuild the condensed network from a plain model of the same config and load it."""
    info = read_condensed_info(directory)
    if info is None:
        raise FileNotFoundError(f"{Path(directory) / PLAN_FILE} is missing")
    model = apply_plan(plain, info["plan"])
    model.load_state_dict(load_weights(Path(directory) / WEIGHTS_FILE))
    return model
