"""LDM UNet training throughput: dense vs Static, RigL and MagRan through the project's loop.

Every method gets its own `Trainer` (the loop both pipelines use) over the same synthetic
latents (`LatentDataset` of N(0, 1) tensors), the same initial UNet weights, the same seed
and so the same batches and noise. What is timed is `Trainer.train()` itself: data loading,
autocast forward, ε-MSE, backward (through the grad scaler), AdamW (fused on CUDA), the
sparse engine's step hook (mask multiply; drop/grow on update steps) and the EMA update.
Checkpoint writes are switched off: they are I/O, not training. "dense" is the pipeline's
dense run (the engine attached in dense mode, as `sparse.method = "dense"` does).

Each round runs ``--steps`` optimizer steps of every method in turn (the order rotates
between rounds) as one resumed job of the run (``train.stop_at``), so all methods share
the machine's load; images/s and the ratio to dense come from the median over rounds
(the ratio is the median of the per-round paired ratios). ``--steps`` must be a multiple
of ΔT (``--update-interval``), so every timed chunk holds the same number of RigL/MagRan
mask updates and their cost is amortised into the numbers. ΔT here (default 10) is much
smaller than the study's (100) so that several updates happen inside the timed window: the
measured ratio overstates the amortised update cost by ``100 / ΔT``. The table therefore
also gives each update's wall time, its share of the step time, and the ratio estimated at
the study's ΔT (measured chunk time with the update cost re-amortised over 100 steps).
Warm-up steps (one ΔT by default, so one update too) are not timed. Peak memory: CUDA, the
method's own ``max_memory_allocated`` (net of the other methods' resident state); CPU, the
process-wide peak RSS only.

    python benchmarks/ldm_throughput.py                       # CPU: fmnist UNet, batch 32
    python benchmarks/ldm_throughput.py --device cuda         # ldm4 UNet, bf16, batch 48
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import os
import platform
import resource
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sparsediff.config import TrainConfig
from sparsediff.data.latents import LatentDataset
from sparsediff.diffusion.losses import epsilon_mse
from sparsediff.diffusion.schedules import make_scheduler
from sparsediff.models.unet import UNET_PRESETS, build_unet
from sparsediff.sparsity import SparseSettings
from sparsediff.sparsity.schedules import is_update_step
from sparsediff.training.distributed import setup
from sparsediff.training.loop import Task, Trainer

METHODS = ("dense", "static", "rigl", "magran")
STUDY_UPDATE_INTERVAL = 100  # ΔT of the study's LDM runs (configs/ldm-celebahq.toml)
# H100 targets: ldm4, bf16, batch 48.
TARGET_DENSE_IMG_S = 280.0
TARGET_SPARSE_RATIO = 0.98


# ----------------------------------------------------------------------------- harness
# (chirodiff_throughput.py imports these)
@dataclass
class Run:
    """One method's trainer and what was measured on it."""

    method: str
    trainer: Trainer
    seconds: list[float] = field(default_factory=list)  # wall time of each timed chunk
    update_s: list[float] = field(default_factory=list)  # last mask update of each chunk
    updates: int = 0  # mask updates inside the timed chunks
    resident: int = 0  # bytes of its own state on the device (model, EMA, AdamW, masks)
    peak: int = 0  # CUDA: its own peak bytes during its steps


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine(device: torch.device) -> str:
    """The GPU's name, or the CPU model from /proc/cpuinfo."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{model}, {os.cpu_count()} logical CPUs visible, {torch.get_num_threads()} torch threads"
    )


def peak_rss_mib() -> float:
    """Peak resident set size of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def resident_bytes(trainer: Trainer, device: torch.device) -> int:
    """Bytes of one trainer's persistent state on ``device``: model, EMA, AdamW, masks."""
    tensors = [*trainer.model.parameters(), *trainer.model.buffers()]
    if trainer.ema is not None:
        tensors += [*trainer.ema.module.parameters(), *trainer.ema.module.buffers()]
    for state in trainer.optimizer.state.values():
        tensors += [v for v in state.values() if torch.is_tensor(v)]
    for layer in getattr(trainer.sparse, "_layers", ()):  # mask, multiply mask, ever-active
        tensors += [layer.mask, layer.fmask, layer.ever]
    seen: dict[int, int] = {}
    for t in tensors:
        if t.device.type == device.type:
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def no_save() -> None:
    """Replaces `Trainer.save`: the benchmark writes no checkpoints."""


