"""Tied channel groups: layers that switch their channels on and off together."""

import math

import pytest
import torch
from sparse_helpers import ema_update, make_sparse, saved_and_loaded
from torch import nn

from sparsediff.sparsity import SparseTraining
from sparsediff.sparsity.granularity import Channel
from sparsediff.sparsity.methods import METHODS

# float results compared across two computations: CI runs these under other CPU kernels too
pytestmark = pytest.mark.kernels


class _Residual(nn.Module):
    """A residual stream of 8 channels written by two convs, and a private 12-channel layer."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.inner = nn.Conv2d(8, 12, 3, padding=1)
        self.back = nn.Conv2d(12, 8, 1)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        h = self.stem(x)
        h = h + self.back(torch.relu(self.inner(h)))
        return self.head(h.mean((2, 3)))


STREAM = [["stem.weight", "back.weight"]]


def _make(method, seed=3, tied=STREAM):
    torch.manual_seed(0)
    model, ema = _Residual(), _Residual()
    ema.load_state_dict(model.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sparse = make_sparse(
        model,
        opt,
        method=method,
        sparsity=0.5,
        granularity="channel",
        prune_ratio=0.5,
        update_interval=2,
        total_steps=40,
        ema=ema,
        seed=seed,
        tied=tied,
    )
    return model, ema, opt, sparse


def _step(model, opt, ema, step):
    g = torch.Generator().manual_seed(step)
    x, y = torch.randn(4, 3, 5, 5, generator=g), torch.randn(4, 2, generator=g)
    opt.zero_grad(set_to_none=True)
    (model(x) - y).pow(2).mean().backward()
    opt.step()
    ema_update(ema, model, 0.8)


def _rows(mask):
    return mask.reshape(mask.shape[0], -1)[:, 0]


@pytest.mark.parametrize("method", ["static", "rigl", "magran"])
def test_tied_layers_share_their_channels_through_updates_and_resume(method, single_thread):
    model, ema, opt, sparse = _make(method)
    masks = sparse.masks
    active = sparse.stats()["active"]
    total = sparse.stats()["maskable"]
    assert abs(active - total / 2) <= max(m[0].numel() for m in masks.values()) / 2
    moved = 0
    for step in range(1, 11):
        before = _rows(masks["stem.weight"]).clone()
        _step(model, opt, ema, step)
        stem, back = _rows(masks["stem.weight"]), _rows(masks["back.weight"])
        assert torch.equal(stem, back)  # one mask for the group
        assert 0 < int(stem.sum()) < 8
        assert sparse.stats()["active"] == active
        moved += int((before != stem).sum())
        for name, p in model.named_parameters():
            if name in masks:
                assert torch.all(p[~masks[name]] == 0)
                assert torch.all(dict(ema.named_parameters())[name][~masks[name]] == 0)
    assert (moved > 0) == (method != "static")
    # resume: the tied groups are part of the state; 5 + 5 steps == 10 straight
    model2, ema2, opt2, sparse2 = _make(method)
    for step in range(1, 6):
        _step(model2, opt2, ema2, step)
    saved = saved_and_loaded([x.state_dict() for x in (model2, ema2, opt2, sparse2)])
    model3, ema3, opt3, sparse3 = _make(method, seed=11)
    for obj, state in zip((model3, ema3, opt3, sparse3), saved):
        obj.load_state_dict(state)
    for step in range(6, 11):
        _step(model3, opt3, ema3, step)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), model3.parameters()))
    assert all(torch.equal(masks[n], sparse3.masks[n]) for n in masks)
    _, _, _, untied = _make(method, tied=())
    with pytest.raises(ValueError, match="other tied channel groups"):
        untied.load_state_dict(saved[3])


def test_tied_update_by_hand_joins_the_members_norms():
    # two 4-row Linears tied, 2 rows active; p = 0.5 drops one row and grows one.
    a, b = nn.Linear(2, 4, bias=False), nn.Linear(3, 4, bias=False)
    model = nn.ModuleDict({"a": a, "b": b})
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    sparse = make_sparse(
        model,
        opt,
        sparsity=0.5,
        granularity="channel",
        update_interval=1,
        prune_ratio=0.5,
        total_steps=10,
        tied=[["a.weight", "b.weight"]],
    )
    state = sparse.state_dict()
    rows = torch.tensor([True, True, False, False])
    for name, layer in (("a.weight", a), ("b.weight", b)):
        state["masks"][name] = rows[:, None].expand_as(layer.weight).clone()
    sparse.load_state_dict(state)
    # row 0: a alone has the larger L1 norm (3 > 2) but the joint L2 norm of row 1 is larger
    # (sqrt(5) + ... : row 0 sqrt(9) = 3, row 1 sqrt(4 + 4 + 1) = 3 too; break with b's 0.5)
    with torch.no_grad():
        a.weight.copy_(torch.tensor([[3.0, 0], [2, 0], [0, 0], [0, 0]]))
        b.weight.copy_(torch.tensor([[0.0, 0, 0], [2, 1, 0.5], [0, 0, 0], [0, 0, 0]]))
    # gradients: a's row 2 is largest alone (2.0), the joint norm of row 3 is larger (1.5, 1.5)
    a.weight.grad = torch.tensor([[0.0, 0], [0, 0], [2.0, 0], [1.5, 0]])
    b.weight.grad = torch.tensor([[0.0, 0, 0], [0, 0, 0], [0, 0, 0], [1.5, 0, 0]])
    opt.step()
    # row 0 (joint norm 3) is dropped, not row 1 (sqrt(9.25)); row 3 (sqrt(4.5)) grows, not 2
    assert _rows(sparse.masks["a.weight"]).tolist() == [False, True, False, True]
    assert torch.equal(sparse.masks["a.weight"][:, :1], sparse.masks["b.weight"][:, :1])
    assert a.weight[0].tolist() == [0.0, 0.0] and b.weight[1].tolist() == [2.0, 1.0, 0.5]
    assert sparse.stats()["layer_churn"]["b.weight"] == {"dropped": 3, "grown": 3}


def test_tied_plan_gives_a_group_its_members_joint_density():
    # uniform 50%: the group (8 rows of 27 + 8 rows of 12) keeps 4 rows in both members
    shapes = {"stem": (8, 3, 3, 3), "inner": (12, 8, 3, 3), "back": (8, 12, 1, 1)}
    plan = METHODS["rigl"].plan(shapes, Channel(), 0.5, "uniform", 1.0, [["stem", "back"]])
    assert plan == {"stem": 4, "inner": 6, "back": 4}
    # ERK: alone the 1x1 conv is dense and the 3x3 sparse; tied, they keep the same count and
    # the global count of active weights stays within half the group's channel of the target
    shapes = {"stem": (16, 16, 3, 3), "inner": (32, 16, 3, 3), "back": (16, 32, 1, 1)}
    alone = METHODS["rigl"].plan(shapes, Channel(), 0.5, "erk", 1.0)
    tied = METHODS["rigl"].plan(shapes, Channel(), 0.5, "erk", 1.0, [["stem", "back"]])
    assert alone["back"] == 16 and alone["stem"] < 16
    assert tied["stem"] == tied["back"] < 16
    per_row = {name: math.prod(s[1:]) for name, s in shapes.items()}
    active = sum(tied[name] * per_row[name] for name in shapes)
    target = sum(math.prod(s) for s in shapes.values()) / 2
    assert abs(active - target) <= (per_row["stem"] + per_row["back"]) / 2


@pytest.mark.parametrize(
    ("tied", "granularity", "message"),
    [
        ([["stem.weight", "back.weight"]], "unstructured", "need granularity 'channel'"),
        ([["stem.weight", "nope.weight"]], "channel", "not maskable"),
        ([["stem.weight", "inner.weight"]], "channel", "different row counts"),
        (
            [["stem.weight", "back.weight"], ["back.weight", "head.weight"]],
            "channel",
            "overlap",
        ),
    ],
)
def test_tied_groups_are_checked(tied, granularity, message):
    model = _Residual()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=message):
        SparseTraining(model, opt, sparsity=0.5, granularity=granularity, total_steps=10, tied=tied)
