"""Study files: a TOML description of a grid of runs, expanded into cells.

A study crosses datasets x methods x sparsity levels x prune ratios x seeds. Format::

    name = "quick"                    # default: the file's stem
    description = "..."               # optional, shown in the report
    out_dir = "studies/quick"         # default: studies/<name>, relative to the working directory
    methods = ["dense", "static", "rigl", "magran"]   # default: all four
    sparsities = [0.25, 0.5]          # fractions in (0, 1); dense ignores them
    prune_ratios = [0.05, 0.5]        # p in (0, 1]; only rigl and magran use them
    seeds = [0, 1, 2]                 # default: [0]

    [overrides]                       # dotted run-config keys applied to every cell
    "train.steps" = 2000

    [eval]                            # passed to evaluate_fn
    num_samples = 1000                # default: the run config's eval.num_samples
    seed = 0                          # sampling seed of the evaluation (default 0)

    [[datasets]]                      # one table per dataset, at least one
    name = "fashion-mnist"            # used in cell ids and run directories
    preset = "ldm-fashion-mnist"      # configs/<preset>.toml, or a path to a TOML preset
    pipeline = "ldm"                  # optional: read from the preset
    overrides = { "train.steps" = 300 }   # this dataset only; wins over [overrides]

    [[extra_cells]]                   # settings outside the cross product, per dataset x seed
    variant = "small-dense"           # its row in the report and its cell ids (default: method)
    method = "dense"
    sparsity = 0.5                    # sparse methods only
    prune_ratio = 0.5                 # rigl/magran only
    overrides = { "sparse.granularity" = "channel" }       # every dataset
    dataset_overrides = { fashion-mnist = { "model.channels" = [24, 24] } }
    datasets = ["fashion-mnist"]      # optional: only these datasets (e.g. a UNet-only setting)

Cells: dense gives one cell per dataset x seed (sparsity 0), static one per sparsity x seed,
rigl and magran one per sparsity x prune ratio x seed; then each extra cell once per dataset x
seed (e.g. p = 0.5 only at 90%, a small-dense baseline, channel granularity). A cell's overrides
are the study's, then the dataset's, then an extra cell's own, then the grid keys
``sparse.method``, ``sparse.sparsity``, ``sparse.prune_ratio`` (rigl/magran only) and ``seed``,
which the override tables must not set. Unquoted dotted keys
(``train.steps = 3``) are nested tables in TOML; they are flattened back to dotted keys.

Cell ids are stable, e.g. ``fashion-mnist/rigl-s0.50-p0.05-seed0``, ``fashion-mnist/dense-seed0``,
``kanjivg/small-dense-seed1``; a cell's run directory is ``<out_dir>/runs/<id>``.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sparsediff.config import flatten
from sparsediff.pipelines import load_config
from sparsediff.sparsity import METHODS

DYNAMIC = tuple(n for n, m in METHODS.items() if m.updates_masks)  # those with a ratio p
GRID_KEYS = ("sparse.method", "sparse.sparsity", "sparse.prune_ratio", "seed")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_TOP_KEYS = {
    "name",
    "description",
    "out_dir",
    "methods",
    "sparsities",
    "prune_ratios",
    "seeds",
    "overrides",
    "eval",
    "datasets",
    "extra_cells",
}
_EXTRA_KEYS = {
    "variant",
    "method",
    "sparsity",
    "prune_ratio",
    "overrides",
    "dataset_overrides",
    "datasets",
}


@dataclass(frozen=True)
class DatasetSpec:
    """One ``[[datasets]]`` entry of a study."""

    name: str
    preset: str
    pipeline: str
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ExtraCell:
    """One ``[[extra_cells]]`` entry: a setting outside the cross product."""

    variant: str
    method: str
    sparsity: float = 0.0
    prune_ratio: float | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    dataset_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    datasets: tuple[str, ...] = ()  # only these datasets (empty: every dataset)


@dataclass(frozen=True)
class Cell:
    """One run of the grid: what to train and with which overrides."""

    id: str
    dataset: str
    preset: str
    pipeline: str
    method: str
    sparsity: float
    prune_ratio: float | None
    seed: int
    overrides: dict[str, Any]
    variant: str = ""  # the report row when not the method's own (e.g. small-dense)

    @property
    def row(self) -> str:
        """The variant, else the method."""
        return self.variant or self.method

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


@dataclass
class Study:
    """A parsed study file."""

    name: str
    datasets: list[DatasetSpec]
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    sparsities: list[float] = field(default_factory=list)
    prune_ratios: list[float] = field(default_factory=list)
    seeds: list[int] = field(default_factory=lambda: [0])
    overrides: dict[str, Any] = field(default_factory=dict)
    extra_cells: list[ExtraCell] = field(default_factory=list)
    eval_num_samples: int | None = None
    eval_seed: int = 0
    out_dir: str | None = None
    description: str = ""
    source: str = ""

    def default_out_dir(self) -> Path:
        """Where results go unless the caller says otherwise."""
        return Path(self.out_dir) if self.out_dir else Path("studies") / self.name

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return asdict(self)


def fmt_value(x: float) -> str:
    """Two decimals (``0.50``), or more when two would merge distinct values (``0.005``)."""
    text = f"{x:.2f}"
    return text if float(text) == x else f"{x:.6g}"


def cell_id(
    dataset: str, method: str, sparsity: float, prune_ratio: float | None, seed: int
) -> str:
    """The stable id of a cell, e.g. ``kanjivg/rigl-s0.50-p0.05-seed0``; ``method`` may be a
    variant's name (``small-dense``)."""
    parts = [method]
    if sparsity > 0:
        parts.append(f"s{fmt_value(sparsity)}")
    if prune_ratio is not None:
        parts.append(f"p{fmt_value(prune_ratio)}")
    parts.append(f"seed{seed}")
    return f"{dataset}/{'-'.join(parts)}"