def build_runs(
    methods: Sequence[str],
    make_task: Callable[[], Task],
    train_cfg: TrainConfig,
    sparse_cfg: SparseSettings,
    device: torch.device,
    run_root: str | Path,
    seed: int = 0,
) -> dict[str, Run]:
    """One `Trainer` per method, each with a fresh task (same initial weights) and config."""
    dist = setup(str(device))
    runs = {}
    for method in methods:
        trainer = Trainer(
            make_task(),
            dataclasses.replace(train_cfg),
            Path(run_root) / method,
            dist,
            seed=seed,
            sparse_cfg=dataclasses.replace(
                sparse_cfg,
                method=method,
                sparsity=0.0 if method == "dense" else sparse_cfg.sparsity,
            ),
            desc=method,
        )
        trainer.save = no_save  # type: ignore[method-assign]
        runs[method] = Run(method, trainer)
    return runs


def run_chunk(run: Run, steps: int, device: torch.device, timed: bool = True) -> None:
    """``steps`` optimizer steps of ``run`` through ``Trainer.train()`` (one resumed job)."""
    if steps <= 0:  # stop_at = 0 would mean "no stop": the whole planned run
        return
    trainer, sparse = run.trainer, run.trainer.sparse
    trainer.cfg.stop_at = trainer.state.step + steps
    first = sparse.step if sparse is not None else 0
    sync(device)
    if device.type == "cuda":
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    trainer.train()
    sync(device)
    elapsed = time.perf_counter() - start
    if not timed:
        return
    run.seconds.append(elapsed)
    if device.type == "cuda":  # net of the other trainers' state, which is resident too
        others = before - run.resident
        run.peak = max(run.peak, torch.cuda.max_memory_allocated(device) - others)
    if sparse is not None and sparse.method in ("rigl", "magran"):
        dt = sparse.config["update_interval"]
        n = sum(is_update_step(s, dt, math.inf) for s in range(first + 1, sparse.step + 1))
        run.updates += n
        if n:
            run.update_s.append(sparse.stats()["update_time_s"])


def measure(
    runs: dict[str, Run], steps: int, rounds: int, warmup: int, device: torch.device
) -> None:
    """Warm every method up, then interleave ``rounds`` chunks of ``steps`` steps each."""
    for run in runs.values():
        run_chunk(run, warmup, device, timed=False)
        run.resident = resident_bytes(run.trainer, device)
    names = list(runs)
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            run_chunk(runs[name], steps, device)
        dense = runs[names[0]].seconds[-1]
        line = ", ".join(f"{n} {dense / runs[n].seconds[-1]:.3f}x" for n in names[1:])
        print(f"  round {r + 1}/{rounds}: {line}", flush=True)


def summarise(
    runs: dict[str, Run],
    items_per_chunk: int,
    steps: int,
    update_interval: int,
    study_update_interval: int,
) -> dict[str, dict[str, float]]:
    """Median throughput, paired ratios to the first run (dense) and update cost.

    ``ratio_study`` estimates the ratio at the study's ΔT: each chunk's time with the
    measured updates (``steps / ΔT`` of them, at the median update time) replaced by
    ``steps / study ΔT`` updates.
    """
    base = next(iter(runs.values()))
    out = {}
    for name, run in runs.items():
        update_s = statistics.median(run.update_s) if run.update_s else 0.0
        shift = (steps / update_interval - steps / study_update_interval) * update_s
        ratios = [b / s for b, s in zip(base.seconds, run.seconds, strict=True)]
        at_study = [b / (s - shift) for b, s in zip(base.seconds, run.seconds, strict=True)]
        chunk_s = statistics.median(run.seconds)
        out[name] = {
            "rate": items_per_chunk / chunk_s,
            "ratio": statistics.median(ratios),
            "ratio_min": min(ratios),
            "ratio_max": max(ratios),
            "ratio_study": statistics.median(at_study),
            "update_ms": 1e3 * update_s,
            "update_share": update_s / (update_interval * chunk_s / steps),
        }
    return out


