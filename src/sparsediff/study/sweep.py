"""Run a study: train and evaluate every cell of the grid, resumably.

Layout of a study directory::

    study.json       the resolved grid (study settings, every cell and its overrides, the command)
    results.jsonl    one JSON line per finished cell, appended by the parent process only
    runs/<cell id>/  each cell's run directory (checkpoint, done.json, samples, ...)

A results line holds ``id, dataset, preset, pipeline, method, sparsity, prune_ratio`` (null for
dense/static), ``seed, overrides`` (what train_fn got), ``metrics, cost, protocol`` (from
evaluate_fn), ``samples_grid`` and ``run_dir`` (relative to the study directory when inside it),
``steps`` (the optimizer steps the run trained, from its ``done.json``), ``train_seconds`` and
``eval_seconds`` (wall time of this attempt; a resumed run counts only the
part after the resume), ``resumed`` (the run directory existed before this attempt), ``device``
(the worker's device, null when run in-process) and ``finished_at`` (UTC, ISO 8601). Non-finite
numbers are written as null, so every line is strict JSON.

The cells of one dataset may share work under ``shared/<dataset>/``: each pipeline says what
(``Pipeline.study_overrides``; Latent Diffusion shares one dense, frozen first stage and latent
cache, since the comparison is about the denoiser). With several devices, a dataset whose shared
work does not exist yet runs one cell at a time.

Noise floors: once a dataset has a finished cell, its floors (real vs real, and the first
stage's reconstructions vs real where there is one; see
``sparsediff.workflows.evaluation.noise_floors``) are measured by that cell's protocol and
recorded as one more line, ``{"id": "<dataset>/floors", "kind": "floors", "dataset", "floors",
"protocol", "run_dir", "seconds", "finished_at"}``; the report shows them beside the models.

Resuming: a cell (or a floors line) with a results line is skipped. Otherwise it is trained with
``resume=True`` when its run directory already exists (a checkpoint is resumed, a done.json skips
training) and then evaluated. A failing cell does not stop the others; ``run_study`` raises at
the end, and running it again retries only what is missing.
"""

from __future__ import annotations

import fnmatch
import json
import multiprocessing
import os
import sys
import time
import traceback
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tqdm import tqdm

from sparsediff.io import read_json, write_text
from sparsediff.locks import LockedError, wait_for
from sparsediff.pipelines import absolute_overrides, get_pipeline, load_config
from sparsediff.runtime import command_line
from sparsediff.study.grid import Cell, Study, expand_grid, load_study
from sparsediff.study.results import RESULTS_FILE, STUDY_FILE, append_result, jsonable, read_results
from sparsediff.workflows import evaluate, noise_floors, train
from sparsediff.workflows.run import DONE_FILE, is_started

TrainFn = Callable[[str, dict, Path, bool], Any]
EvaluateFn = Callable[[Path, int | None, int], dict]
FloorsFn = Callable[[Path], dict]

_DEVICE: str | None = None  # the device a pool worker claimed


class StudyError(RuntimeError):
    """Some cells failed; the others finished and were recorded."""

    def __init__(self, failed: dict[str, str]) -> None:
        self.failed = failed
        names = ", ".join(failed)
        super().__init__(f"{len(failed)} cell(s) failed: {names}; run the study again to retry")


def default_train(preset: str, overrides: dict, run_dir: Path, resume: bool) -> None:
    """Train one cell with the pipelines' run skeleton (resuming what a kill left)."""
    train(load_config(preset, overrides), run_dir, resume=resume and is_started(run_dir))


def default_evaluate(run_dir: Path, num_samples: int | None, seed: int) -> dict:
    """Evaluate one cell with the pipelines' evaluation protocol; its record for the line."""
    return evaluate(run_dir, num_samples, seed=seed).to_dict()


def default_floors(run_dir: Path) -> dict:
    """The noise floors by the protocol of a finished run."""
    return noise_floors(run_dir)


def floors_id(dataset: str) -> str:
    """The results-line id of a dataset's noise floors."""
    return f"{dataset}/floors"


