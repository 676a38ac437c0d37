"""The one training loop both pipelines share.

A pipeline hands the loop a :class:`Task` (a model, a dataset, a loss and optionally a grid writer);
the loop owns everything else: the optimizer (AdamW), the sparse engine, EMA, mixed precision,
gradient accumulation and clipping, DDP, the resumable data order, atomic checkpoints, logging to
``metrics.jsonl`` (and TensorBoard), the progress bar and periodic sample grids.

Resume is exact: the checkpoint holds the model, EMA, optimizer, grad scaler, sparse masks and
schedule, global RNG, the data position and the step; per-step noise comes from a generator
re-seeded from (seed, rank, step), so it needs no saved state.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from sparsediff.config import TrainConfig
from sparsediff.io import write_text
from sparsediff.sparsity import SparseSettings, SparseTraining
from sparsediff.training.checkpoint import load_checkpoint, rng_state, save_atomic, set_rng_state
from sparsediff.training.condensed import CondensedTraining, condensed_issue
from sparsediff.training.distributed import Dist, all_mean
from sparsediff.training.ema import EMA
from sparsediff.training.tensorboard import EventLog, stage_dir

LossFn = Callable[[nn.Module, Any, torch.Generator], torch.Tensor]
GridFn = Callable[[nn.Module, Path], None]


@dataclass
class Task:
    """What a pipeline gives the loop.

    ``loss(model, batch, generator)`` returns a scalar; ``model`` may be the DDP wrapper, and
    ``batch`` is already on the device. ``write_grid(model, path)`` writes a PNG grid of samples
    from the given model (the EMA copy when there is one).
    """

    model: nn.Module
    dataset: Dataset
    loss: LossFn
    collate: Callable[[list], Any] | None = None
    write_grid: GridFn | None = None
    use_ema: bool = True
    # parameter names whose channels a channel-sparse run may tie (sparse.tie_stream): the
    # writers of each residual-stream segment of the model
    stream_groups: list[list[str]] = field(default_factory=list)
    # parameter names whose channels a channel-sparse run always ties: channels that only
    # condense together (a transformer's query and key channels, which meet in one product)
    channel_groups: list[list[str]] = field(default_factory=list)


@dataclass
class TrainState:
    """Where the loop is: optimizer steps done and the data position."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0