def preset_pipeline(preset: str) -> str:
    """The pipeline a preset (name or TOML path) runs."""
    return load_config(preset).pipeline


def _numbers(raw: dict[str, Any], key: str, default: list, kind: type, where: str) -> list:
    values = raw.get(key, default)
    if not isinstance(values, list):
        raise ValueError(f"{where}: {key} must be a list, got {values!r}")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"{where}: {key} holds {v!r}, not a number")
        if kind is int and not isinstance(v, int):
            raise ValueError(f"{where}: {key} holds {v!r}, not an integer")
        out.append(kind(v))
    if len(set(out)) != len(out):
        raise ValueError(f"{where}: {key} has duplicates: {values!r}")
    return out


def _overrides(raw: Any, where: str) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ValueError(f"{where} must be a table, got {raw!r}")
    flat = flatten(raw)
    clash = sorted(set(flat) & set(GRID_KEYS))
    if clash:
        raise ValueError(f"{where} sets {clash}, which the grid controls; use the grid lists")
    return flat


def parse_study(raw: dict[str, Any], name: str = "study", source: str = "") -> Study:
    """Validate a study table (a parsed TOML file) and build a Study."""
    where = source or "study"
    unknown = sorted(set(raw) - _TOP_KEYS)
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; known: {sorted(_TOP_KEYS)}")
    methods = raw.get("methods", list(METHODS))
    bad = [m for m in methods if m not in METHODS] if isinstance(methods, list) else [methods]
    if bad or not methods or len(set(methods)) != len(methods):
        names = ", ".join(METHODS)
        raise ValueError(f"{where}: methods must be distinct names from {names}, got {methods!r}")
    sparsities = _numbers(raw, "sparsities", [], float, where)
    prune_ratios = _numbers(raw, "prune_ratios", [], float, where)
    seeds = _numbers(raw, "seeds", [0], int, where)
    if any(not 0 < s < 1 for s in sparsities):
        raise ValueError(f"{where}: sparsities must lie in (0, 1), got {sparsities}")
    if any(not 0 < p <= 1 for p in prune_ratios):
        raise ValueError(f"{where}: prune_ratios must lie in (0, 1], got {prune_ratios}")
    if not seeds:
        raise ValueError(f"{where}: seeds is empty")
    if any(m != "dense" for m in methods) and not sparsities:
        raise ValueError(f"{where}: sparse methods {methods} need a sparsities list")
    if any(m in DYNAMIC for m in methods) and not prune_ratios:
        raise ValueError(f"{where}: rigl/magran need a prune_ratios list")

    datasets = raw.get("datasets")
    if not isinstance(datasets, list) or not datasets:
        raise ValueError(f"{where}: needs at least one [[datasets]] table")
    specs = []
    for i, d in enumerate(datasets):
        dwhere = f"{where}: datasets[{i}]"
        extra = sorted(set(d) - {"name", "preset", "pipeline", "overrides"})
        if extra:
            raise ValueError(f"{dwhere}: unknown keys {extra}")
        if not isinstance(d.get("preset"), str):
            raise ValueError(f"{dwhere}: needs a preset name")
        dname = d.get("name", Path(d["preset"]).stem)
        if not isinstance(dname, str) or not _NAME.match(dname):
            raise ValueError(f"{dwhere}: name {dname!r} must be letters, digits, '_', '.', '-'")
        pipeline = d.get("pipeline") or preset_pipeline(d["preset"])
        specs.append(
            DatasetSpec(dname, d["preset"], pipeline, _overrides(d.get("overrides"), dwhere))
        )
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"{where}: dataset names must be distinct, got {names}")

    extras = _extra_cells(raw.get("extra_cells", []), names, where)
    ev = raw.get("eval", {})
    extra = sorted(set(ev) - {"num_samples", "seed"})
    if extra:
        raise ValueError(f"{where}: unknown [eval] keys {extra}")
    num_samples, eval_seed = ev.get("num_samples"), ev.get("seed", 0)
    for key, v in (("num_samples", num_samples), ("seed", eval_seed)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
            raise ValueError(f"{where}: [eval] {key} must be an integer, got {v!r}")
    study_name = raw.get("name", name)
    if not isinstance(study_name, str) or not _NAME.match(study_name):
        raise ValueError(f"{where}: name {study_name!r} must be letters, digits, '_', '.', '-'")
    return Study(
        name=study_name,
        datasets=specs,
        methods=list(methods),
        sparsities=sparsities,
        prune_ratios=prune_ratios,
        seeds=seeds,
        overrides=_overrides(raw.get("overrides"), f"{where}: [overrides]"),
        extra_cells=extras,
        eval_num_samples=num_samples,
        eval_seed=eval_seed,
        out_dir=raw.get("out_dir"),
        description=str(raw.get("description", "")),
        source=source,
    )


def _extra_cells(raw: Any, datasets: list[str], where: str) -> list[ExtraCell]:
    if not isinstance(raw, list):
        raise ValueError(f"{where}: extra_cells must be an array of tables ([[extra_cells]])")
    out = []
    for i, e in enumerate(raw):
        ewhere = f"{where}: extra_cells[{i}]"
        if not isinstance(e, dict):
            raise ValueError(f"{ewhere} must be a table")
        unknown = sorted(set(e) - _EXTRA_KEYS)
        if unknown:
            raise ValueError(f"{ewhere}: unknown keys {unknown}; known: {sorted(_EXTRA_KEYS)}")
        method = e.get("method")
        if method not in METHODS:
            raise ValueError(
                f"{ewhere}: method must be one of {', '.join(METHODS)}, got {method!r}"
            )
        variant = e.get("variant", method)
        if not isinstance(variant, str) or not _NAME.match(variant):
            raise ValueError(
                f"{ewhere}: variant {variant!r} must be letters, digits, '_', '.', '-'"
            )
        if variant in METHODS and variant != method:  # its rows would merge with that method's
            raise ValueError(f"{ewhere}: variant {variant!r} is another method's name")
        sparsity, p = e.get("sparsity", 0.0), e.get("prune_ratio")
        if method == "dense" and sparsity:
            raise ValueError(f"{ewhere}: dense takes no sparsity")
        if method != "dense" and not (isinstance(sparsity, (int, float)) and 0 < sparsity < 1):
            raise ValueError(f"{ewhere}: {method} needs a sparsity in (0, 1), got {sparsity!r}")
        if (p is not None) != (method in DYNAMIC):
            raise ValueError(f"{ewhere}: prune_ratio is for {'/'.join(DYNAMIC)} only, and needed")
        if p is not None and not (isinstance(p, (int, float)) and 0 < p <= 1):
            raise ValueError(f"{ewhere}: prune_ratio must lie in (0, 1], got {p!r}")
        per_dataset = e.get("dataset_overrides", {})
        if not isinstance(per_dataset, dict) or set(per_dataset) - set(datasets):
            raise ValueError(f"{ewhere}: dataset_overrides must be keyed by datasets {datasets}")
        only = e.get("datasets", [])
        if not isinstance(only, list) or not only and "datasets" in e or set(only) - set(datasets):
            raise ValueError(f"{ewhere}: datasets must be a non-empty list of {datasets}")
        out.append(
            ExtraCell(
                variant=variant,
                method=method,
                sparsity=float(sparsity),
                prune_ratio=None if p is None else float(p),
                overrides=_overrides(e.get("overrides"), ewhere),
                dataset_overrides={
                    ds: _overrides(o, f"{ewhere}: dataset_overrides.{ds}")
                    for ds, o in per_dataset.items()
                },
                datasets=tuple(only),
            )
        )
    return out


def load_study(path: str | Path) -> Study:
    """Read and validate a study TOML file."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{path}: not valid TOML: {err}") from None
    return parse_study(raw, name=path.stem, source=str(path))


def _settings(study: Study, method: str) -> list[tuple[float, float | None]]:
    """(sparsity, prune_ratio) pairs a method runs at."""
    if method == "dense":
        return [(0.0, None)]
    if method == "static":
        return [(s, None) for s in study.sparsities]
    return [(s, p) for s in study.sparsities for p in study.prune_ratios]


def expand_grid(study: Study) -> list[Cell]:
    """All cells of a study, dataset by dataset: the cross product (method, sparsity, p, seed),
    then the extra cells (each by seed)."""
    cells = []
    for ds in study.datasets:
        settings = [
            (ExtraCell(method, method, sparsity, p), "")
            for method in study.methods
            for sparsity, p in _settings(study, method)
        ]
        settings += [
            (extra, extra.variant)
            for extra in study.extra_cells
            if not extra.datasets or ds.name in extra.datasets
        ]
        for setting, variant in settings:
            for seed in study.seeds:
                grid: dict[str, Any] = {
                    "sparse.method": setting.method,
                    "sparse.sparsity": setting.sparsity,
                }
                if setting.prune_ratio is not None:
                    grid["sparse.prune_ratio"] = setting.prune_ratio
                grid["seed"] = seed
                own = {**setting.overrides, **setting.dataset_overrides.get(ds.name, {})}
                name = variant or setting.method
                cells.append(
                    Cell(
                        id=cell_id(ds.name, name, setting.sparsity, setting.prune_ratio, seed),
                        dataset=ds.name,
                        preset=ds.preset,
                        pipeline=ds.pipeline,
                        method=setting.method,
                        sparsity=setting.sparsity,
                        prune_ratio=setting.prune_ratio,
                        seed=seed,
                        overrides={**study.overrides, **ds.overrides, **own, **grid},
                        variant=variant,
                    )
                )
    ids = [c.id for c in cells]
    if len(set(ids)) != len(ids):
        raise ValueError("two cells share an id; are two values equal at two decimals?")
    return cells
