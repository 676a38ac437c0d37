"""Run configuration: what every run shares, and the machinery that builds a family's config.

A run is described by a config dataclass: :class:`RunConfig` holds what every run shares (its
pipeline, name, seed, the sparse engine's :class:`~sparsediff.sparsity.SparseSettings` and the
training loop), and each pipeline extends it with the sections it owns (data, model, schedule,
sampling, evaluation; see ``Pipeline.config_class``). :func:`build_config` fills one from a TOML
preset (``sparsediff/configs/``, see :func:`list_presets`), a run's ``config.json`` or a dict,
plus dotted ``key=value`` overrides (``--set sparse.sparsity=0.75``), and checks every value by
the rules its owner wrote beside it. The resolved config is written to ``config.json`` in every
run directory, so a run can always be rebuilt from its directory alone.

This module knows no pipeline, model, dataset or sampler: the pipelines layer picks the config
class (``sparsediff.pipelines.load_config``).
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, ClassVar

from sparsediff.io import read_json
from sparsediff.sections import FRACTION, POSITIVE, Section, at_least
from sparsediff.sparsity.settings import SparseSettings

PRECISIONS = ("fp32", "bf16", "fp16")  # owned here: training imports config, not the reverse
CONDENSED = ("auto", "on", "off")
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # runs/<name>: never a path
_DEVICE = (
    (lambda v: re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", v) is not None),
    "must be auto, cpu, mps, cuda or cuda:N",
)

# Presets and study files ship inside the package, so a wheel, an editable install and a
# checkout all find them here.
CONFIG_DIR = Path(__file__).resolve().parent / "configs"
STUDY_DIR = CONFIG_DIR / "studies"


@dataclass
class TrainConfig(Section):
    """The shared training loop."""

    _RULES: ClassVar[dict[str, Any]] = {
        "steps": at_least(1),
        "batch_size": at_least(1),
        "base_lr": POSITIVE,
        "lr": at_least(0),
        "weight_decay": at_least(0),
        "grad_accum": at_least(1),
        "grad_clip": at_least(0),
        "precision": PRECISIONS,
        "ema_decay": FRACTION,
        "checkpoint_every": at_least(0),
        "sample_every": at_least(0),
        "log_every": at_least(1),
        "num_workers": at_least(0),
        "device": _DEVICE,
        "threads": at_least(0),
        "stop_at": at_least(0),
        "condensed": CONDENSED,
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
    # train the condensed network between mask updates (sparsediff.training.condensed): auto =
    # where the granularity leaves whole rows dead and one process trains; on = or an error
    condensed: str = "auto"


@dataclass
class RunConfig:
    """What every run shares; a pipeline's config class adds the sections it owns."""

    pipeline: str = "ldm"
    name: str = ""
    seed: int = 0
    sparse: SparseSettings = field(default_factory=SparseSettings)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready nested dict."""
        return asdict(self)

    @classmethod
    def path_keys(cls) -> tuple[str, ...]:
        """The dotted keys that hold paths (``Section._PATHS`` of every section)."""
        out = []
        for f in fields(cls):
            default = f.default_factory() if callable(f.default_factory) else f.default
            out += [f"{f.name}.{key}" for key in getattr(default, "_PATHS", ())]
        return tuple(out)


def absolute_paths(overrides: dict[str, Any], config_class: type[RunConfig]) -> dict[str, Any]:
    """``overrides`` with the relative paths among the config's path keys made absolute
    against the working directory: what a user types means what it says where it was typed."""
    out = dict(overrides)
    for key in config_class.path_keys():
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


def _with(obj: Any, key: str, value: Any, where: str, section: str = "") -> Any:
    """A copy of the dataclass ``obj`` with the dotted ``key`` set, checking name and type
    (sections may be frozen, like the engine's ``SparseSettings``: nothing is set in place)."""
    head, _, rest = key.partition(".")
    names = {f.name: f for f in fields(obj)}
    if head not in names:
        full = section + key
        raise ValueError(f"{where}: unknown config key {full!r}; known: {sorted(names)}")
    current = getattr(obj, head)
    inner = f"{section}{head}."
    if rest:
        if not dataclasses.is_dataclass(current):
            raise ValueError(f"{where}: {section + head!r} is not a section")
        new = _with(current, rest, value, where, inner)
    elif dataclasses.is_dataclass(current):
        if not isinstance(value, dict):
            raise ValueError(f"{where}: section {head!r} needs a table")
        new = current
        for k, v in value.items():
            new = _with(new, k, v, where, inner)
    else:
        new = _coerce(value, current, f"{where}: {section}{key}")
    return replace(obj, **{head: new})


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


def _known_only(table: dict[str, Any], config_class: type[RunConfig]) -> dict[str, Any]:
    """The keys of ``table`` that ``config_class`` has: a run's record written by an older
    version may hold sections of other pipelines (one schema used to serve them all)."""
    flat = flatten(table)
    known = set(flatten(config_class().to_dict()))
    return {k: v for k, v in flat.items() if k in known}


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


def read_toml(path: Path) -> dict[str, Any]:
    """A TOML file's table; one that is not UTF-8 or not TOML is a ValueError naming it."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{path}: not valid TOML: {err}") from None


def _summaries(directory: Path) -> dict[str, str]:
    """``{name: first comment line}`` of the TOML files in ``directory``, sorted by name."""
    out = {}
    for path in sorted(directory.glob("*.toml"), key=lambda p: p.stem):
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


@dataclass(frozen=True)
class ConfigSource:
    """A config's starting table: from a preset file, a run's record or a dict."""

    table: dict[str, Any]
    where: str
    name: str = ""  # a preset's stem names the run unless the table says otherwise
    record: bool = False  # a run's config.json: keys of other pipelines are dropped


def read_source(preset: str | Path | dict[str, Any] | None) -> ConfigSource:
    """The table of a preset name or TOML path, a run's ``config.json``, a dict, or None."""
    if preset is None:
        return ConfigSource({}, "config")
    if isinstance(preset, dict):
        return ConfigSource(preset, "config")
    if str(preset).endswith(".json"):  # a run's config.json
        record = read_json(preset)
        table = record.get("config", record) if isinstance(record, dict) else None
        if not isinstance(table, dict) or not table:
            raise ValueError(f"{preset}: not a run config (a JSON object of config sections)")
        return ConfigSource(table, str(preset), record=True)
    path = preset_path(preset)
    table = read_toml(path)
    if not table:
        raise ValueError(f"{path}: holds no settings (a preset sets at least 'pipeline')")
    return ConfigSource(table, str(path), name=path.stem)


def build_config(
    config_class: type[RunConfig], source: ConfigSource, overrides: dict[str, Any]
) -> RunConfig:
    """``config_class``'s defaults, then the source's table, then ``overrides``; every value
    resolved and checked (:func:`validate`)."""
    cfg = config_class(name=source.name)
    table = _known_only(source.table, config_class) if source.record else source.table
    for key, value in table.items():
        cfg = _with(cfg, key, value, source.where)
    for key, value in overrides.items():
        cfg = _with(cfg, key, value, "override")
    cfg = replace(cfg, **{f.name: _resolved(getattr(cfg, f.name)) for f in fields(cfg)})
    validate(cfg)
    return replace(cfg, sparse=cfg.sparse.resolved())  # as it runs: dense has sparsity 0


def _resolved(value: Any) -> Any:
    return value.resolved() if isinstance(value, Section) else value


def validate(cfg: RunConfig) -> None:
    """Reject values no run could use, before anything is built.

    Each section checks its own values by the rules written beside its fields (choice lists
    come from the packages that own them); sparse settings by the engine's own rules. The
    pipeline name is checked by the registry.
    """
    if cfg.seed < 0:
        raise ValueError(f"seed = {cfg.seed}; must be >= 0")
    if cfg.name and not RUN_NAME.fullmatch(cfg.name):
        raise ValueError(
            f"name = {cfg.name!r}: a run's name is a plain folder name (letters, digits, '.', "
            "'_', '-'); say where a run goes with --run-dir"
        )
    cfg.sparse.check("sparse.")  # the engine's own rules
    for f in fields(cfg):
        section = getattr(cfg, f.name)
        if isinstance(section, Section):
            section.check(f.name)
