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
  rebuilds it from the folder alone.

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

import numpy as np
import torch
from torch import nn

from sparsediff.config import load_config
from sparsediff.diffusion.samplers import build_sampling_scheduler
from sparsediff.io import read_json, write_json, write_text
from sparsediff.models.autoencoder import autoencoder_kind
from sparsediff.pipelines.base import Pipeline, sample_seeds
from sparsediff.pipelines.chirodiff import ChiroDiff
from sparsediff.pipelines.run import DONE_FILE, export_weights, load_run
from sparsediff.weights import compact_size_report, load_weights, parse_dtype, save_compact

CARD_FILE = "README.md"
COMPACT_FILE = "model.compact.safetensors"
CHIRODIFF_WEIGHTS = "model.safetensors"
CHIRODIFF_CONFIG = "config.json"
CHIRODIFF_FORMAT = "sparsediff-chirodiff"
CHIRODIFF_SECTIONS = ("model", "data", "diffusion", "sample")  # enough to rebuild and sample


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
    is assembled under a temporary name and renamed into place, so it is complete or absent;
    an existing non-empty ``out_dir`` is replaced only with ``overwrite``.
    """
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    value_dtype = parse_dtype(value_dtype)
    if value_dtype is not None and not compact:
        raise ValueError("value_dtype applies to the compact weights: pass compact=True")
    if not (run_dir / DONE_FILE).exists():
        raise FileNotFoundError(f"{run_dir} is not a finished run (no {DONE_FILE})")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty (pass overwrite=True)")
    pipeline, denoiser = load_run(run_dir, "cpu")
    exporters = {"ldm": _export_ldm, "chirodiff": _export_chirodiff}
    if pipeline.name not in exporters:
        raise ValueError(f"no exporter for pipeline {pipeline.name!r}; known: {sorted(exporters)}")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.", suffix=".tmp"))
    tmp.chmod(0o755)  # mkdtemp's 0700 would make a folder meant for sharing private
    try:
        dense_file = exporters[pipeline.name](pipeline, denoiser, tmp)
        sizes = None
        if compact:
            save_compact(denoiser.state_dict(), tmp / COMPACT_FILE, value_dtype)
            sizes = compact_size_report(tmp / COMPACT_FILE, tmp / dense_file)
        card = model_card(pipeline, denoiser, out_dir.name, sizes)
        write_text(tmp / CARD_FILE, card)
        if out_dir.exists() and any(out_dir.iterdir()):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)  # also replaces an empty directory
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


# ---------------------------------------------------------------------- Latent Diffusion
def _export_ldm(pipeline: Pipeline, unet: nn.Module, out: Path) -> str:
    """An ``LDMPipeline`` folder; returns the dense UNet file (relative to ``out``)."""
    from diffusers import LDMPipeline  # heavy: only when exporting

    _, height, width = pipeline.latent_shape
    if height != width:
        raise ValueError(f"LDMPipeline samples square latents; this run's are {height}×{width}")
    ae = pipeline.ae
    # LDMPipeline decodes vqvae.decode(z / scaling_factor) (a VQModel quantises inside decode,
    # as we do). Ours: VQ decodes z / scale, KL decodes z / scale / its own scaling factor.
    factor = pipeline.scale
    if autoencoder_kind(ae) == "kl":
        factor *= float(ae.config.scaling_factor)
    ae.register_to_config(scaling_factor=factor)
    # the scheduler our DDIM sampler builds (CompVis settings: leading, offset 1, ᾱ_0 last)
    scheduler = build_sampling_scheduler(pipeline.scheduler(), "ddim")
    LDMPipeline(vqvae=ae, unet=unet, scheduler=scheduler).save_pretrained(out)
    return "unet/diffusion_pytorch_model.safetensors"


# ---------------------------------------------------------------------- ChiroDiff
def _export_chirodiff(pipeline: Pipeline, denoiser: nn.Module, out: Path) -> str:
    """Weights and the config that rebuilds them; returns the weights file name."""
    export_weights(denoiser, out / CHIRODIFF_WEIGHTS)
    config = pipeline.cfg.to_dict()
    record = {
        "format": CHIRODIFF_FORMAT,
        "version": 1,
        "pipeline": pipeline.name,
        "config": {section: config[section] for section in CHIRODIFF_SECTIONS},
        "lengths": [int(n) for n in pipeline.lengths],
    }
    write_json(out / CHIRODIFF_CONFIG, record, indent=None)
    return CHIRODIFF_WEIGHTS


def load_exported_chirodiff(
    out_dir: str | Path, device: str | torch.device = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """The plain denoiser of an exported ChiroDiff folder, and what sampling needs.

    ``info``: ``config`` (a RunConfig), ``lengths``, ``pipeline`` (a ChiroDiff ready to
    ``generate``) and ``sampling`` (the run's sample settings).
    """
    out_dir = Path(out_dir)
    record = read_json(out_dir / CHIRODIFF_CONFIG)
    if record.get("format") != CHIRODIFF_FORMAT:
        raise ValueError(f"{out_dir / CHIRODIFF_CONFIG} is not an exported ChiroDiff config")
    cfg = load_config({"pipeline": "chirodiff", **record["config"]})
    pipeline = ChiroDiff(cfg, out_dir)
    pipeline.lengths = np.asarray(record["lengths"], dtype=np.int64)  # what load() reads
    denoiser = pipeline.build_denoiser()
    denoiser.load_state_dict(load_weights(out_dir / CHIRODIFF_WEIGHTS))
    info = {
        "config": cfg,
        "lengths": pipeline.lengths,
        "pipeline": pipeline,
        "sampling": pipeline.sampling(cfg.sample),
    }
    return denoiser.to(device).eval(), info


# ---------------------------------------------------------------------- model card
def latest_eval(run_dir: str | Path) -> tuple[str, dict[str, Any]] | None:
    """The newest ``eval-*.json`` record of a run with metrics: ``(file name, record)``."""
    records = sorted(Path(run_dir).glob("eval-*.json"), key=lambda p: p.stat().st_mtime)
    for path in reversed(records):
        record = read_json(path)
        if isinstance(record, dict) and "metrics" in record:
            return path.name, record
    return None


def _usage(pipeline: Pipeline, folder: str) -> str:
    if pipeline.name == "ldm":
        s = pipeline.cfg.sample
        steps, eta = (s.steps, s.eta) if s.sampler == "ddim" else (50, 0.0)
        return (
            "import torch\nfrom diffusers import DiffusionPipeline\n\n"
            f'pipe = DiffusionPipeline.from_pretrained("{folder}")\n'
            f"seeds = {sample_seeds(0, 0, 4)}  # those of `sparsediff sample --seed 0 --num 4`\n"
            f"images = pipe(batch_size=len(seeds), num_inference_steps={steps}, eta={eta}, "
            "generator=[torch.Generator().manual_seed(s) for s in seeds]).images\n"
        )
    return (
        "from sparsediff.pipelines.export import load_exported_chirodiff\n\n"
        f'denoiser, info = load_exported_chirodiff("{folder}")\n'
        'sketches = info["pipeline"].generate(denoiser, [0, 1, 2, 3], info["sampling"])\n'
    )


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
    if pipeline.name == "ldm":
        data = ModelCardData(
            library_name="diffusers",
            pipeline_tag="unconditional-image-generation",
            tags=[*tags, "latent-diffusion", "diffusers:LDMPipeline"],
        )
    else:
        data = ModelCardData(tags=[*tags, "chirodiff", "sketch-generation"])
    params = sum(p.numel() for p in denoiser.parameters())
    nonzero = sum(int(torch.count_nonzero(p)) for p in denoiser.parameters())
    title = cfg.name or pipeline.name
    lines = [
        f"# {title}: sparse {'Latent Diffusion' if pipeline.name == 'ldm' else 'ChiroDiff'}",
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
        _usage(pipeline, folder).rstrip("\n"),
        "```",
        "",
    ]
    if pipeline.name == "ldm":
        lines += [
            "Same images as sparsediff for the same sample seeds, bit for bit on the CPU: at "
            "η = 0 with one generator per image as above; at any η draw one image per call "
            "after `torch.manual_seed(seed)`, passing no generator (LDMPipeline draws its DDIM "
            "noise from the global generator). Floats can differ by ~1e-6 between batch sizes "
            "(CPU kernels), below one uint8 level.",
            "",
        ]
    if compact is not None:
        lines += [
            "## Compact weights",
            "",
            f"`{COMPACT_FILE}`: the denoiser as bit-masks + non-zero values "
            f"(values: {compact['value_dtype'] or 'original dtype, exact'}), "
            f"{compact['compact_bytes']:,} bytes = {compact['ratio']:.3f}× the dense file. "
            "Load with `sparsediff.weights.load_weights`.",
            "",
        ]
    lines += ["## Training configuration", "", "```json", json.dumps(config, indent=1), "```"]
    content = f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n"
    return str(ModelCard(content))
