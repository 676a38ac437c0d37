"""Export a finished run for use outside sparsediff: diffusers folders, model cards.

* Latent Diffusion → a diffusers ``LDMPipeline`` folder (``save_pretrained`` layout: ``unet/``,
  ``vqvae/``, ``scheduler/``, ``model_index.json``) that plain
  ``diffusers.DiffusionPipeline.from_pretrained`` loads. Its images equal sparsediff's for the
  same sample seeds (:func:`~sparsediff.pipelines.base.sample_seeds`), bit for bit on the CPU:
  at η = 0 with one ``torch.Generator().manual_seed(s)`` per image, at any η one image per call
  after ``torch.manual_seed(s)`` with no generator (``LDMPipeline`` draws its DDIM noise from
  the global generator). See ``docs/export.md``.
* ChiroDiff → ``model.safetensors`` + ``config.json`` (the config sections that rebuild the
  network, and the training lengths that sampling draws from); :func:`load_exported_chirodiff`
  (``ChiroDiff.from_export``) rebuilds it from the folder alone.

What a pipeline exports is its own ``Pipeline.export``; this module adds what every export has:
the atomic folder, the model card and the optional compact weights.

Both get a ``README.md`` model card and, with ``compact=True``, ``model.compact.safetensors``
(:mod:`sparsediff.weights`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparsediff.folders import RUN_ENTRIES, check_apart, clear, prepare_out, write_marker
from sparsediff.io import read_json, write_text
from sparsediff.locks import hold
from sparsediff.models.condense import condense, read_condensed_info, save_condensed
from sparsediff.pipelines import Pipeline, read_run_config
from sparsediff.sparsity.flops import count_parameters, inference_flops
from sparsediff.weights import compact_size_report, parse_dtype, save_compact
from sparsediff.workflows.run import COMPACT_WEIGHTS_FILE, CONFIG_FILE, DONE_FILE, load_run

CARD_FILE = "README.md"


def export_run(
    run_dir: str | Path,
    out_dir: str | Path,
    compact: bool = False,
    value_dtype: str | torch.dtype | None = None,
    overwrite: bool = False,
) -> Path:
    """Export a finished run to ``out_dir``; returns ``out_dir``.

    ``compact`` adds ``model.compact.safetensors`` (the denoiser in the compact sparse format),
    with its non-zero values cast to ``value_dtype`` (fp16/bf16: lossy) when given. The folder
    is assembled under a temporary name and renamed into place, so it is complete or absent.
    An existing non-empty ``out_dir`` is replaced only with ``overwrite``, and only when it is
    an export holding nothing but what the export wrote (``sparsediff.folders``).
    """
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    value_dtype = parse_dtype(value_dtype)
    if value_dtype is not None and not compact:
        raise ValueError("value_dtype applies to the compact weights: pass compact=True")
    if not (run_dir / DONE_FILE).exists():
        raise FileNotFoundError(f"{run_dir} is not a finished run (no {DONE_FILE})")
    check_apart(out_dir, run_dir)
    replaced = prepare_out(out_dir, "export", overwrite)
    with hold(run_dir, shared=True):
        pipeline, denoiser = load_run(run_dir, "cpu")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".tmp"))
    tmp.chmod(0o755)  # mkdtemp's 0700 would make a folder meant for sharing private
    try:
        dense_file = pipeline.export(denoiser, tmp)
        sizes = None
        if compact:
            save_compact(denoiser.state_dict(), tmp / COMPACT_WEIGHTS_FILE, value_dtype)
            sizes = compact_size_report(tmp / COMPACT_WEIGHTS_FILE, tmp / dense_file)
        card = model_card(pipeline, denoiser, out_dir.name, sizes)
        write_text(tmp / CARD_FILE, card)
        write_marker(tmp, "export")
        if replaced:
            clear(out_dir, replaced, "to replace it")
        os.replace(tmp, out_dir)  # also replaces an empty directory
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def condense_run(run_dir: str | Path, out: str | Path, overwrite: bool = False) -> dict[str, Any]:
    """Condense a finished channel-sparse run into ``out`` (docs/speedups.md).

    ``out`` then works like a run directory for ``sample`` and ``evaluate`` (it points back at
    the run for the frozen parts); returns what was measured (parameters, FLOPs, rewrites).
    A run that is not channel-sparse, or has no dead channel, is refused: nothing to remove.
    """
    run_dir, out = Path(run_dir).resolve(), Path(out)
    check_apart(out, run_dir)
    if read_condensed_info(run_dir) is not None:
        raise ValueError(f"{run_dir} already holds a condensed model")
    granularity = read_run_config(run_dir).sparse.granularity
    if granularity != "channel":
        raise ValueError(
            f"{run_dir} is not channel-sparse (sparse.granularity = {granularity!r}): condense "
            "removes whole dead channels, which only channel-sparse training leaves; nothing "
            "written"
        )
    replaced = prepare_out(out, "condensed", overwrite, RUN_ENTRIES)
    with hold(run_dir, shared=True):
        pipeline, denoiser = load_run(run_dir)
    condensed, plan = condense(denoiser)
    inputs = pipeline.flop_inputs(torch.device("cpu"))
    masked = inference_flops(denoiser, *inputs)
    small = inference_flops(condensed.eval(), *inputs, densities={})
    kinds = [entry["kind"] for entry in plan.values()]
    info = {
        "source": str(run_dir),
        "params": count_parameters(denoiser)[0],
        "params_condensed": count_parameters(condensed)[0],
        "flops_dense": masked.dense,
        "flops_masked": masked.sparse,
        "flops_condensed": small.dense,
        "rewritten": {kind: kinds.count(kind) for kind in sorted(set(kinds))},
    }
    if info["params_condensed"] == info["params"]:
        raise ValueError(f"{run_dir} has no dead channel to remove: nothing written")
    with hold(out):
        clear(out, replaced, "to replace it")
        save_condensed(condensed, plan, out, **info)
        shutil.copy2(run_dir / CONFIG_FILE, out / CONFIG_FILE)
        write_marker(out, "condensed")
    return info


# ---------------------------------------------------------------------- model card
def latest_eval(run_dir: str | Path) -> tuple[str, dict[str, Any]] | None:
    """The newest ``eval-*.json`` record of a run with metrics: ``(file name, record)``."""
    records = sorted(Path(run_dir).glob("eval-*.json"), key=lambda p: p.stat().st_mtime)
    for path in reversed(records):
        record = read_json(path)
        if isinstance(record, dict) and "metrics" in record:
            return path.name, record
    return None


def _sparsity_section(cfg_sparse: dict[str, Any], done: dict[str, Any]) -> list[str]:
    stats = done.get("sparse")
    if cfg_sparse["method"] == "dense" or not stats:
        return ["Dense training (no sparsity).", ""]
    lines = [
        f"- Method: **{cfg_sparse['method']}**, target sparsity **{cfg_sparse['sparsity']:g}**",
        f"- Layer distribution: {cfg_sparse['distribution']}; mask update every "
        f"{cfg_sparse['update_interval']} steps, prune ratio {cfg_sparse['prune_ratio']:g} "
        f"({cfg_sparse['prune_schedule']}), updates stop at {cfg_sparse['stop_fraction']:g} "
        "of training",
    ]
    if cfg_sparse.get("granularity"):
        lines.append(f"- Granularity: {cfg_sparse['granularity']}")
    lines += [
        f"- Achieved: density {stats['density']:.4f} (sparsity {stats['sparsity']:.4f}), "
        f"{stats['active']:,} of {stats['maskable']:,} maskable weights active",
        "",
        "| layer | density |",
        "|---|---|",
        *(f"| `{name}` | {d:.4f} |" for name, d in stats.get("layer_density", {}).items()),
        "",
    ]
    return lines


def _eval_section(run_dir: Path) -> list[str]:
    found = latest_eval(run_dir)
    if found is None:
        return ["No evaluation record (`eval-*.json`) in the run.", ""]
    name, record = found
    m, p = record["metrics"], record.get("protocol", {})
    return [
        f"- FID **{m['fid']:.3f}**, KID {m['kid_mean']:.5f} ± {m['kid_std']:.5f} "
        f"({m.get('num_fake', '?')} samples against {m.get('num_real', '?')} references)",
        f"- Protocol: {p.get('sampler', '?')}, {p.get('steps', '?')} steps, "
        f"η = {p.get('eta', '?')}, seed {p.get('seed', '?')} (`{name}`)",
        "",
    ]


def model_card(
    pipeline: Pipeline,
    denoiser: nn.Module,
    folder: str,
    compact: dict[str, Any] | None = None,
) -> str:
    """The README.md model card (YAML front matter + markdown) of an exported run."""
    from huggingface_hub import ModelCard, ModelCardData

    cfg, run_dir = pipeline.cfg, pipeline.run_dir
    done = read_json(run_dir / DONE_FILE)
    config = cfg.to_dict()
    method = config["sparse"]["method"]
    tags = ["sparse", "sparse-training", "diffusion", f"sparsity-{method}", "sparsediff"]
    about = pipeline.export_card(folder)
    data = ModelCardData(**{**about["card"], "tags": [*tags, *about["card"].get("tags", [])]})
    params, nonzero = count_parameters(denoiser)
    title = cfg.name or pipeline.name
    lines = [
        f"# {title}: sparse {about['title']}",
        "",
        f"Trained with sparsediff (sparse-to-sparse training of diffusion models) for "
        f"{done.get('step', cfg.train.steps):,} steps; EMA weights. Denoiser: {params:,} "
        f"parameters, {nonzero:,} non-zero (stored dense, masked weights as zeros).",
        "",
        "## Sparsity",
        "",
        *_sparsity_section(config["sparse"], done),
        "## Evaluation",
        "",
        *_eval_section(run_dir),
        "## Data",
        "",
        *(f"- {key}: {value}" for key, value in config["data"].items() if value not in ("", [])),
        "",
        "## Usage",
        "",
        "```python",
        about["usage"].rstrip("\n"),
        "```",
        "",
        *about["notes"],
    ]
    if compact is not None:
        lines += [
            "## Compact weights",
            "",
            f"`{COMPACT_WEIGHTS_FILE}`: the denoiser as bit-masks + non-zero values "
            f"(values: {compact['value_dtype'] or 'original dtype, exact'}), "
            f"{compact['compact_bytes']:,} bytes = {compact['ratio']:.3f}× the dense file. "
            "Load with `sparsediff.weights.load_weights`.",
            "",
        ]
    lines += ["## Training configuration", "", "```json", json.dumps(config, indent=1), "```"]
    content = f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n"
    return str(ModelCard(content))
