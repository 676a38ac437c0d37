"""Atomic file writes: the one way every file of a run, a cache or a study is written.

A file is written to a temporary name in the same directory, flushed to disk and renamed over
the target, so a crash or a kill never leaves a truncated file under the real name: readers see
the old file or the new one, nothing in between.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """Call ``write(tmp_path)`` and rename the finished file to ``path``; returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb+") as f:  # the bytes reach the disk before the name does
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, Exception) and _disk_full(path.parent, err):
            raise OSError(
                f"no space left on the device holding {path.parent} (writing {path.name}): "
                "free some space, then run again (a run resumes with --resume)"
            ) from None
        raise
    return path


def _disk_full(folder: Path, err: Exception) -> bool:
    """Whether a failed write ran out of disk: ENOSPC, or an error of a library that hides it
    (torch.save says "enforce fail at inline_container.cc") with the disk nearly full."""
    if getattr(err, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
        return True
    try:
        return shutil.disk_usage(folder).free < 1 << 20
    except OSError:
        return False


def write_text(path: str | Path, text: str) -> Path:
    """Atomically write UTF-8 text."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: str | Path, data: Any, indent: int | None = 2) -> Path:
    """Atomically write ``data`` as JSON (non-JSON values as text), ending with a newline."""
    return write_text(path, json.dumps(data, indent=indent, default=str) + "\n")


def read_json(path: str | Path) -> Any:
    """Read a JSON file; a malformed one is a ValueError naming it."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
