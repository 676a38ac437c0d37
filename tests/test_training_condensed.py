"""Condensed training (sparsediff.training.condensed) is masked training, computed narrower:
the same weights, EMA, optimizer state and masks after steps that span mask updates, for the
UNet (stream tied and not), the GRU's units and the DiT's heads and neurons."""

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from sparsediff.config import TrainConfig
from sparsediff.models.chirodiff import BiGRUDenoiser
from sparsediff.models.dit import CHANNEL_EXCLUDE, attention_groups, build_dit, dit_eps
from sparsediff.models.unet import build_unet, stream_groups
from sparsediff.sparsity import SparseSettings
from sparsediff.training import condensed as condensed_module
from sparsediff.training.distributed import Dist
from sparsediff.training.loop import Task, Trainer

CPU = Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
STEPS = 7  # mask updates at steps 2 and 4 (every 2 steps, until 75% of the run)
# float64 on both sides; the two differ only in the order of float operations (narrower
# matmuls and convolutions), so ~1e-16 relative per step: 1e-10 leaves room for 7 Adam steps
# and catches any wrong gradient, which moves weights by ~lr = 1e-2
TOL = 1e-10


def _stack(batch):
    return tuple(torch.stack(t) for t in zip(*batch))


def unet_task(tied: bool) -> tuple[Task, SparseSettings]:
    torch.manual_seed(0)
    model = build_unet("tiny").double()
    with torch.no_grad():  # biases and norms away from their init, so dead channels matter
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    data = TensorDataset(torch.randn(24, 3, 8, 8, dtype=torch.float64))

    def loss(net, batch, gen):
        (x,) = batch
        t = torch.randint(0, 1000, (x.shape[0],), generator=gen)
        target = torch.randn(x.shape, generator=gen, dtype=x.dtype)
        return (net(x, t).sample - target).square().mean()

    groups = stream_groups(model) if tied else []
    task = Task(model, data, loss, collate=_stack, stream_groups=groups)
    return task, SparseSettings(granularity="channel", tie_stream=tied)


def gru_task() -> tuple[Task, SparseSettings]:
    torch.manual_seed(0)
    model = BiGRUDenoiser(hidden=16, layers=2, time_dim=8, num_timesteps=35).double()
    data = TensorDataset(torch.randn(24, 10, 3, dtype=torch.float64))

    def loss(net, batch, gen):
        (x,) = batch
        t = torch.randint(0, 35, (x.shape[0],), generator=gen)
        lengths = torch.randint(2, 11, (x.shape[0],), generator=gen)
        return (net(x, t, lengths) - x).square().mean()

    return Task(model, data, loss, collate=_stack), SparseSettings(granularity="unit")


def dit_task() -> tuple[Task, SparseSettings]:
    torch.manual_seed(0)
    model = build_dit("tiny", 8, 3, 10, num_layers=2).double()
    data = TensorDataset(torch.randn(24, 3, 8, 8, dtype=torch.float64), torch.arange(24) % 10)

    def loss(net, batch, gen):
        x, y = batch
        t = torch.randint(0, 1000, (x.shape[0],), generator=gen)
        return (dit_eps(net, x, t, y) - x).square().mean()

    task = Task(model, data, loss, collate=_stack, channel_groups=attention_groups(model))
    return task, SparseSettings(granularity="channel", exclude=list(CHANNEL_EXCLUDE))


def chase_task() -> tuple[Task, SparseSettings]:
    task, _ = unet_task(False)
    return task, SparseSettings(granularity="chase", channel_sparsity=0.5)


TASKS = {
    "unet": lambda: unet_task(False),
    "unet-chase": chase_task,
    "unet-tied": lambda: unet_task(True),
    "gru": gru_task,
    "dit": dit_task,
}


def train(tmp_path, kind, method, condensed, stop_at=0, name=None):
    task, settings = TASKS[kind]()
    settings = SparseSettings.of(
        settings,
        method=method,
        sparsity=0.5,
        update_interval=2,
        prune_ratio=0.5,  # half of a layer's live rows move at each update: tiny layers too
        prune_schedule="constant",
    )
    cfg = TrainConfig(
        steps=STEPS,
        batch_size=6,
        lr=1e-2,
        grad_clip=1.0,
        ema_decay=0.9,
        checkpoint_every=3,
        log_every=2,
        progress=False,
        tensorboard=False,
        condensed=condensed,
        stop_at=stop_at,
    )
    run = tmp_path / (name or f"{kind}-{method}-{condensed}")
    t = Trainer(task, cfg, run, CPU, seed=1, sparse_cfg=settings)
    t.maybe_resume()
    t.train()
    return t


def flat_state(t: Trainer) -> dict[str, torch.Tensor]:
    out = {f"model.{k}": v for k, v in t.model.state_dict().items()}
    out.update({f"ema.{k}": v for k, v in t.ema.module.state_dict().items()})
    out.update({f"mask.{k}": v for k, v in t.sparse.masks.items()})
    for i, state in enumerate(t.optimizer.state.values()):
        out.update({f"opt{i}.{k}": v for k, v in state.items() if torch.is_tensor(v)})
    return out