def print_table(
    runs: dict[str, Run],
    summary: dict[str, dict[str, float]],
    unit: str,
    steps: int,
    update_interval: int,
    study_update_interval: int,
    device: torch.device,
    extra: dict[str, dict[str, str]] | None = None,
) -> None:
    """The results table plus memory and update-cost notes."""
    extra = extra or {}
    extra_cols = list(next(iter(extra.values()), {}))
    cuda = device.type == "cuda"
    study_col = f"@ΔT {study_update_interval}"
    header = (
        f"{'method':<7} {unit:>9} {'vs dense':>9} {'range over rounds':>17} {study_col:>9} "
        f"{'updates':>7} {'update ms':>9} {'upd share':>9} {'state MiB':>9} {'peak MiB':>9}"
    )
    header += "".join(f" {c:>{max(len(c), 9)}}" for c in extra_cols)
    print("\n" + header)
    for name, run in runs.items():
        s = summary[name]
        upd = f"{s['update_ms']:9.1f}" if run.update_s else f"{'-':>9}"
        shr = f"{100 * s['update_share']:8.2f}%" if run.update_s else f"{'-':>9}"
        peak = f"{run.peak / 2**20:9.0f}" if cuda else f"{'-':>9}"
        row = (
            f"{name:<7} {s['rate']:9.1f} {s['ratio']:8.3f}x "
            f"{s['ratio_min']:7.3f}x – {s['ratio_max']:.3f}x {s['ratio_study']:8.3f}x "
            f"{run.updates:7d} {upd} {shr} {run.resident / 2**20:9.0f} {peak}"
        )
        row += "".join(f" {extra.get(name, {}).get(c, '-'):>{max(len(c), 9)}}" for c in extra_cols)
        print(row)
    print(
        f"\nvs dense: median over rounds of the paired ratio (dense chunk time / method chunk "
        f"time, same {steps} steps, measured at ΔT = {update_interval}); range: its min and max "
        f"over rounds (the noise). {study_col}: the same ratio estimated at the study's ΔT = "
        f"{study_update_interval}, with the measured update cost amortised over "
        f"{study_update_interval} steps instead of {update_interval}. update ms: median wall "
        f"time of one drop/grow; upd share: that cost over ΔT = {update_interval} steps as a "
        f"fraction of the step time. state MiB: the method's own model + EMA + AdamW state + "
        f"masks on the {device.type}."
    )
    if cuda:
        print(
            "peak MiB: torch.cuda.max_memory_allocated during the method's own steps, minus the "
            "other trainers' resident state (all methods live in one process); process-wide "
            f"peak {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB."
        )
    else:
        print(
            f"peak memory (CPU): process-wide peak RSS {peak_rss_mib():.0f} MiB (all methods' "
            "trainers in one process, plus Python/torch; not per method)."
        )


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=None)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--update-interval", type=int, default=None, help="ΔT (steps)")
    parser.add_argument("--prune-ratio", type=float, default=0.05, help="p, constant")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps (default ΔT)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default 1 on CPU)"
    )


def resolve_common_args(
    args: argparse.Namespace,
    parser: argparse.ArgumentParser,
    update_interval: int = 10,
    steps_per_interval: int = 2,
    rounds: int = 5,
) -> None:
    """Device-dependent defaults and checks shared by both throughput scripts."""
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    args.precision = args.precision or ("bf16" if cuda else "fp32")
    args.update_interval = args.update_interval or update_interval
    args.steps = args.steps or steps_per_interval * args.update_interval
    args.rounds = args.rounds or rounds
    args.warmup = args.update_interval if args.warmup is None else args.warmup
    if "dense" not in args.methods:
        parser.error("--methods must include dense (the ratios are to dense)")
    args.methods = ["dense", *[m for m in METHODS if m in args.methods and m != "dense"]]
    if args.steps % args.update_interval:
        parser.error("--steps must be a multiple of --update-interval (same updates per chunk)")
    if args.threads or not cuda:
        torch.set_num_threads(args.threads or 1)
    if cuda:  # what the pipelines' prepare_run_dir does with train.tf32 = true
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def sparse_config(args: argparse.Namespace) -> SparseSettings:
    """Sparsity settings; constant p and no stop, so every chunk costs the same."""
    return SparseSettings(
        sparsity=args.sparsity,
        update_interval=args.update_interval,
        prune_ratio=args.prune_ratio,
        prune_schedule="constant",
        stop_fraction=1.0,
    )


