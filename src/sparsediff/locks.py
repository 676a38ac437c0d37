"""Advisory file locks: one writer per run directory, one builder per shared first stage.

A lock is ``fcntl.flock`` on a small file. The kernel drops it when its process ends, however it
ends, so a kill never leaves a stale lock behind. An exclusive holder writes who it is (pid,
host, command, start time) into the lock file, so that a refused process can say who holds it.

* :func:`hold` fails at once when another process holds the lock (a second ``train`` into one
  run directory), with a one-line :class:`LockedError` naming the folder and the holder.
* :func:`wait_for` waits, saying once on stderr what it waits for (a shared first stage that
  another study process is building).

Shared locks (``shared=True``) are for readers that also add files (``evaluate``, ``sample``):
any number at once, never beside an exclusive holder.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shlex
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

LOCK_FILE = ".lock"  # inside a run directory


class LockedError(ValueError):
    """Another process holds the lock (a ValueError: the CLI prints it as one line)."""


def _holder(lock_path: Path) -> str:
    """Who holds ``lock_path``, as written by the holder; readers write nothing."""
    try:
        info = json.loads(lock_path.read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        info = {}
    if not isinstance(info, dict) or "pid" not in info:
        return "another sparsediff process (reading it: sample, evaluate, export or condense)"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("since", 0)))
    return (
        f"pid {info['pid']} on {info.get('host', '?')} ({info.get('command', '?')}, since {since})"
    )


def _open(lock_path: Path, shared: bool) -> int | None:
    if shared and not lock_path.parent.is_dir():  # nothing there to read: the reader says so
        return None
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        return os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):  # a folder we may only read
            return None
        raise


def _write_holder(fd: int) -> None:
    command = shlex.join([os.path.basename(sys.argv[0]), *sys.argv[1:]])
    info = {"pid": os.getpid(), "host": socket.gethostname(), "command": command}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({**info, "since": time.time()}).encode(), 0)


@contextmanager
def _locked(
    lock_path: Path, what: str, shared: bool, wait: bool, quiet: bool = False
) -> Iterator[None]:
    fd = _open(lock_path, shared)
    if fd is None:  # a folder we may not write to: only readers get here, and need no lock
        if not shared:
            raise PermissionError(f"{lock_path.parent}: not writable")
        yield
        return
    mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
    try:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(lock_path)
            if not wait:
                raise LockedError(
                    f"{what} is in use by {holder}; wait for it to finish, or use another folder"
                ) from None
            if not quiet:
                print(f"sparsediff: waiting for {what}, in use by {holder}", file=sys.stderr)
            fcntl.flock(fd, mode)
        if not shared:
            _write_holder(fd)
        try:
            yield
        finally:
            if not shared:
                os.ftruncate(fd, 0)  # a later reader must not name a holder that is gone
    finally:
        os.close(fd)  # releases the lock


def hold(folder: str | Path, shared: bool = False) -> AbstractContextManager[None]:
    """Lock the folder ``folder`` (its ``.lock`` file), failing at once when it is in use."""
    folder = Path(folder)
    return _locked(folder / LOCK_FILE, str(folder), shared, wait=False)


def wait_for(lock_path: str | Path, what: str, quiet: bool = False) -> AbstractContextManager[None]:
    """Lock ``lock_path`` exclusively, waiting for another holder to finish (saying so on
    stderr unless ``quiet``: for locks held only a moment)."""
    return _locked(Path(lock_path), what, shared=False, wait=True, quiet=quiet)
