import json
import os

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from sparsediff.config import TrainConfig
from sparsediff.sparsity import SparseSettings
from sparsediff.training import checkpoint
from sparsediff.training.distributed import Dist
from sparsediff.training.loop import EpochBatches, Task, Trainer, learning_rate

CPU = Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def make_task(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(6, 32), nn.SiLU(), nn.Linear(32, 32), nn.SiLU(), nn.Linear(32, 2)
    )
    data = TensorDataset(torch.randn(40, 6), torch.randn(40, 2))

    def loss(m, batch, gen):
        x, y = batch
        noise = torch.randn(x.shape, generator=gen)  # per-step randomness, like diffusion noise
        return ((m(x + 0.1 * noise) - y) ** 2).mean()

    return Task(model, data, loss, collate=lambda b: tuple(torch.stack(t) for t in zip(*b)))


def trainer(run_dir, stop_at=0, steps=12):
    cfg = TrainConfig(
        steps=steps,
        batch_size=8,
        lr=1e-2,
        grad_accum=2,
        grad_clip=1.0,
        ema_decay=0.9,
        checkpoint_every=5,
        log_every=3,
        stop_at=stop_at,
        progress=False,
    )
    sparse = SparseSettings(method="rigl", sparsity=0.6, update_interval=2, prune_ratio=0.3)
    return Trainer(make_task(), cfg, run_dir, CPU, seed=1, sparse_cfg=sparse)


def flat_state(t: Trainer):
    out = {f"model.{k}": v for k, v in t.model.state_dict().items()}
    out.update({f"ema.{k}": v for k, v in t.ema.module.state_dict().items()})
    out.update({f"mask.{k}": v for k, v in t.sparse.masks.items()})
    for i, state in enumerate(t.optimizer.state.values()):
        out.update({f"opt{i}.{k}": v for k, v in state.items() if torch.is_tensor(v)})
    return out


def test_resume_is_bit_exact(tmp_path):
    straight = trainer(tmp_path / "a")
    straight.train()
    first = trainer(tmp_path / "b", stop_at=7)  # interrupted mid-epoch, off a checkpoint step
    assert first.train().step == 7
    resumed = trainer(tmp_path / "b")
    assert resumed.maybe_resume() and resumed.state.step == 7
    resumed.train()
    a, b = flat_state(straight), flat_state(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert straight.sparse.stats()["density"] == pytest.approx(0.4, abs=0.01)


def test_masked_weights_stay_zero_in_model_and_ema(tmp_path):
    t = trainer(tmp_path)
    t.train()
    params = dict(t.model.named_parameters())
    ema = dict(t.ema.module.named_parameters())
    for name, mask in t.sparse.masks.items():
        assert torch.all(params[name][~mask] == 0)
        assert torch.all(ema[name][~mask] == 0)


def test_metrics_log_and_checkpoint_written(tmp_path):
    t = trainer(tmp_path)
    t.train()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [3, 6, 9, 12]
    assert all("density" in r and r["loss"] > 0 for r in lines)
    state = checkpoint.load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["loop"]["step"] == 12 and "sparse" in state and "ema" in state


def test_epoch_batches_are_seeded_and_disjoint_across_ranks():
    ranks = [EpochBatches(40, 4, seed=3, rank=r, world=2) for r in range(2)]
    assert ranks[0].num_batches == 5
    for b0, b1 in zip(ranks[0].epoch(0), ranks[1].epoch(0)):
        assert not set(b0) & set(b1)
    assert ranks[0].epoch(1) == EpochBatches(40, 4, seed=3, rank=0, world=2).epoch(1)
    assert ranks[0].epoch(0) != ranks[0].epoch(1)
    with pytest.raises(ValueError, match="empty"):
        EpochBatches(0, 4, seed=0)


def test_learning_rate_follows_the_ldm_rule():
    cfg = TrainConfig(batch_size=12, base_lr=2e-6)
    assert learning_rate(cfg, 1) == pytest.approx(2.4e-5)  # the study's LSUN-Bedrooms value
    assert learning_rate(TrainConfig(batch_size=12, grad_accum=2), 4) == pytest.approx(1.92e-4)
    assert learning_rate(TrainConfig(lr=1e-3), 8) == 1e-3


def test_atomic_save_keeps_previous_checkpoint_on_failure(tmp_path, monkeypatch):
    path = tmp_path / "ck.pt"
    checkpoint.save_atomic({"x": torch.ones(2)}, path)

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        checkpoint.save_atomic({"x": torch.zeros(2)}, path)
    assert torch.equal(checkpoint.load_checkpoint(path)["x"], torch.ones(2))


def test_checkpoints_refuse_pickled_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(Exception, match="(?i)weights_only|unsupported|global"):
        checkpoint.load_checkpoint(tmp_path / "evil.pt")