def worst_difference(a: Trainer, b: Trainer) -> tuple[float, str]:
    """The largest difference of any state entry, relative to that tensor's scale."""
    sa, sb = flat_state(a), flat_state(b)
    assert sa.keys() == sb.keys()
    worst, where = 0.0, ""
    for key in sa:
        x, y = sa[key].double(), sb[key].double()
        diff = float((x - y).abs().max()) / max(1.0, float(x.abs().max())) if x.numel() else 0.0
        if diff > worst:
            worst, where = diff, key
    return worst, where


@pytest.mark.parametrize("kind", sorted(set(TASKS) - {"unet-chase"}))
@pytest.mark.parametrize("method", ["static", "rigl", "magran"])
def test_condensed_training_is_masked_training(tmp_path, single_thread, kind, method):
    masked = train(tmp_path, kind, method, "off")
    narrow = train(tmp_path, kind, method, "on")
    assert masked.condensed is None and narrow.condensed is not None
    assert narrow.condensed.plan, "nothing was condensed: the test would prove nothing"
    # Static plans once; RigL and MagRan again after each of their 2 updates
    assert narrow.condensed.rebuilds == (1 if method == "static" else 3)
    worst, where = worst_difference(masked, narrow)
    assert worst <= TOL, f"{where}: {worst:.2e}"
    # the masks changed (so the comparison spans updates): rows came alive that were not
    stats = narrow.sparse.stats()
    assert (stats["itop_rate"] > stats["density"] + 0.05) == (method != "static")


def test_chase_trains_condensed_as_its_rows_leave(tmp_path, single_thread):
    """Chase removes rows at every update (unstructured inside the live ones): each rebuild
    drops more, and the training stays the masked one."""
    masked = train(tmp_path, "unet-chase", "rigl", "off")
    narrow = train(tmp_path, "unet-chase", "rigl", "on")
    assert narrow.condensed.rebuilds == 3 and narrow.condensed.plan
    worst, where = worst_difference(masked, narrow)
    assert worst <= TOL, f"{where}: {worst:.2e}"


def test_a_wrong_mapping_is_caught(tmp_path, single_thread, monkeypatch):
    """Planning live rows by the weights' values instead of the masks: a row that RigL just
    grew holds zeros, would count as dead and never train. The comparison must see it."""
    masked = train(tmp_path, "unet", "rigl", "off")

    def by_values(self):
        from sparsediff.models.condense import condense

        with torch.no_grad():
            self.net, self.plan = condense(self.model)
        self.live = None  # the stream too: read from the values
        self.net.train(self.model.training)
        self._version = self.sparse.mask_version
        self.rebuilds += 1

    monkeypatch.setattr(condensed_module.CondensedTraining, "_rebuild", by_values)
    wrong = train(tmp_path, "unet", "rigl", "on")
    worst, _ = worst_difference(masked, wrong)
    assert worst > 1e-4


def test_condensed_resume_is_bit_exact(tmp_path, single_thread):
    straight = train(tmp_path, "unet-tied", "rigl", "on", name="a")
    first = train(tmp_path, "unet-tied", "rigl", "on", stop_at=5, name="b")  # mid-interval
    assert first.state.step == 5
    resumed = train(tmp_path, "unet-tied", "rigl", "on", name="b")
    a, b = flat_state(straight), flat_state(resumed)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_auto_trains_condensed_only_where_it_can(tmp_path, single_thread):
    task, _ = unet_task(False)
    cfg = TrainConfig(steps=1, batch_size=6, progress=False, tensorboard=False)
    unstructured = SparseSettings(method="rigl", sparsity=0.5)
    t = Trainer(task, cfg, tmp_path / "u", CPU, sparse_cfg=unstructured)
    assert t.condensed is None
    channel = SparseSettings(method="rigl", sparsity=0.5, granularity="channel")
    assert Trainer(task, cfg, tmp_path / "c", CPU, sparse_cfg=channel).condensed is not None
    on = TrainConfig(steps=1, batch_size=6, progress=False, tensorboard=False, condensed="on")
    with pytest.raises(ValueError, match="leaves no whole row dead"):
        Trainer(task, on, tmp_path / "x", CPU, sparse_cfg=unstructured)
    with pytest.raises(ValueError, match="nothing to condense"):
        Trainer(task, on, tmp_path / "y", CPU, sparse_cfg=SparseSettings())


def test_condensed_steps_compute_less(single_thread):
    """The narrow network is what runs: fewer FLOPs per training step than the full width."""
    from torch.utils.flop_counter import FlopCounterMode

    from sparsediff.sparsity import SparseTraining
    from sparsediff.training.condensed import CondensedTraining

    task, _ = unet_task(True)
    model = task.model
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sparse = SparseTraining(
        model,
        opt,
        method="static",
        sparsity=0.5,
        granularity="channel",
        total_steps=10,
        tied=task.stream_groups,
    )
    narrow = CondensedTraining(model, sparse)
    x, t = torch.randn(4, 3, 8, 8, dtype=torch.float64), torch.tensor([1, 2, 3, 4])

    def step_flops(net: nn.Module) -> int:
        with FlopCounterMode(display=False) as counter:
            net(x, t).sample.square().mean().backward()
        return counter.get_total_flops()

    assert step_flops(narrow) < 0.7 * step_flops(model)
