"""``sparsediff evaluate``: one documented protocol for every pipeline (see docs/evaluation.md).

Sample ``i`` draws all its noise from its own generator, seeded by ``(seed, i)``, so the batch
size changes nothing but speed and memory, and a large evaluation can be split into seed ranges
(``--seed-range A:B``) on several machines or resumed after an interruption; each range is saved
as a shard (atomically, so a crash never leaves a truncated
shard that counts as done) and the metrics are computed once the shards cover all samples.
Reference features are cached per dataset split, size, resolution, rendering and feature
network. Costs (parameters, FLOPs per network evaluation and per sample, training FLOPs of the
run) come from the sparse engine's accounting.
"""

from __future__ import annotations

import importlib.metadata
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from sparsediff.diffusion.samplers import SamplingSettings
from sparsediff.imaging import save_image_grid
from sparsediff.io import atomic_write, read_json, write_json
from sparsediff.locks import hold
from sparsediff.metrics import (
    PREPROCESSING_VERSION,
    InceptionFeatures,
    ReferenceCache,
    compute_metrics,
    extract_features,
    key_digest,
    reference_key,
)
from sparsediff.models.condense import read_condensed_info
from sparsediff.pipelines import FamilyConfig, Pipeline, read_run_config, sample_seeds
from sparsediff.runtime import resolve_device
from sparsediff.sparsity.flops import (
    FlopReport,
    count_parameters,
    inference_flops,
    training_flops_per_step,
)
from sparsediff.training.tensorboard import log_scalars, stage_dir
from sparsediff.workflows.run import CONFIG_FILE, load_run

FLOORS_FILE = "floors.json"


def default_cache_dir() -> Path:
    """Reference statistics cache: ``$SPARSEDIFF_CACHE`` or ``~/.cache/sparsediff``."""
    root = os.environ.get("SPARSEDIFF_CACHE") or Path.home() / ".cache" / "sparsediff"
    return Path(root) / "fid-reference"


@dataclass(frozen=True)
class EvaluationPlan:
    """Everything that moves a sample-based number; recorded with it."""

    num_samples: int
    sampling: SamplingSettings
    seed: int
    ema: bool

    def to_dict(self) -> dict[str, Any]:
        """Flat and JSON-ready: the record's ``protocol`` and the shard folder's identity
        (without guidance it is the record of versions that had none)."""
        flat = asdict(self)
        sampling = flat.pop("sampling")
        if sampling["guidance_scale"] == 1.0:
            del sampling["guidance_scale"]
        return {**sampling, **flat}

    def digest(self) -> str:
        """Short id of the generation settings (names the shard folder)."""
        return key_digest(self.to_dict())[:12]

    def record_name(self) -> str:
        """``eval-ddim50-eta0-n1000-seed0-ema``."""
        s = self.sampling
        name = f"eval-{s.sampler}{s.steps}-eta{s.eta:g}-n{self.num_samples}-seed{self.seed}"
        name += f"-cfg{s.guidance_scale:g}" if s.guidance_scale != 1.0 else ""
        return name + ("-ema" if self.ema else "-raw")