class EpochBatches:
    """A seeded, resumable batch order: epoch e is a permutation seeded by (seed, e).

    Each rank takes its own slice of every global batch, so DDP ranks never see the same sample
    in one step. A dataset smaller than one global batch wraps around.
    """

    def __init__(self, n: int, batch_size: int, seed: int, rank: int = 0, world: int = 1) -> None:
        if n < 1:
            raise ValueError("the dataset is empty")
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world
        self.global_batch = batch_size * world
        self.num_batches = max(1, n // self.global_batch)

    def epoch(self, epoch: int) -> list[list[int]]:
        """The index lists this rank reads in ``epoch``."""
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        perm = torch.randperm(self.n, generator=gen)
        out = []
        for b in range(self.num_batches):
            start = b * self.global_batch + self.rank * self.batch_size
            idx = [(start + i) % self.n for i in range(self.batch_size)]
            out.append(perm[idx].tolist())
        return out


def _tied(task: Task, sparse_cfg: SparseSettings) -> list[list[str]]:
    """The channel groups the engine ties (channel granularity): the task's channel groups,
    and its stream groups with sparse.tie_stream."""
    if sparse_cfg.granularity != "channel" or sparse_cfg.method == "dense":
        return []
    if sparse_cfg.tie_stream and not task.stream_groups:
        raise ValueError("sparse.tie_stream = true, but this model has no residual stream to tie")
    return task.channel_groups + (task.stream_groups if sparse_cfg.tie_stream else [])


def learning_rate(cfg: TrainConfig, world_size: int) -> float:
    """LDM's rule: lr = base_lr x batch x world x accumulation, unless ``lr`` is set."""
    if cfg.lr > 0:
        return cfg.lr
    return cfg.base_lr * cfg.batch_size * world_size * cfg.grad_accum


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def seed_stage(seed: int, stage: str) -> None:
    """Seed the global RNG for one stage of a run from (seed, stage) alone.

    Whatever ran before (a stage trained, resumed or loaded from disk), the stage's own random
    draws (its model's initial weights) come out the same, so resume is exact at every point.
    """
    digest = hashlib.sha256(f"{seed}:{stage}".encode()).digest()
    torch.manual_seed(int.from_bytes(digest[:8], "big") >> 1)


def _logged_step(line: str) -> float:
    """The step of a metrics.jsonl line; infinity for a line a kill cut short."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def _step_generator(device: torch.device, seed: int, rank: int, step: int) -> torch.Generator:
    """Per-step noise generator: stateless, so resume needs no generator state."""
    gen = torch.Generator(device=device)
    gen.manual_seed((seed * 1_000_003 + rank) * 10_000_019 + step)
    return gen


class Trainer:
    """Runs one training stage of a pipeline; see the module docstring."""

    def __init__(
        self,
        task: Task,
        cfg: TrainConfig,
        run_dir: str | Path,
        dist: Dist,
        seed: int = 0,
        sparse_cfg: SparseSettings | None = None,
        checkpoint_name: str = "checkpoint.pt",
        log_name: str = "metrics.jsonl",
        desc: str = "train",
    ) -> None:
        self.task, self.cfg, self.dist, self.seed = task, cfg, dist, seed
        self.run_dir = Path(run_dir)
        self.checkpoint_path = self.run_dir / checkpoint_name
        self.log_path = self.run_dir / log_name
        self.desc = desc
        if dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        # the same records as metrics.jsonl, per stage (desc); rank 0 only, off without the package
        tensorboard = dist.is_main and cfg.tensorboard
        self.events = EventLog(stage_dir(self.run_dir, desc) if tensorboard else None)
        weakref.finalize(self, self.events.close)  # teardown: flush and close with the trainer
        self.device = dist.device
        self.model = task.model.to(self.device)
        self.ema = EMA(self.model, cfg.ema_decay, cfg.ema_warmup) if task.use_ema else None
        self.wrapped: nn.Module = self.model
        if dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.wrapped = DistributedDataParallel(self.model, device_ids=ids)
        self.lr = learning_rate(cfg, dist.world_size)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            params,
            lr=self.lr,
            weight_decay=cfg.weight_decay,
            fused=self.device.type == "cuda" or None,
        )
        self.sparse: SparseTraining | None = None
        if sparse_cfg is not None:
            self.sparse = SparseTraining(
                self.wrapped,
                self.optimizer,
                sparse_cfg,
                total_steps=cfg.steps,
                ema=self.ema.module if self.ema else None,
                seed=seed,
                tied=_tied(task, sparse_cfg),
            )
        self.condensed = self._condensed(cfg.condensed)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.precision == "fp16")
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
        self.batches = EpochBatches(
            len(task.dataset), cfg.batch_size, seed, dist.rank, dist.world_size
        )
        self.state = TrainState()
        self._losses: list[torch.Tensor] = []  # since the last log line (on the device)

    def _condensed(self, setting: str) -> CondensedTraining | None:
        """Condensed training where the setting and the run allow it (``train.condensed``)."""
        issue = condensed_issue(self.sparse, self.dist.enabled)
        if setting == "on" and issue:
            raise ValueError(f"train.condensed = 'on', but {issue}")
        if setting == "off" or issue:
            return None
        if self.dist.is_main and self.cfg.progress:
            tqdm.write(
                f"[{self.desc}] training through the condensed network between mask updates "
                "(train.condensed; 'off' trains the masked full-width model)",
                file=sys.stderr,
            )
        return CondensedTraining(self.model, self.sparse)

    # ----------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Everything resume needs, as tensors and plain containers."""
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "loop": {
                "step": self.state.step,
                "epoch": self.state.epoch,
                "batch_in_epoch": self.state.batch_in_epoch,
                # losses of the steps since the last log line: the next line averages them all
                "pending_losses": torch.stack(self._losses).cpu() if self._losses else None,
            },
            "rng": rng_state(),
        }
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        if self.sparse is not None:
            state["sparse"] = self.sparse.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a checkpoint into this trainer."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        if self.sparse is not None:
            self.sparse.load_state_dict(state["sparse"])
        loop = state["loop"]
        self.state = TrainState(loop["step"], loop["epoch"], loop["batch_in_epoch"])
        pending = loop.get("pending_losses")
        self._losses = [] if pending is None else list(pending.to(self.device).unbind())
        set_rng_state(state["rng"])

    def save(self) -> None:
        """Atomic checkpoint (rank 0 only)."""
        if self.dist.is_main:
            save_atomic(self.state_dict(), self.checkpoint_path)

    def maybe_resume(self) -> bool:
        """Load the run's checkpoint when there is one; forget log records past it.

        Steps after the checkpoint are trained again, so their records would appear twice.
        """
        found = self.checkpoint_path.exists()
        if found:
            self.load_state_dict(load_checkpoint(self.checkpoint_path, map_location=self.device))
        if self.dist.is_main and self.log_path.exists():
            lines = self.log_path.read_text().splitlines()
            kept = [line for line in lines if _logged_step(line) <= self.state.step]
            if len(kept) < len(lines):
                write_text(self.log_path, "".join(line + "\n" for line in kept))
        self.events.resume_at(self.state.step)
        return found

    # ----------------------------------------------------------------------------- data
    def _data(self) -> Iterator[Any]:
        """Batches from the saved position on, forever; reports skipped files per epoch."""
        while True:
            order = self.batches.epoch(self.state.epoch)[self.state.batch_in_epoch :]
            loader = DataLoader(
                self.task.dataset,
                batch_sampler=order,
                collate_fn=self.task.collate,
                num_workers=self.cfg.num_workers,
                pin_memory=self.device.type == "cuda",
            )
            for batch in loader:
                self.state.batch_in_epoch += 1
                if batch is not None:
                    yield batch
            report = getattr(self.task.dataset, "pop_skipped_report", lambda: None)()
            if report and self.dist.is_main:
                tqdm.write(f"[{self.desc}] epoch {self.state.epoch}: {report}", file=sys.stderr)
            self.state.epoch += 1
            self.state.batch_in_epoch = 0

    # ----------------------------------------------------------------------------- loop
    def train(self) -> TrainState:
        """Train until ``cfg.steps`` (or ``cfg.stop_at``); returns the final state."""
        cfg = self.cfg
        end = min(cfg.steps, cfg.stop_at) if cfg.stop_at > 0 else cfg.steps
        data = self._data()
        bar = tqdm(
            total=cfg.steps,
            initial=self.state.step,
            desc=self.desc,
            disable=not (self.dist.is_main and cfg.progress),
            dynamic_ncols=True,
        )
        tick = time.perf_counter()
        steps_since = 0
        self.model.train()
        while self.state.step < end:
            loss = self._optimizer_step(data)
            self.state.step += 1
            steps_since += 1
            self._losses.append(loss)
            bar.update(1)
            step = self.state.step
            if step % cfg.log_every == 0 or step == end:
                rate = steps_since / max(time.perf_counter() - tick, 1e-9)
                mean_loss = float(torch.stack(self._losses).mean())  # the only sync for the loss
                if not math.isfinite(mean_loss) and self.amp_dtype is None:
                    raise FloatingPointError(
                        f"[{self.desc}] the loss became {mean_loss} by step {step}: the learning "
                        "rate may be too high, or the noise schedule (diffusion.beta_*) broken"
                    )
                record = self._log(step, mean_loss, rate)
                postfix = {"loss": f"{record['loss']:.4f}", "step/s": f"{rate:.2f}"}
                if "density" in record:
                    postfix["density"] = f"{record['density']:.3f}"
                bar.set_postfix(postfix)
                self._losses, steps_since, tick = [], 0, time.perf_counter()
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < end:
                self.save()
            if cfg.sample_every and step % cfg.sample_every == 0 and step < cfg.steps:
                self.write_grid(self.run_dir / "samples" / f"step-{step:07d}.png")
        bar.close()
        if self.sparse is not None and self.dist.enabled:
            self.sparse.verify_consistent()  # one all-reduce: masks must agree on every rank
        self.save()
        return self.state

    def _optimizer_step(self, data: Iterator[Any]) -> torch.Tensor:
        """One optimizer step over ``grad_accum`` micro-batches; returns the mean loss.

        The loss stays on the device (no host sync per step); it is read at log time.
        """
        cfg = self.cfg
        gen = _step_generator(self.device, self.seed, self.dist.rank, self.state.step)
        total = torch.zeros((), device=self.device)
        net: Any = self.wrapped  # the full width where RigL reads the dense gradient
        if self.condensed is not None and not self.sparse.dense_gradient_next():
            net = self.condensed
        for micro in range(cfg.grad_accum):
            batch = _to_device(next(data), self.device)
            last = micro == cfg.grad_accum - 1
            sync = self.wrapped.no_sync() if self.dist.enabled and not last else nullcontext()
            with sync:
                with torch.autocast(
                    self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None
                ):
                    loss = self.task.loss(net, batch, gen) / cfg.grad_accum
                self.scaler.scale(loss).backward()
            total += loss.detach().float()
        if cfg.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            if self.sparse is not None:
                self.sparse.clip_grad_norm_(cfg.grad_clip)
            else:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.scaler.step(self.optimizer)  # the sparse engine acts in the optimizer's step hooks
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model)
        return total

    def _log(self, step: int, loss: float, rate: float) -> dict[str, Any]:
        record: dict[str, Any] = {
            "step": step,
            "loss": all_mean(loss, self.dist),
            "lr": self.lr,
            "steps_per_s": rate,
            "epoch": self.state.epoch,
            "time": time.time(),
        }
        if self.sparse is not None:
            stats = self.sparse.stats()
            for key in ("density", "itop_rate", "prune_fraction", "churn", "update_time_s"):
                if stats.get(key) is not None:
                    record[key] = float(stats[key])
            record["last_update_step"] = stats.get("last_update_step")
        if self.dist.is_main:
            with open(self.log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            self.events.scalars(
                step, {k: v for k, v in record.items() if k not in ("step", "time")}, "train/"
            )
        return record

    @torch.no_grad()
    def write_grid(self, path: Path) -> None:
        """A sample grid from the EMA model (or the live one), rank 0 only."""
        if self.task.write_grid is None or not self.dist.is_main:
            return
        model = self.ema.module if self.ema is not None else self.model
        was_training = model.training
        model.eval()
        path.parent.mkdir(parents=True, exist_ok=True)
        self.task.write_grid(model, path)
        self.events.image("samples", path, self.state.step)
        model.train(was_training)
