"""What sparsediff may delete or write over: only what it wrote, never the folder it reads.

A folder of ours is known by what it holds. A *run* directory holds a ``config.json`` run record
(``{"config": ..., "environment": ...}``), written before anything else, and only the entries a
run writes (:data:`RUN_ENTRIES`, plus each pipeline's own). An *export* and a *condensed* model
hold a marker file naming the entries they were written with. ``--overwrite`` removes those
entries and nothing else: a folder that holds anything more is refused with a one-line error
naming the folder and what is foreign, and nothing is deleted.

No command writes into, or removes, the run it reads from or a folder above it
(:func:`check_apart`, on resolved paths, so links and ``..`` cannot hide it).
"""

from __future__ import annotations

import fnmatch
import json
import shutil
from collections.abc import Iterable
from pathlib import Path

from sparsediff.io import write_json
from sparsediff.locks import LOCK_FILE

SAMPLE_ENTRIES = ("samples-seed*-n*.png", "samples-seed*-n*-svg")  # sample's default --out
# Top-level entries of a run directory, as fnmatch patterns: those every run writes (the loop,
# the run skeleton, sample, evaluate, noise floors), plus those of each pipeline
# (Pipeline.run_entries). tests/test_folders.py checks finished runs hold nothing else.
RUN_ENTRIES = (
    "config.json",
    "metrics.jsonl",
    "checkpoint.pt",
    "model.safetensors",
    "model.compact.safetensors",
    "samples",  # grids during training
    "samples.png",
    "samples-svg",
    "done.json",
    "tensorboard",
    "eval",
    "eval-*.json",
    "eval-grid.png",
    "floors.json",
    *SAMPLE_ENTRIES,
    ".*.tmp",  # atomic writes a kill interrupted
    ".*.partial",
    ".*.lock",  # a first stage's or a latent cache's, when they live in the run
    LOCK_FILE,
)
MARKER = ".sparsediff.json"  # an export's or a condensed model's: {"kind", "entries"}


def entries(folder: Path) -> list[str]:
    """The names in ``folder`` (none when it does not exist)."""
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def matches(name: str, patterns: Iterable[str]) -> bool:
    """Whether ``name`` matches one of the fnmatch ``patterns`` (case-sensitive)."""
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def foreign(folder: Path, patterns: Iterable[str]) -> list[str]:
    """The entries of ``folder`` that match none of ``patterns``."""
    patterns = (*patterns, LOCK_FILE)  # a lock is ours wherever it is
    return [n for n in entries(folder) if not matches(n, patterns)]


def is_run(folder: str | Path) -> bool:
    """Whether ``folder`` holds a run: a ``config.json`` that is a run record."""
    path = Path(folder) / "config.json"
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and isinstance(record.get("config"), dict)


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:5])
    return shown + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def check_only_ours(folder: Path, patterns: Iterable[str], doing: str) -> None:
    """Refuse ``doing`` (e.g. "--overwrite") when ``folder`` holds anything ``patterns`` miss."""
    other = foreign(folder, patterns)
    if other:
        raise ValueError(
            f"{folder} holds files sparsediff did not write ({_listing(other)}): refusing "
            f"{doing}; move them away, or choose another folder"
        )


def clear(folder: Path, patterns: Iterable[str], doing: str = "to delete it") -> None:
    """Delete the entries of ``folder`` that ``patterns`` name (keeping its lock), after
    checking it holds nothing else."""
    patterns = tuple(patterns)
    check_only_ours(folder, patterns, doing)
    for name in entries(folder):
        if name == LOCK_FILE:
            continue
        path = folder / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def write_marker(folder: Path, kind: str) -> None:
    """Record that ``folder`` is a ``kind`` written by sparsediff, and what it holds now."""
    names = [n for n in entries(folder) if n not in (MARKER, LOCK_FILE)]
    write_json(folder / MARKER, {"kind": kind, "entries": names})


def marked_entries(folder: Path, kind: str) -> list[str] | None:
    """The entries a ``kind`` folder's marker lists, None when it has no such marker."""
    try:
        marker = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("kind") != kind:
        return None
    return [str(n) for n in marker.get("entries", [])] + [MARKER]


def prepare_out(
    out: Path, kind: str, overwrite: bool, extra: Iterable[str] = ()
) -> tuple[str, ...]:
    """Check the output folder of an export or a condense before any work is done; returns
    the patterns :func:`clear` may then delete.

    Empty or missing: fine. Otherwise only with ``overwrite``, and only when it is a ``kind``
    sparsediff wrote (its marker) holding nothing but the marker's entries and ``extra``
    (files later commands add, e.g. evaluation records).
    """
    if not entries(out):
        return ()
    if not overwrite:
        raise FileExistsError(f"{out} is not empty: pass --overwrite to replace it")
    listed = marked_entries(out, kind)
    if listed is None:
        raise ValueError(
            f"{out} is not a {kind} written by sparsediff (no {MARKER}): refusing to replace "
            "it; choose another folder"
        )
    patterns = (*listed, *extra)
    check_only_ours(out, patterns, "to replace it")
    return patterns


def check_apart(out: str | Path, source: str | Path, option: str = "--out") -> None:
    """Refuse an ``out`` that is the ``source`` run, lies inside it, or holds it."""
    out_path, src = Path(out).resolve(), Path(source).resolve()
    if out_path == src or src.is_relative_to(out_path):
        raise ValueError(
            f"{option} {out} holds the run it reads ({source}): choose a folder outside it"
        )
    if out_path.is_relative_to(src):
        raise ValueError(f"{option} {out} lies inside the run it reads ({source}): choose another")