def _versions() -> dict[str, str]:
    out = {}
    for name in ("sparsediff", "torch", "diffusers", "numpy"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "missing"
    return out


def _shards(folder: Path) -> dict[tuple[int, int], Path]:
    found = {}
    for path in folder.glob("samples-*-*.safetensors"):
        _, start, stop = path.stem.split("-")
        found[(int(start), int(stop))] = path
    return found


def _covered(shards: dict[tuple[int, int], Path], n: int) -> bool:
    return set(range(n)) <= {i for start, stop in shards for i in range(start, stop)}


def _assemble(shards: dict[tuple[int, int], Path], n: int) -> torch.Tensor:
    """Samples 0..n-1 from shards that cover them (overlaps hold the same samples)."""
    picked: dict[int, torch.Tensor] = {}
    for (start, stop), path in sorted(shards.items()):
        images = load_file(str(path))["images"]
        for i in range(start, min(stop, n)):
            picked.setdefault(i, images[i - start])
    return torch.stack([picked[i] for i in range(n)])


def generate_shard(
    pipeline: Pipeline,
    denoiser: nn.Module,
    plan: EvaluationPlan,
    start: int,
    stop: int,
    folder: Path,
    batch_size: int,
    progress: bool = True,
) -> tuple[Path, float]:
    """Generate samples ``start..stop-1`` in batches as uint8 images; returns path and seconds."""
    chunks = []
    bar = tqdm(total=stop - start, desc="sampling", unit="sample", disable=not progress)
    tick = time.perf_counter()
    with bar:
        for i in range(start, stop, batch_size):
            seeds = sample_seeds(plan.seed, i, min(i + batch_size, stop))
            chunks.append(pipeline.to_images(pipeline.generate(denoiser, seeds, plan.sampling)))
            bar.update(len(seeds))
    seconds = time.perf_counter() - tick
    images = {"images": torch.cat(chunks).contiguous()}
    path = folder / f"samples-{start}-{stop}.safetensors"
    atomic_write(path, lambda tmp: save_file(images, str(tmp)))
    return path, seconds


@dataclass(frozen=True)
class Cost:
    """What a run costs: parameters and FLOPs, sparse and dense (an evaluation's ``cost``)."""

    params_total: int
    params_nonzero: int
    params_dense_total: int  # the dense model's (a condensed network's run's)
    inference_flops: float  # per network evaluation
    inference_flops_dense: float
    nfe: int  # network evaluations per sample
    decode_flops: float  # per sample, outside the denoiser (a first-stage decoder)
    sample_flops: float
    sample_flops_dense: float
    train_flops: float  # the whole run, the engine's RigL-aware accounting
    train_flops_dense: float  # the usual 3x forward
    sampling_seconds_per_sample: float | None  # None: the samples came from earlier shards

    @classmethod
    def of(
        cls,
        params_total: int,
        params_nonzero: int,
        inference: FlopReport,
        decode_flops: float,
        nfe: int,
        train_step_flops: float,
        samples_seen: int,
        seconds_per_sample: float | None,
        params_dense_total: int | None = None,
    ) -> Cost:
        """From counts: ``train_step_flops`` is per training sample."""
        return cls(
            params_total=params_total,
            params_nonzero=params_nonzero,
            params_dense_total=params_dense_total or params_total,
            inference_flops=inference.sparse,
            inference_flops_dense=inference.dense,
            nfe=nfe,
            decode_flops=decode_flops,
            sample_flops=nfe * inference.sparse + decode_flops,
            sample_flops_dense=nfe * inference.dense + decode_flops,
            train_flops=train_step_flops * samples_seen,
            train_flops_dense=3.0 * inference.dense * samples_seen,
            sampling_seconds_per_sample=seconds_per_sample,
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON record."""
        return asdict(self)


@dataclass(frozen=True)
class Evaluation:
    """A finished evaluation: what ``eval-*.json`` holds, and where it was written."""

    metrics: dict[str, Any]  # FID, KID, precision, recall, sample counts
    cost: Cost
    protocol: dict[str, Any]  # everything that moves the numbers
    samples_grid: str  # the first 16 evaluated samples
    warnings: list[str]  # what a reader must know (too few references, ...)
    metrics_vs_reconstructions: dict[str, Any] | None = None  # with a first stage only
    record: str = ""  # the eval-*.json file

    def to_dict(self) -> dict[str, Any]:
        """The JSON record (without its own path)."""
        out = {
            "metrics": self.metrics,
            "cost": self.cost.to_dict(),
            "protocol": self.protocol,
            "samples_grid": self.samples_grid,
            "warnings": self.warnings,
        }
        if self.metrics_vs_reconstructions is not None:
            out["metrics_vs_reconstructions"] = self.metrics_vs_reconstructions
        return out


@dataclass(frozen=True)
class PartialEvaluation:
    """Some seed ranges of an evaluation are generated, not all: no metrics yet."""

    protocol: dict[str, Any]
    shards: list[tuple[int, int]]


def run_cost(
    pipeline: Pipeline,
    denoiser: nn.Module,
    plan: EvaluationPlan,
    seconds: float | None,
    condensed: dict[str, Any] | None = None,
) -> Cost:
    """The :class:`Cost` of a loaded run; of a condensed one (``condensed``: its record) the
    inference costs are the smaller network's, against the run's dense model."""
    cfg: FamilyConfig = pipeline.cfg
    device = next(denoiser.parameters()).device
    total, nonzero = count_parameters(denoiser)
    densities = {} if condensed else None  # a condensed network is dense: count all of it
    report = inference_flops(denoiser, *pipeline.flop_inputs(device), densities=densities)
    env = read_json(pipeline.run_dir / CONFIG_FILE)["environment"]
    samples_seen = cfg.train.steps * cfg.train.batch_size * cfg.train.grad_accum
    samples_seen *= int(env.get("world_size", 1))
    s = cfg.sparse
    trained = (report.dense, report.sparse)
    if condensed:  # training was masked: its costs are the masked model's
        trained = (condensed["flops_dense"], condensed["flops_masked"])
        report = FlopReport(condensed["flops_dense"], report.dense, report.per_layer, report.other)
    step = training_flops_per_step(
        *trained, s.method, s.update_interval, cfg.train.steps, s.stop_fraction
    )
    decode, nfe = pipeline.decode_flops(device), plan.sampling.network_evaluations
    dense_total = condensed["params"] if condensed else None
    return Cost.of(total, nonzero, report, decode, nfe, step, samples_seen, seconds, dense_total)


class RealFeatures:
    """Feature-network features of real sets of a pipeline's data, cached per dataset split,
    size, offset, rendering, network and (for reconstructions) first stage."""

    def __init__(
        self,
        pipeline: Pipeline,
        feature_module: nn.Module | None,
        batch_size: int,
        device: str,
        cache_dir: str | Path | None,
        progress: bool,
    ) -> None:
        e = pipeline.cfg.eval
        self.pipeline = pipeline
        self.network = feature_module or InceptionFeatures(e.inception_weights or None)
        self.network_sha1 = getattr(self.network, "weights_sha1", type(self.network).__name__)
        self.cache = ReferenceCache(cache_dir or default_cache_dir())
        self.batch_size, self.device, self.progress = batch_size, device, progress

    def identity(self) -> dict[str, Any]:
        """The feature network, as recorded in a protocol."""
        return {
            "name": type(self.network).__name__,
            "sha1": self.network_sha1,
            "preprocessing": PREPROCESSING_VERSION,
        }

    def __call__(
        self, split: str, size: int, offset: int = 0, reconstructed: bool = False
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """Features of up to ``size`` real items of ``split`` from ``offset`` on (or of their
        first-stage reconstructions), and the set's key with its ``size``."""
        images, ident = self.pipeline.reference(split, size, offset)
        extra = {k: str(v) for k, v in ident.items() if k != "dataset"}
        if offset:  # offset 0 keeps the keys (and caches) of earlier versions
            extra["offset"] = str(offset)
        if reconstructed:
            extra["reconstructed_by"] = str(self.pipeline.first_stage_id())
        key = reference_key(
            ident["dataset"], split, len(images), int(images.shape[-1]), self.network_sha1, **extra
        )
        what = "reconstruction features" if reconstructed else "reference features"

        def compute() -> torch.Tensor:
            shown = self.pipeline.reconstruct(images) if reconstructed else images
            return extract_features(
                shown, self.network, self.batch_size, self.device, what, self.progress
            )

        return self.cache.get_or_compute(key, compute), {**key, "size": len(images)}


def noise_floors(
    run_dir: str | Path,
    batch_size: int | None = None,
    device: str = "auto",
    feature_module: nn.Module | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    floor_split: str | None = None,
) -> dict[str, Any]:
    """The metrics of sets no model can beat, by the run's evaluation protocol; writes and
    returns ``floors.json``.

    ``real_vs_real``: the reference set against a second real set of the same size, disjoint
    from it (``floor_split``, unset: ``eval.floor_split``; "" = the reference split's next
    items). ``autoencoder``
    (pipelines with a first stage): the first stage's reconstructions of that second set
    against the reference, the best a denoiser decoded by it can score.
    """
    run_dir = Path(run_dir)
    with hold(run_dir, shared=True):
        cfg = read_run_config(run_dir)
        e = cfg.eval
        pipeline, denoiser = load_run(run_dir, resolve_device(device), e.ema, cfg)
        real_sets = RealFeatures(
            pipeline,
            feature_module,
            batch_size or e.batch_size,
            _device_of(denoiser),
            cache_dir,
            progress,
        )
        split = (e.floor_split if floor_split is None else floor_split) or e.reference_split
        floors, protocol, warnings = _floors(pipeline, real_sets, split)
        protocol |= {"feature_network": real_sets.identity(), "versions": _versions()}
        record = {"floors": floors, "protocol": protocol, "warnings": warnings}
        write_json(run_dir / FLOORS_FILE, record)
    return record


def _floors(
    pipeline: Pipeline, real_sets: RealFeatures, split: str
) -> tuple[dict[str, Any], dict[str, Any], list[str]]:
    """The floors' metrics, protocol and warnings; none measured (a warning says why) when
    ``split`` holds too few items for a second real set as large as the reference."""
    e = pipeline.cfg.eval
    real, key = real_sets(e.reference_split, e.reference_size)
    offset = e.reference_size if split == e.reference_split else 0  # items read, kept or not
    protocol = {
        "reference": key,
        "seed": e.seed,
        "first_stage": pipeline.first_stage_id(),
        "device": real_sets.device,
    }
    try:
        other, other_key = real_sets(split, e.reference_size, offset)
    except ValueError as err:  # the split ends before the second set begins
        other, other_key = None, {"size": 0, "error": str(err)}
    protocol["second_set"] = other_key
    if other_key["size"] < key["size"]:
        return (
            {},
            protocol,
            [
                f"noise floors not measured: the second real set ({split}, from item {offset}) "
                f"has {other_key['size']} items, fewer than the reference's {key['size']}; set "
                "eval.floor_split or enlarge the split"
            ],
        )
    if torch.equal(real, other):  # e.g. a split name that is an alias of the reference's
        raise ValueError(f"the second real set ({split}) holds the reference images themselves")
    kid = min(e.kid_subset_size, len(real), len(other))
    protocol["kid_subset_size"] = kid
    floors = {"real_vs_real": compute_metrics(real, other, kid_subset_size=kid, seed=e.seed)}
    if pipeline.first_stage_id() is not None:
        recon, _ = real_sets(split, e.reference_size, offset, reconstructed=True)
        floors["autoencoder"] = compute_metrics(real, recon, kid_subset_size=kid, seed=e.seed)
    return floors, protocol, []


def reference_warnings(asked: int, got: int, split: str, num_samples: int) -> list[str]:
    """What a reader must know of a reference set smaller than asked, or than the samples."""
    out = []
    if got < asked:
        out.append(
            f"eval.reference_size = {asked}, but the {split} split has only {got} items: FID "
            f"against {got} references"
        )
    if got < num_samples:
        out.append(
            f"FID of {num_samples} samples against {got} references: with fewer references "
            "than samples it is biased, and not comparable with the noise floors (which "
            "compare sets of equal size)"
        )
    return out


def evaluate(
    run_dir: str | Path,
    num_samples: int | None = None,
    sampler: str | None = None,
    steps: int | None = None,
    eta: float | None = None,
    ema: bool | None = None,
    seed: int | None = None,
    seed_range: tuple[int, int] | None = None,
    batch_size: int | None = None,
    device: str = "auto",
    feature_module: nn.Module | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> Evaluation | PartialEvaluation:
    """Evaluate a finished run; writes ``eval-*.json`` and returns its :class:`Evaluation`
    (a :class:`PartialEvaluation` while seed ranges are missing).

    Arguments left as None come from the run's ``eval`` config; ``batch_size`` changes speed and
    memory, never which samples are drawn. ``feature_module`` replaces
    the Inception network (tests use a tiny one); ``cache_dir`` the reference cache. The run
    directory is shared-locked: evaluations run side by side, never beside its training.
    """
    run_dir = Path(run_dir)
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"--batch-size {batch_size}: must be >= 1")
    with hold(run_dir, shared=True):
        cfg = read_run_config(run_dir)
        e = cfg.eval
        use_ema = ema if ema is not None else e.ema
        pipeline, denoiser = load_run(run_dir, resolve_device(device), use_ema, cfg)
        plan = EvaluationPlan(
            num_samples=num_samples if num_samples is not None else e.num_samples,
            sampling=pipeline.sampling(e, sampler, steps, eta),
            seed=seed if seed is not None else e.seed,
            ema=use_ema,
        )
        batch_size = batch_size or e.batch_size
        shards, seconds = _generate(pipeline, denoiser, plan, seed_range, batch_size, progress)
        if not _covered(shards, plan.num_samples):
            return PartialEvaluation(plan.to_dict(), sorted(shards))
        real_sets = RealFeatures(
            pipeline, feature_module, batch_size, _device_of(denoiser), cache_dir, progress
        )
        fake = _assemble(shards, plan.num_samples)
        cost = run_cost(pipeline, denoiser, plan, seconds, read_condensed_info(run_dir))
        result = _score(pipeline, plan, fake, real_sets, cost)
        path = write_json(run_dir / f"{plan.record_name()}.json", result.to_dict())
    train = pipeline.cfg.train
    if train.tensorboard:  # beside the training curves, at the final step
        log_scalars(stage_dir(run_dir), train.steps, result.metrics, f"{plan.record_name()}/")
    return replace(result, record=str(path))


def _generate(
    pipeline: Pipeline,
    denoiser: nn.Module,
    plan: EvaluationPlan,
    seed_range: tuple[int, int] | None,
    batch_size: int,
    progress: bool,
) -> tuple[dict[tuple[int, int], Path], float | None]:
    """The plan's shards after generating ``seed_range`` (default: all samples) unless it is
    there already; and the seconds per sample it took (None when nothing was generated)."""
    if plan.num_samples < 2:
        raise ValueError(f"num_samples must be >= 2 for FID, got {plan.num_samples}")
    start, stop = seed_range if seed_range else (0, plan.num_samples)
    if not 0 <= start < stop <= plan.num_samples:
        raise ValueError(f"seed range {start}:{stop} must lie within 0:{plan.num_samples}")
    folder = pipeline.run_dir / "eval" / plan.digest()
    shards = _shards(folder)
    if (start, stop) in shards:
        return shards, None
    path, elapsed = generate_shard(
        pipeline, denoiser, plan, start, stop, folder, batch_size, progress
    )
    return {**shards, (start, stop): path}, elapsed / (stop - start)


def _device_of(module: nn.Module) -> str:
    return str(next(module.parameters()).device)


def _score(
    pipeline: Pipeline,
    plan: EvaluationPlan,
    fake: torch.Tensor,
    real_sets: RealFeatures,
    cost: Cost,
) -> Evaluation:
    """Metrics of the generated images ``fake`` against the reference set (and, with a first
    stage, against its reconstructions), with the protocol and any warnings."""
    e = pipeline.cfg.eval
    real, key = real_sets(e.reference_split, e.reference_size)
    fake_features = extract_features(
        fake,
        real_sets.network,
        real_sets.batch_size,
        real_sets.device,
        "features",
        real_sets.progress,
    )
    kid_subset_size = min(e.kid_subset_size, len(real), len(fake_features))
    metrics = compute_metrics(real, fake_features, kid_subset_size=kid_subset_size, seed=plan.seed)
    grid = save_image_grid(fake[:16], pipeline.run_dir / "eval-grid.png")
    protocol = {
        **plan.to_dict(),
        "reference": key,
        "kid_subset_size": kid_subset_size,
        "feature_network": real_sets.identity(),
        "device": real_sets.device,
        "versions": _versions(),
    }
    vs_recon = None
    if pipeline.first_stage_id() is not None:  # isolates the denoiser, the part that is sparse
        protocol["first_stage"] = pipeline.first_stage_id()
        recon, _ = real_sets(e.reference_split, e.reference_size, reconstructed=True)
        vs_recon = compute_metrics(
            recon, fake_features, kid_subset_size=kid_subset_size, seed=plan.seed
        )
    warnings = reference_warnings(e.reference_size, key["size"], key["split"], plan.num_samples)
    return Evaluation(metrics, cost, protocol, str(grid), warnings, vs_recon)
