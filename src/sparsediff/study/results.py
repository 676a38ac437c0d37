"""A study's results file: one strict-JSON line per finished cell, appended as cells finish.

``results.jsonl`` is appended to (one fsync'd line per cell), not rewritten: a crash can at most
cut the last line short, and ``read_results`` ignores such a line, so that cell simply runs again.
See ``sparsediff.study.sweep`` for the fields of a line.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from sparsediff.locks import wait_for

RESULTS_FILE = "results.jsonl"
STUDY_FILE = "study.json"


def jsonable(x: Any) -> Any:
    """Make ``x`` strict JSON: scalars from numpy/torch, paths as text, NaN/inf as None."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if x is None or isinstance(x, (str, int, bool)):
        return x
    if isinstance(x, Path):
        return str(x)
    if hasattr(x, "tolist"):  # numpy / torch scalars and arrays
        return jsonable(x.tolist())
    return str(x)


def read_results(path: str | Path) -> list[dict]:
    """The records of a results.jsonl; a line cut short by a crash is ignored."""
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a write interrupted mid-line; that cell simply runs again
        if isinstance(record, dict) and "id" in record:
            records.append(record)
    return records


def append_result(path: Path, record: dict) -> bool:
    """Append one line and make it durable before the next cell starts; returns False (and
    writes nothing) when the file has a line with this id already.

    An append, not an atomic rewrite: earlier lines are never touched, and a torn last line is
    repaired (a newline is added first) and skipped by ``read_results``. Study processes
    working side by side append under a lock, so lines stay whole and ids unique.
    """
    line = json.dumps(jsonable(record), allow_nan=False)
    with wait_for(path.with_name(f".{path.name}.lock"), str(path), quiet=True):
        if any(r["id"] == record["id"] for r in read_results(path)):
            return False
        _append_line(path, line)
    return True


def _append_line(path: Path, line: str) -> None:
    with path.open("ab") as f:
        if f.tell() > 0:
            with path.open("rb") as r:  # a crash may have left a line without its newline
                r.seek(-1, os.SEEK_END)
                if r.read(1) != b"\n":
                    f.write(b"\n")
        f.write(line.encode() + b"\n")
        f.flush()
        os.fsync(f.fileno())