def train_config(args: argparse.Namespace, **overrides: Any) -> TrainConfig:
    """The loop's config: the whole planned run, no checkpoints, samples or progress bar."""
    cfg = TrainConfig(
        steps=args.warmup + args.rounds * args.steps,
        batch_size=args.batch,
        precision=args.precision,
        checkpoint_every=0,
        sample_every=0,
        log_every=10**9,  # the loop still logs once at the end of every chunk
        progress=False,
        device=args.device,
    )
    return dataclasses.replace(cfg, **overrides)


# ----------------------------------------------------------------------------- LDM
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default=None, choices=sorted(UNET_PRESETS))
    parser.add_argument("--batch", type=int, default=None)
    add_common_args(parser)
    args = parser.parse_args()
    cuda = torch.device(args.device).type == "cuda"
    args.preset = args.preset or ("ldm4" if cuda else "fmnist")
    args.batch = args.batch or (48 if cuda else 32)
    resolve_common_args(args, parser)
    device = torch.device(args.device)

    torch.manual_seed(args.seed)
    base = build_unet(args.preset)
    size = base.config.sample_size
    shape = (base.config.in_channels, size, size)
    n_params = sum(p.numel() for p in base.parameters())
    latents = LatentDataset(torch.randn(8 * args.batch, *shape), meta={})
    scheduler = make_scheduler("ldm", 1000)  # LDM: T = 1000, β 0.0015 → 0.0195, linear in √β

    def loss(model: torch.nn.Module, z: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return epsilon_mse(lambda x, t: model(x, t).sample, z, scheduler, generator=gen)

    def make_task() -> Task:
        return Task(copy.deepcopy(base), latents, loss)

    print(
        f"LDM UNet '{args.preset}' ({n_params / 1e6:.2f} M params), latents "
        f"{'×'.join(map(str, shape))}, batch {args.batch}, {args.precision}, {device}\n"
        f"machine: {machine(device)}; torch {torch.__version__}\n"
        f"sparsity {args.sparsity} (ERK), ΔT {args.update_interval}, p {args.prune_ratio} "
        f"(constant); {args.warmup} warm-up + {args.rounds} rounds × {args.steps} timed steps "
        f"per method ({args.steps // args.update_interval} mask update(s) per round for "
        f"RigL/MagRan); loop: AdamW{' (fused)' if device.type == 'cuda' else ''}, EMA, "
        f"grad scaler ({'on' if args.precision == 'fp16' else 'off'}), "
        f"autocast {args.precision}",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="sparsediff-bench-") as tmp:
        runs = build_runs(
            args.methods, make_task, train_config(args), sparse_config(args), device, tmp, args.seed
        )
        measure(runs, args.steps, args.rounds, args.warmup, device)
    dts = (args.update_interval, STUDY_UPDATE_INTERVAL)
    summary = summarise(runs, args.steps * args.batch, args.steps, *dts)
    print_table(runs, summary, "img/s", args.steps, *dts, device)

    if device.type == "cuda" and args.preset == "ldm4":
        print("\n" + target_check(summary, args.batch, args.precision, machine(device)))


def target_check(
    summary: dict[str, dict[str, float]], batch: int, precision: str, device_name: str
) -> str:
    """One line: the H100 targets (ldm4, bf16, batch 48) against this run's numbers."""

    def ok(passed: bool) -> str:
        return "PASS" if passed else "FAIL"

    dense = summary["dense"]["rate"]
    checks = [
        f"dense {dense:.1f} img/s ≥ {TARGET_DENSE_IMG_S:.0f}: {ok(dense >= TARGET_DENSE_IMG_S)}"
    ]
    for method, s in summary.items():
        if method == "dense":
            continue
        r, est = s["ratio"], s["ratio_study"]
        check = f"{method} {r:.3f}x ≥ {TARGET_SPARSE_RATIO}x: {ok(r >= TARGET_SPARSE_RATIO)}"
        if s["update_ms"] > 0:
            passed = ok(est >= TARGET_SPARSE_RATIO)
            check += f" (est. {est:.3f}x at ΔT {STUDY_UPDATE_INTERVAL}: {passed})"
        checks.append(check)
    caveats = []
    if batch != 48 or precision != "bf16":
        caveats.append(f"this run used batch {batch}, {precision}: not the target's settings")
    if "H100" not in device_name:
        caveats.append(f"device is {device_name}, not an H100")
    note = f" ({'; '.join(caveats)})" if caveats else ""
    return f"H100 target check (ldm4, bf16, batch 48){note}: " + "; ".join(checks)


if __name__ == "__main__":
    main()
