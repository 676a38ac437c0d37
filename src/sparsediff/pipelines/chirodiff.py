"""ChiroDiff with a sparse denoiser: diffusion over pen-point sequences (Das et al., ICLR 2023).

The sequences (velocity or absolute, 3 channels) are diffused directly; the bi-GRU denoiser is
trained with the shared loop and the sparse engine attached to its GRU and Linear weights. At
sampling time sequence lengths are drawn from the training set's length distribution and the
pen channel is thresholded when decoding to strokes.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from sparsediff.config import ConfigSource, build_config
from sparsediff.data.raster import rasterize, save_svg
from sparsediff.data.sketch_ops import REPRESENTATIONS, sequences_to_sketches
from sparsediff.data.stroke_dataset import (
    StrokeSequenceDataset,
    collate_sequences,
    load_stroke_dataset,
)
from sparsediff.diffusion.losses import epsilon_mse
from sparsediff.diffusion.samplers import SampleConfig, SamplingSettings
from sparsediff.imaging import save_image_grid
from sparsediff.io import read_json, write_json
from sparsediff.models.chirodiff import ARCHS, build_chirodiff_denoiser, masked_mse
from sparsediff.pipelines.base import FamilyConfig, Pipeline
from sparsediff.sections import POSITIVE, Section, at_least
from sparsediff.training.distributed import Dist
from sparsediff.training.loop import Task
from sparsediff.weights import load_weights, save_weights

LENGTHS_FILE = "lengths.json"  # the training set's sequence lengths, drawn from when sampling
EXPORT_WEIGHTS, EXPORT_CONFIG, EXPORT_FORMAT = (
    "model.safetensors",
    "config.json",
    "sparsediff-chirodiff",
)
EXPORT_SECTIONS = ("model", "data", "diffusion", "sample")  # enough to rebuild and sample
Sketch = list[np.ndarray]


def sequence_loss(
    net: nn.Module, batch: dict[str, torch.Tensor], scheduler: Any, gen: torch.Generator
) -> torch.Tensor:
    """ChiroDiff's objective: ε-MSE masked to valid points, normalised by length."""
    lengths = batch["lengths"]
    return epsilon_mse(
        lambda x, t: net(x, t, lengths),
        batch["x"],
        scheduler,
        generator=gen,
        reduce_fn=lambda pred, target: masked_mse(pred, target, lengths),
    )


@dataclass
class SketchData(Section):
    """A ChiroDiff run's ``data`` section: the stroke dataset and how sketches are prepared."""

    _RULES: ClassVar[dict[str, Any]] = {
        "max_train": at_least(0),
        "representation": REPRESENTATIONS,
        "max_len": at_least(2),
        "extent": POSITIVE,
        "resample_step": at_least(0),
        "rdp_epsilon": at_least(0),
        "raster_size": at_least(8),
        "raster_line_width": POSITIVE,
        "split_fractions": (
            (lambda v: len(v) == 3 and min(v) >= 0 and sum(v) > 0),
            "must be three fractions >= 0 (train, valid, test) with a positive sum",
        ),
    }
    _PATHS: ClassVar[tuple[str, ...]] = ("path",)

    name: str = "kanjivg"  # kanjivg | stroke3 | ndjson | vmnist
    path: str = ""  # local dataset path; "" = the built-in default location
    max_train: int = 0  # 0 = all
    split_seed: int = 0
    representation: str = "velocity"  # velocity | absolute
    max_len: int = 300  # sketches with more points are dropped
    extent: float = 10.0  # sketches are scaled so the larger bounding-box side is this long
    resample_step: float = 0.5  # arc-length resampling step, in the same units as extent
    rdp_epsilon: float = 0.0  # 0 = no Ramer-Douglas-Peucker simplification
    category: str = ""  # QuickDraw category (ndjson with several words)
    # kanjivg/ndjson: the seeded train/valid/test split (stroke3/vmnist keep the file's own)
    split_fractions: list[float] = field(default_factory=lambda: [0.8, 0.1, 0.1])
    raster_size: int = 64  # sketch rendering for sample grids and sketch FID
    raster_line_width: float = 2.0


@dataclass
class SequenceModel(Section):
    """A ChiroDiff run's ``model`` section: the sequence denoiser."""

    _RULES: ClassVar[dict[str, Any]] = {
        "arch": tuple(ARCHS),
        "hidden": at_least(1),
        "layers": at_least(1),
        "time_dim": at_least(1),
        "heads": at_least(1),
    }

    arch: str = "birnn"  # birnn | transformer
    hidden: int = 96
    layers: int = 3
    time_dim: int = 8
    heads: int = 4  # transformer only


@dataclass
class SketchSample(SampleConfig):
    """Sampling sketches: a point lifts the pen when its pen channel exceeds the threshold."""

    pen_threshold: float = 0.8