def record_floors(
    study_dir: Path,
    cells: list[Cell],
    finished: set[str],
    floors_fn: FloorsFn,
    failed: dict[str, str],
) -> None:
    """Measure and append the floors of every dataset of ``cells`` that has a finished cell here
    (its run directory on this machine) but no floors line yet, with that cell's run. A failure
    goes into ``failed`` under the floors id and is not retried in this call. Study processes
    side by side take turns (a lock), so each dataset's floors are measured once."""
    for cell in cells:
        key = floors_id(cell.dataset)
        run_dir = study_dir / "runs" / cell.id
        if key in finished or key in failed or cell.id not in finished:
            continue
        if not (run_dir / DONE_FILE).exists():  # finished elsewhere: the results line only
            continue
        lock = study_dir / f".floors-{_slug(cell.dataset)}.lock"
        with wait_for(lock, f"the noise floors of {cell.dataset}"):
            finished |= {r["id"] for r in read_results(study_dir / RESULTS_FILE)}
            # measured meanwhile by a process beside this one: nothing to do
            if key not in finished and _measure_floors(study_dir, cell, run_dir, floors_fn, failed):
                finished.add(key)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _measure_floors(
    study_dir: Path, cell: Cell, run_dir: Path, floors_fn: FloorsFn, failed: dict[str, str]
) -> bool:
    """Measure one dataset's floors with ``run_dir`` and append their line; False on failure."""
    key = floors_id(cell.dataset)
    start = time.perf_counter()
    try:
        floors = floors_fn(run_dir)
    except Exception as exc:
        _failed(study_dir, key, exc, failed, f"noise floors of {cell.dataset}")
        return False
    record = {
        "id": key,
        "kind": "floors",
        "dataset": cell.dataset,
        "floors": floors.get("floors", {}),
        "protocol": floors.get("protocol", {}),
        "warnings": floors.get("warnings", []),
        "run_dir": _relative(run_dir, study_dir),
        "seconds": time.perf_counter() - start,
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    for warning in record["warnings"]:
        tqdm.write(f"{cell.dataset}: {warning}", file=sys.stderr)
    append_result(study_dir / RESULTS_FILE, jsonable(record))
    return True


def _failed(study_dir: Path, key: str, error: BaseException, failed: dict, what: str) -> None:
    """Say in one line that ``what`` failed; its traceback goes to ``failed/<key>.txt``."""
    failed[key] = "".join(traceback.format_exception(error))
    log = write_text(study_dir / "failed" / f"{key}.txt", failed[key])
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    tqdm.write(f"{what} failed: {text} (traceback: {log})", file=sys.stderr)


def visible_devices(device: str) -> str:
    """CUDA_VISIBLE_DEVICES for a device name: ``cuda:1`` -> ``1``, ``cpu`` -> ``""``."""
    if device == "cpu":
        return ""
    if device == "cuda":
        return "0"
    return device.removeprefix("cuda:")


def _claim_device(queue: Any) -> None:
    """Pool initializer: take one device for the worker's lifetime, before CUDA starts."""
    global _DEVICE
    _DEVICE = queue.get()
    os.environ["CUDA_VISIBLE_DEVICES"] = visible_devices(_DEVICE)


def _relative(path: str | Path | None, base: Path) -> str | None:
    if path is None:
        return None
    resolved = Path(path).resolve()
    try:
        return str(resolved.relative_to(base.resolve()))
    except ValueError:
        return str(resolved)


def run_cell(
    cell: Cell,
    study_dir: Path,
    num_samples: int | None,
    eval_seed: int,
    train_fn: TrainFn,
    evaluate_fn: EvaluateFn,
) -> dict:
    """Train (or resume) and evaluate one cell; return its results record."""
    run_dir = study_dir / "runs" / cell.id
    resumed = run_dir.exists()
    start = time.perf_counter()
    if not (run_dir / DONE_FILE).exists():
        run_dir.mkdir(parents=True, exist_ok=True)
        train_fn(cell.preset, dict(cell.overrides), run_dir, resumed)
        if not (run_dir / DONE_FILE).exists():  # e.g. train.stop_at: a partial run is no result
            raise RuntimeError(f"training returned without {run_dir / DONE_FILE}; rerun to resume")
    train_seconds = time.perf_counter() - start
    start = time.perf_counter()
    evaluation = evaluate_fn(run_dir, num_samples, eval_seed)
    eval_seconds = time.perf_counter() - start
    done = read_json(run_dir / DONE_FILE)
    record = {
        **cell.to_dict(),
        "steps": done.get("step") if isinstance(done, dict) else None,
        "metrics": evaluation.get("metrics", {}),
        "cost": evaluation.get("cost", {}),
        "protocol": evaluation.get("protocol", {}),
        "samples_grid": _relative(evaluation.get("samples_grid"), study_dir),
        "train_seconds": train_seconds,
        "eval_seconds": eval_seconds,
        "run_dir": _relative(run_dir, study_dir),
        "resumed": resumed,
        "device": _DEVICE,
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    for key, value in evaluation.items():  # keep whatever else the evaluation reported
        record.setdefault(key, value)
    return jsonable(record)


def share_work(cells: list[Cell], study_dir: Path) -> tuple[list[Cell], set[str]]:
    """Build every cell's config up front, so a typo fails now and not hours in, and add the
    overrides each pipeline asks for to share work among one dataset's cells.

    Returns the cells and the datasets whose cells share something under ``shared/<dataset>/``.
    """
    out, sharing = [], set()
    for cell in cells:
        # shared places relative to the cell's run directory, so the study folder can be moved
        shared = Path(
            os.path.relpath(study_dir / "shared" / cell.dataset, study_dir / "runs" / cell.id)
        )
        try:
            # paths as typed in the study file: relative to the working directory
            overrides = absolute_overrides(cell.preset, cell.overrides)
            cfg = load_config(cell.preset, overrides)
            extra = get_pipeline(cfg.pipeline).study_overrides(cfg, shared)
        except ValueError as exc:
            raise ValueError(f"cell {cell.id}: {exc}") from exc
        if extra:
            sharing.add(cell.dataset)
        # the pipeline that will run, whatever the study file said
        out.append(replace(cell, pipeline=cfg.pipeline, overrides={**overrides, **extra}))
    return out, sharing


def _command() -> str:
    return command_line()


def write_study_json(study: Study, cells: list[Cell], study_dir: Path, devices: list[str]) -> Path:
    """Record the resolved grid, and how it was launched, next to the results."""
    path = study_dir / STUDY_FILE
    data = {
        "name": study.name,
        "command": _command(),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "devices": devices,
        "study": study.to_dict(),
        "cells": [{**c.to_dict(), "run_dir": f"runs/{c.id}"} for c in cells],
    }
    return write_text(path, json.dumps(jsonable(data), indent=2) + "\n")


def run_study(
    study_toml: Path,
    out_dir: Path | None = None,
    devices: list[str] | None = None,
    train_fn: TrainFn | None = None,
    evaluate_fn: EvaluateFn | None = None,
    progress: bool = True,
    floors_fn: FloorsFn | None = None,
    only: list[str] | None = None,
) -> Path:
    """Train and evaluate every unfinished cell of a study; return the study directory.

    With ``devices`` (e.g. ``["cuda:0", "cuda:1"]``) cells run in that many worker processes,
    one per device (CUDA_VISIBLE_DEVICES set per worker); ``train_fn``/``evaluate_fn`` must then
    be picklable (module-level functions). Without, cells run one after another in-process.
    ``floors_fn`` measures a dataset's noise floors from a finished run; unset, ``noise_floors``
    with the default evaluation and none with a custom ``evaluate_fn``. ``only``: glob patterns
    of cell ids; the other cells are left alone (a study run in parts, e.g. one process per
    seed: the results file takes one line per cell from each).
    """
    study = load_study(study_toml)
    study_dir = Path(out_dir) if out_dir is not None else study.default_out_dir()
    cells, sharing = share_work(expand_grid(study), study_dir)
    train_fn = train_fn or default_train
    if floors_fn is None and evaluate_fn is None:
        floors_fn = default_floors
    evaluate_fn = evaluate_fn or default_evaluate
    study_dir.mkdir(parents=True, exist_ok=True)
    write_study_json(study, cells, study_dir, list(devices or []))
    results_path = study_dir / RESULTS_FILE
    finished = {r["id"] for r in read_results(results_path)}
    selected = [c for c in cells if not only or any(fnmatch.fnmatchcase(c.id, p) for p in only)]
    if not selected:
        raise ValueError(f"no cell id matches {only}; ids look like {cells[0].id}")
    pending = [c for c in selected if c.id not in finished]
    args = (study_dir, study.eval_num_samples, study.eval_seed, train_fn, evaluate_fn)
    failed: dict[str, str] = {}
    bar = tqdm(
        total=len(selected),
        initial=len(selected) - len(pending),
        unit="cell",
        desc=study.name,
        disable=not progress,
        dynamic_ncols=True,
    )

    def finish(cell: Cell, record: dict | None, error: BaseException | None) -> None:
        if error is None:
            append_result(results_path, record)  # False: another process recorded it first
            finished.add(cell.id)
        elif isinstance(error, LockedError):  # the other study process has this cell
            tqdm.write(f"cell {cell.id} is running in another process: {error}", file=sys.stderr)
        else:  # keep going: one broken cell must not cost the rest of a long sweep
            _failed(study_dir, cell.id, error, failed, f"cell {cell.id}")
        bar.update(1)

    with bar:
        if not devices:
            for cell in pending:
                if cell.id in {r["id"] for r in read_results(results_path)}:
                    bar.update(1)  # finished meanwhile by a study process beside this one
                    continue
                bar.set_description_str(cell.id)
                finish(cell, *_attempt(cell, args))
                if floors_fn:  # early: they frame every later result
                    bar.set_description_str(f"{cell.dataset} noise floors")
                    record_floors(study_dir, [cell], finished, floors_fn, failed)
        else:
            done_datasets = {c.dataset for c in cells if c.id in finished}
            cold = sharing - done_datasets
            _run_pool(pending, args, devices, cold, bar, finish)
    if floors_fn:  # in-process runs measured them as they went; after a pool or a resume: now
        record_floors(study_dir, selected, finished, floors_fn, failed)
    if failed:
        raise StudyError(failed)
    return study_dir


def _attempt(cell: Cell, args: tuple) -> tuple[dict | None, Exception | None]:
    """Run one cell here: its record, or the error that stopped it."""
    try:
        return run_cell(cell, *args), None
    except Exception as exc:
        return None, exc


def _run_pool(
    pending: list[Cell],
    args: tuple,
    devices: list[str],
    cold: set[str],
    bar: tqdm,
    finish: Callable[[Cell, dict | None, BaseException | None], None],
) -> None:
    """One worker per device; at most one cell in flight per worker, so the bar shows them.

    ``cold`` datasets have no shared work yet: one cell at a time until one finishes.
    """
    ctx = multiprocessing.get_context("spawn")  # fork is unsafe once torch/CUDA is loaded
    queue = ctx.Queue()
    for device in devices:
        queue.put(device)
    todo = list(pending)
    running: dict[Any, Cell] = {}
    with ProcessPoolExecutor(
        len(devices), mp_context=ctx, initializer=_claim_device, initargs=(queue,)
    ) as pool:
        while todo or running:
            for cell in list(todo):
                busy = {c.dataset for c in running.values()}
                if len(running) < len(devices) and cell.dataset not in cold & busy:
                    todo.remove(cell)
                    running[pool.submit(run_cell, cell, *args)] = cell
            bar.set_description_str(", ".join(c.id for c in running.values()))
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                cell = running.pop(future)
                error = future.exception()
                if error is None:
                    cold.discard(cell.dataset)
                finish(cell, None if error else future.result(), error)
