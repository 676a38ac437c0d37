"""TensorBoard event files beside ``metrics.jsonl`` (optional: needs the ``tensorboard`` package).

Each training stage writes ``RUN_DIR/tensorboard/<stage>/`` (``train`` for the denoiser,
``autoencoder`` for LDM's first stage), which TensorBoard shows as one run per stage; an
evaluation adds its metrics to ``train`` at the run's final step. See docs/tensorboard.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

TENSORBOARD_DIR = "tensorboard"


def available() -> bool:
    """Whether ``torch.utils.tensorboard`` imports (the ``tensorboard`` package is installed)."""
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


def stage_dir(run_dir: str | Path, stage: str = "train") -> Path:
    """The event folder of one training stage of a run."""
    return Path(run_dir) / TENSORBOARD_DIR / stage


class EventLog:
    """One stage's SummaryWriter, opened on first use; does nothing without ``log_dir``.

    ``log_dir=None`` (off, not rank 0, or tensorboard not installed) turns every call into a
    no-op. Each record is flushed at once, like a ``metrics.jsonl`` line.
    """

    def __init__(self, log_dir: str | Path | None) -> None:
        self.log_dir = Path(log_dir) if log_dir is not None and available() else None
        self._writer: Any = None

    def _open(self, purge_step: int | None = None) -> Any:
        if self._writer is None and self.log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.log_dir), purge_step=purge_step)
        return self._writer

    def resume_at(self, step: int) -> None:
        """Hide the events of steps after ``step``: a resumed run trains them again.

        A new events file starts with a purge marker at ``step + 1``; TensorBoard's reader then
        drops every earlier event from that step on.
        """
        self.close()
        if self._open(purge_step=step + 1) is not None:
            self._writer.flush()

    def scalars(self, step: int, values: dict[str, Any], prefix: str = "") -> None:
        """Log the numbers among ``values`` (None and other types are skipped)."""
        writer = self._open()
        if writer is None:
            return
        for key, value in values.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                writer.add_scalar(prefix + key, value, step)
        writer.flush()

    def image(self, tag: str, path: Path, step: int) -> None:
        """Log a PNG (a sample grid) as an image."""
        writer = self._open()
        if writer is None:
            return
        with Image.open(path) as picture:
            pixels = np.asarray(picture.convert("RGB"))
        writer.add_image(tag, pixels, step, dataformats="HWC")
        writer.flush()

    def close(self) -> None:
        """Flush and close the events file (a later record opens a new one)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def log_scalars(log_dir: str | Path, step: int, values: dict[str, Any], prefix: str = "") -> None:
    """Append one record to ``log_dir`` (e.g. evaluation metrics); no-op without tensorboard."""
    events = EventLog(log_dir)
    events.scalars(step, values, prefix)
    events.close()
