"""Where a command runs: its device, its CPU threads, the memory it may take, and how it was
called."""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path

import torch


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto`` -> CUDA when available, else the CPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(device)


def default_threads() -> int:
    """Half the cores, at most 8: the default does not collapse when a neighbour is busy
    (torch's own, one thread per core, does: docs/guarantees.md, "Threads")."""
    return max(1, min(8, (os.cpu_count() or 2) // 2))


def set_threads(threads: int = 0) -> None:
    """torch's CPU threads: ``threads``, or :func:`default_threads` for 0."""
    torch.set_num_threads(threads or default_threads())


def available_memory() -> int:
    """Bytes of memory a new allocation can have (Linux's MemAvailable; else all of it)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def command_line() -> str:
    """This process's command as a user would type it: ``sparsediff ...`` for the command line
    however it was started (the script, ``python -m sparsediff.cli``)."""
    program = Path(sys.argv[0]).name
    if program in ("cli.py", "__main__.py") and "sparsediff" in sys.argv[0]:
        program = "sparsediff"
    return shlex.join([program, *sys.argv[1:]])
