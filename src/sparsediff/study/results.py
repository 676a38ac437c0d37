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


def append_result(path: Path, record: dict) -> None:
    """Append one line and make it durable before the next cell starts.

    An append, not an atomic rewrite: earlier lines are never touched, and a torn last line is
    repaired (a newline is added first) and skipped by ``read_results``.
    """
    line = json.dumps(jsonable(record), allow_nan=False)
    with path.open("ab") as f:
        if f.tell() > 0:
            with path.open("rb") as r:  # a crash may have left a line without its newline
                r.seek(-1, os.SEEK_END)
                if r.read(1) != b"\n":
                    f.write(b"\n")
        f.write(line.encode() + b"\n")
        f.flush()
        os.fsync(f.fileno())