@dataclass
class ChiroDiffConfig(FamilyConfig):
    """A ChiroDiff run: pen-stroke sequences and a sequence denoiser."""

    data: SketchData = field(default_factory=SketchData)
    model: SequenceModel = field(default_factory=SequenceModel)
    sample: SketchSample = field(default_factory=SketchSample)


def _is_length(n: Any) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n > 0


class ChiroDiff(Pipeline):
    """ChiroDiff (Das et al., ICLR 2023): a bi-GRU denoiser over pen-stroke sequences.

    ``chirodiff-kanjivg`` / ``chirodiff-quickdraw`` / ``chirodiff-vmnist`` reproduce the study's
    setting (velocity representation, linear β scaled by 1000/T, 416,859-parameter bi-GRU).
    """

    name = "chirodiff"
    config_class = ChiroDiffConfig
    run_entries = (LENGTHS_FILE,)

    def __init__(self, cfg: ChiroDiffConfig, run_dir: str | Path) -> None:
        super().__init__(cfg, run_dir)
        self.data: StrokeSequenceDataset | None = None
        self.lengths: np.ndarray | None = None

    def stroke_dataset(self, split: str = "train") -> StrokeSequenceDataset:
        """The configured stroke dataset (KanjiVG from the installed package by default)."""
        d = self.cfg.data
        path = self.local_path(d.path)
        return load_stroke_dataset(
            d.name,
            str(path) if path else None,
            split,
            representation=d.representation,
            category=d.category or None,
            limit=d.max_train or None,
            seed=d.split_seed,
            rdp_epsilon=d.rdp_epsilon or None,
            max_len=d.max_len,
            step=d.resample_step or None,
            extent=d.extent,
            split_fractions=tuple(d.split_fractions),
        )

    # ------------------------------------------------------------------ training
    def prepare(self, dist: Dist, resume: bool) -> None:
        """Load the sketches; record their lengths for sampling."""
        self.data = self.stroke_dataset()
        self.lengths = self.data.lengths
        if self.data.report.skipped and dist.is_main:  # e.g. sketches longer than data.max_len
            tqdm.write(f"{self.cfg.data.name} training data: {self.data.report}", file=sys.stderr)
        if dist.is_main:
            write_json(self.run_dir / LENGTHS_FILE, self.lengths.tolist(), indent=None)

    def summary(self) -> dict[str, Any]:
        """How many sketches were trained on."""
        return {"train_sketches": len(self.data), "skipped": dict(self.data.report.skipped)}

    def build_denoiser(self) -> nn.Module:
        """The configured sequence denoiser (bi-GRU by default)."""
        m = self.cfg.model
        kwargs: dict[str, Any] = {
            "representation": self.cfg.data.representation,
            "time_dim": m.time_dim,
            "num_timesteps": self.cfg.diffusion.timesteps,
        }
        if m.arch == "birnn":
            kwargs.update(hidden=m.hidden, layers=m.layers)
        else:
            kwargs.update(width=m.hidden, layers=m.layers, heads=m.heads)
        return build_chirodiff_denoiser(m.arch, **kwargs)

    def task(self) -> Task:
        """The sketches and :func:`sequence_loss`."""
        model, scheduler = self.build_denoiser(), self.scheduler()

        def loss(net: nn.Module, batch: dict[str, torch.Tensor], gen: torch.Generator) -> Any:
            return sequence_loss(net, batch, scheduler, gen)

        return Task(model, self.data, loss, collate=collate_sequences)

    # ------------------------------------------------------------------ a finished run
    def load(self, device: torch.device) -> None:
        """The training set's length distribution."""
        path = self.run_dir / LENGTHS_FILE
        lengths = read_json(path)
        if not (isinstance(lengths, list) and lengths and all(_is_length(n) for n in lengths)):
            raise ValueError(f"{path}: not a list of sequence lengths (positive integers)")
        self.lengths = np.array(lengths, dtype=np.int64)

    @torch.no_grad()
    def generate(
        self,
        denoiser: nn.Module,
        seeds: list[int],
        settings: SamplingSettings,
        progress: bool = False,
    ) -> list[Sketch]:
        """Sketches whose lengths are drawn from the training distribution, one per seed."""
        device = next(denoiser.parameters()).device
        lens = np.array([np.random.default_rng(s).choice(self.lengths) for s in seeds])
        lens = torch.as_tensor(lens, device=device)
        shape = (len(seeds), int(lens.max()), 3)
        longest = (int(self.lengths.max()), 3)  # noise drawn at this length: batch-independent
        x = self.run_chain(
            lambda x, t: denoiser(x, t, lens), shape, device, seeds, settings, progress, longest
        )
        d, s = self.cfg.data, self.cfg.sample
        return sequences_to_sketches(x, lens, d.representation, s.pen_threshold)

    def to_images(self, samples: list[Sketch]) -> torch.Tensor:
        """Rasterise with the one shared rasteriser: uint8 (N, 1, S, S)."""
        d = self.cfg.data
        images = [rasterize(s, d.raster_size, d.raster_line_width) for s in samples]
        return torch.from_numpy(np.stack(images))[:, None]

    def save_samples(self, samples: list[Sketch], path: Path) -> Path:
        """A PNG grid (mid-grey gaps keep empty cells visible) and one SVG per sketch."""
        save_image_grid(self.to_images(samples), path, fill=128)
        svg_dir = path.with_name(path.stem + "-svg")
        svg_dir.mkdir(parents=True, exist_ok=True)
        for i, sketch in enumerate(samples):
            save_svg(sketch, svg_dir / f"{i:04d}.svg")
        return path

    # ------------------------------------------------------------------ evaluation
    def reference(
        self, split: str, size: int, offset: int = 0
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """Real sketches of ``split``, rendered like the samples."""
        data = self.stroke_dataset(split)
        sketches = [data.strokes(i) for i in range(offset, min(offset + size, len(data)))]
        if not sketches:
            raise ValueError(f"the {split} split has no sketches from item {offset} on")
        d = self.cfg.data
        keys = ("path", "category", "split_seed", "split_fractions", "extent", "resample_step")
        keys += ("max_len", "max_train")
        identity = {"dataset": d.name, **{k: getattr(d, k) for k in keys}}
        identity["raster"] = f"{d.raster_size}px-lw{d.raster_line_width}"
        return self.to_images(sketches), identity

    def flop_inputs(self, device: torch.device) -> tuple[Any, ...]:
        """One sequence of the mean training length."""
        length = max(1, int(round(float(np.mean(self.lengths)))))
        x = torch.zeros(1, length, 3, device=device)
        t = torch.zeros(1, dtype=torch.long, device=device)
        return x, t, torch.tensor([length], device=device)

    # ------------------------------------------------------------------ export
    def export(self, denoiser: nn.Module, out: Path) -> str:
        """Weights, and the config sections and training lengths that rebuild and sample them."""
        save_weights(denoiser, out / EXPORT_WEIGHTS)
        config = self.cfg.to_dict()
        record = {
            "format": EXPORT_FORMAT,
            "version": 1,
            "pipeline": self.name,
            "config": {section: config[section] for section in EXPORT_SECTIONS},
            "lengths": [int(n) for n in self.lengths],
        }
        write_json(out / EXPORT_CONFIG, record, indent=None)
        return EXPORT_WEIGHTS

    def export_card(self, folder: str) -> dict[str, Any]:
        """Rebuilt from the folder alone."""
        usage = (
            "from sparsediff.pipelines.chirodiff import ChiroDiff\n\n"
            f'pipeline, denoiser = ChiroDiff.from_export("{folder}")\n'
            "settings = pipeline.sampling(pipeline.cfg.sample)\n"
            "sketches = pipeline.generate(denoiser, [0, 1, 2, 3], settings)\n"
        )
        card = {"tags": ["chirodiff", "sketch-generation"]}
        return {"title": "ChiroDiff", "card": card, "usage": usage, "notes": []}

    @classmethod
    def from_export(
        cls, folder: str | Path, device: str | torch.device = "cpu"
    ) -> tuple[ChiroDiff, nn.Module]:
        """The pipeline (ready to ``generate``) and denoiser of an exported folder."""
        folder = Path(folder)
        record = read_json(folder / EXPORT_CONFIG)
        if record.get("format") != EXPORT_FORMAT:
            raise ValueError(f"{folder / EXPORT_CONFIG} is not an exported ChiroDiff config")
        source = ConfigSource(record["config"], str(folder / EXPORT_CONFIG), record=True)
        pipeline = cls(build_config(ChiroDiffConfig, source, {"pipeline": cls.name}), folder)
        pipeline.lengths = np.asarray(record["lengths"], dtype=np.int64)  # what load() reads
        denoiser = pipeline.build_denoiser()
        denoiser.load_state_dict(load_weights(folder / EXPORT_WEIGHTS))
        return pipeline, denoiser.to(device).eval()


def load_exported_chirodiff(
    out_dir: str | Path, device: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """The plain denoiser of an exported ChiroDiff folder, and what sampling needs.

    ``info``: ``config`` (the run's config), ``lengths``, ``pipeline`` (a ChiroDiff ready to
    ``generate``) and ``sampling`` (the run's sample settings).
    """
    pipeline, denoiser = ChiroDiff.from_export(out_dir, device)
    info = {
        "config": pipeline.cfg,
        "lengths": pipeline.lengths,
        "pipeline": pipeline,
        "sampling": pipeline.sampling(pipeline.cfg.sample),
    }
    return denoiser, info
