"""Methods as objects, granularities (unstructured, channel, n:m) and the optimizer-state rule."""

import math

import pytest
import torch
from sparse_helpers import (
    GOOD_SETTINGS,
    ema_update,
    linear_engine,
    make_sparse,
    saved_and_loaded,
    step_by_hand,
)
from torch import nn

from sparsediff.sparsity import (
    METHODS,
    SparseSettings,
    SparseTraining,
    check_settings,
    parse_granularity,
)
from sparsediff.sparsity.granularity import NM, Channel, Unstructured
from sparsediff.sparsity.methods import MagRan, Method, RigL

GRANULARITIES = ["unstructured", "channel", "2:4"]


class _Net(nn.Module):
    """Conv, GRU, attention and Linear weights; the first conv's rows (27) do not split into 4s."""

    def __init__(self):
        super().__init__()
        self.conv_in = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.gru = nn.GRU(8, 8, batch_first=True)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        h = self.conv(torch.relu(self.conv_in(x)))
        seq = h.flatten(2).transpose(1, 2)  # (batch, 16, 8)
        seq, _ = self.gru(seq)
        seq, _ = self.attn(seq, seq, seq)
        return self.head(seq.mean(1))


def _net(seed=0):
    torch.manual_seed(seed)
    return _Net()


def _step(model, opt, step, ema):
    g = torch.Generator().manual_seed(step)
    x, y = torch.randn(4, 3, 4, 4, generator=g), torch.randn(4, 4, generator=g)
    opt.zero_grad(set_to_none=True)
    (model(x) - y).pow(2).mean().backward()
    opt.step()
    ema_update(ema, model, 0.8)


def _make(method, granularity, seed=3):
    model, ema = _net(), _net()
    ema.load_state_dict(model.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    sparse = make_sparse(
        model,
        opt,
        method=method,
        sparsity=0.5,
        granularity=granularity,
        prune_ratio=0.5,
        ema=ema,
        seed=seed,
    )
    return model, ema, opt, sparse


def _check_pattern(method, granularity, sparse, model, ema, opt):
    params, ema_params = dict(model.named_parameters()), dict(ema.named_parameters())
    for name, mask in sparse.masks.items():
        rows = mask.reshape(mask.shape[0], -1)
        if method == "dense":
            assert mask.all()
        elif granularity == "channel":  # whole rows on or off
            assert torch.equal(rows, rows[:, :1].expand_as(rows))
        elif granularity == "2:4" and name != "conv_in.weight":
            assert torch.all(rows.reshape(-1, 4).sum(1) == 2)  # along the flattened row
        assert torch.all(params[name][~mask] == 0)
        assert torch.all(ema_params[name][~mask] == 0)  # the EMA copy exactly as sparse
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.all(opt.state[params[name]][key][~mask] == 0)


def _expected_active(method, granularity, sparse):
    """The global count of active weights as docs/engine.md states it."""
    masks = sparse.masks
    total = sum(m.numel() for m in masks.values())
    if method == "dense":
        return total, 0
    if granularity == "2:4":  # n/m in every layer that holds the pattern, others dense
        kept = masks["conv_in.weight"].numel()
        return kept + (total - kept) // 2, 0
    if granularity == "channel":  # within half the largest channel of the target
        return total / 2, max(m[0].numel() for m in masks.values()) / 2
    return total / 2, len(masks) / 2  # within half a weight per layer


# conv_in cannot hold 2:4 (tested below)
@pytest.mark.filterwarnings("ignore:granularity .* cannot apply:UserWarning")
@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("method", list(METHODS))
def test_invariants_every_method_and_granularity(method, granularity, single_thread):
    model, ema, opt, sparse = _make(method, granularity)
    target, slack = _expected_active(method, granularity, sparse)
    active = sparse.stats()["active"]
    assert abs(active - target) <= slack
    assert sparse.stats()["granularity"] == granularity
    assert sparse.state_dict()["granularity"] == granularity
    changed = 0
    for step in range(1, 9):
        before = {n: m.clone() for n, m in sparse.masks.items()}
        _step(model, opt, step, ema)
        _check_pattern(method, granularity, sparse, model, ema, opt)
        assert sparse.stats()["active"] == active  # updates keep every layer's density
        changed += sum(int((before[n] != m).sum()) for n, m in sparse.masks.items())
    assert (changed > 0) == (method in ("rigl", "magran"))
    # resume: 4 steps, save, load into fresh objects with another seed, 4 more == 8 straight
    model2, ema2, opt2, sparse2 = _make(method, granularity)
    for step in range(1, 5):
        _step(model2, opt2, step, ema2)
    saved = saved_and_loaded([x.state_dict() for x in (model2, ema2, opt2, sparse2)])
    model3, ema3, opt3, sparse3 = _make(method, granularity, seed=11)
    for obj, state in zip((model3, ema3, opt3, sparse3), saved):
        obj.load_state_dict(state)
    for step in range(5, 9):
        _step(model3, opt3, step, ema3)
    for a, b in ((model, model3), (ema, ema3)):
        assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert all(torch.equal(sparse.masks[n], sparse3.masks[n]) for n in sparse.masks)


def test_methods_are_a_registry_of_small_objects():
    assert list(METHODS) == ["dense", "static", "rigl", "magran"]
    assert ", ".join(METHODS) == "dense, static, rigl, magran" and "rigl" in METHODS
    assert all(isinstance(m, Method) and m.name == n for n, m in METHODS.items())
    # RigL is MagRan with another grow score, and the only method that needs the dense gradient
    assert isinstance(METHODS["rigl"], MagRan) and RigL.drop_score is MagRan.drop_score
    assert [n for n, m in METHODS.items() if m.needs_dense_grad] == ["rigl"]
    assert [n for n, m in METHODS.items() if m.updates_masks] == ["rigl", "magran"]


def test_parse_granularity_and_nm_sparsity_rule():
    assert isinstance(parse_granularity("unstructured"), Unstructured)
    assert isinstance(parse_granularity("channel"), Channel)
    nm = parse_granularity("1:8")
    assert isinstance(nm, NM) and (nm.n, nm.m, nm.name) == (1, 8, "1:8")
    for bad in ("2:2", "0:4", "4:2", "a:b", "2:4 ", "block", 3, None):
        with pytest.raises(ValueError, match=r"^sparse\.granularity must be"):
            parse_granularity(bad, "sparse.granularity")
    good = {**GOOD_SETTINGS, "sparsity": 0.75}
    check_settings(**good, granularity="1:4")
    check_settings(**good, granularity="channel")
    check_settings(**{**good, "method": "dense", "sparsity": 0.0}, granularity="2:4")
    with pytest.raises(ValueError, match=r"^sparse\.sparsity must be 0\.5 \(1 - n/m\)"):
        check_settings(**good, granularity="2:4", prefix="sparse.")
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"^granularity must be"):
        SparseTraining(model, opt, method="rigl", granularity="2-4", total_steps=100)
    with pytest.raises(ValueError, match=r"^sparsity must be 0\.75"):
        SparseTraining(model, opt, method="rigl", sparsity=0.5, granularity="1:4", total_steps=100)
    assert len(opt._optimizer_step_post_hooks) == 0


@pytest.mark.filterwarnings("ignore:granularity .* cannot apply:UserWarning")
def test_sparse_settings_granularity_reaches_the_engine_rules():
    settings = SparseSettings(method="static", sparsity=0.5, granularity="2:4")
    settings.check("sparse.")
    model = _net()
    sparse = SparseTraining(
        model, torch.optim.SGD(model.parameters(), lr=0.1), settings, total_steps=100
    )
    assert sparse.granularity == "2:4" and SparseSettings().granularity == "unstructured"
    assert sparse.settings == settings
    with pytest.raises(ValueError, match=r"^sparse\.granularity"):
        SparseSettings.of(settings, granularity="rows").check("sparse.")


def _two_four(model):
    return SparseTraining(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        method="rigl",
        sparsity=0.5,
        granularity="2:4",
        total_steps=100,
    )


def test_nm_keeps_layers_it_cannot_structure_dense_and_reports_them():
    model = _net()
    with pytest.warns(UserWarning, match=r"conv_in\.weight"):
        sparse = _two_four(model)
    assert sparse.masks["conv_in.weight"].all()  # rows of 3*3*3 = 27 weights
    stats = sparse.stats()
    assert stats["kept_dense"] == ["conv_in.weight"]
    assert stats["layer_density"]["conv.weight"] == 0.5  # distribution does not apply
    assert stats["layer_density"]["gru.weight_ih_l0"] == 0.5
    # also when it fits no layer at all (every row length odd): still said, not silent
    with pytest.warns(UserWarning, match="kept dense"):
        sparse = _two_four(torch.nn.Sequential(torch.nn.Linear(3, 6), torch.nn.Linear(5, 2)))
    assert sparse.stats()["kept_dense"] == ["0.weight", "1.weight"]


def test_nm_select_by_hand():
    # two groups of 4, 2 active each; drop k = 2: the smallest active weights are both in group 0
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1]], dtype=torch.bool)
    drop = torch.tensor([[0.1, 0.2, 0.0, 0.0], [0.0, 0.0, 5.0, 6.0]])
    # group 0 refills two: entry 1 (just dropped, regrown) and entry 3; group 1 is untouched
    grow = torch.tensor([[0.5, 3.0, 1.0, 2.0], [9.0, 9.0, 9.0, 9.0]])
    new = NM(2, 4).select(mask, drop, grow, 2)
    assert torch.equal(new, torch.tensor([[0, 1, 0, 1], [0, 0, 1, 1]], dtype=torch.bool))


def test_channel_rigl_update_by_hand():
    # 4 rows, 2 active; p = 0.5 drops one row: the smallest L2 norm (row 1: sqrt(3.92) < 2.5,
    # though its L1 norm 2.8 is larger). Grow the largest gradient norm among rows inactive
    # after the drop: row 2 (new, starts at 0).
    model, opt, sparse = linear_engine(3, 4, granularity="channel", prune_ratio=0.5, total_steps=10)
    state = sparse.state_dict()
    mask = torch.tensor([[1] * 3, [1] * 3, [0] * 3, [0] * 3], dtype=torch.bool)
    weight = torch.tensor([[2.5, 0, 0], [1.4, 1.4, 0], [0, 0, 0], [0, 0, 0]])
    grad = torch.tensor([[0.0, 0, 0], [1.0, 0, 0], [2.0, 2, 0], [0, 0, 2.5]])
    step_by_hand(model, opt, sparse, state, mask, weight, grad)
    assert sparse.masks["weight"][:, 0].tolist() == [True, False, True, False]
    assert torch.equal(model.weight, torch.tensor([[2.5, 0, 0], [0.0] * 3, [0.0] * 3, [0.0] * 3]))
    # a just-dropped row with the largest gradient norm comes back with its values
    grad = torch.tensor([[0.0, 0, 0], [9.0, 0, 0], [2.0, 2, 0], [0, 0, 2.5]])
    step_by_hand(model, opt, sparse, state, mask, weight, grad)
    assert sparse.masks["weight"][:, 0].tolist() == [True, True, False, False]
    assert model.weight[1].tolist() == pytest.approx([1.4, 1.4, 0.0])
    assert sparse.stats()["dropped"] == 0


def test_channel_plan_rounds_to_whole_channels():
    # a: 10 rows of 4 weights, b: 6 rows of 10; density 0.33 of 100 weights targets 33.
    # floor: a 3 (12 weights), b 1 (10); b's remainder 0.98 is largest and 11 missing > 10/2,
    # so b gets a second channel (32 weights); a's 0.3 would overshoot (1 missing < 4/2).
    shapes = {"a": (10, 4), "b": (6, 10)}
    assert Channel().plan(shapes, {"a": 0.33, "b": 0.33}) == {"a": 3, "b": 2}
    # every layer keeps at least one channel
    assert Channel().plan(shapes, {"a": 0.05, "b": 1.0}) == {"a": 1, "b": 6}


def test_channel_magran_grows_whole_random_channels(single_thread):
    model, opt, sparse = linear_engine(
        2, 40, method="magran", granularity="channel", prune_ratio=0.25, total_steps=50
    )
    ever = torch.zeros(40, dtype=torch.bool)
    for _ in range(30):
        opt.zero_grad()
        (model.weight.view(-1) * torch.linspace(0, 1, 80)).sum().backward()  # fixed ranking
        opt.step()
        ever |= sparse.masks["weight"][:, 0]
        assert int(sparse.masks["weight"][:, 0].sum()) == 20
    assert bool(ever.all())  # random growth visits every channel, a gradient ranking would not


class _Factored(torch.optim.Optimizer):
    """Adafactor-like toy: a row and a column second moment instead of a full one."""

    def __init__(self, params, lr=0.01):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["row"] = torch.zeros(p.shape[0])
                    if p.dim() > 1:
                        state["col"] = torch.zeros(p.shape[1:])
                state["step"] += 1
                state["row"].add_(p.grad.pow(2).reshape(p.shape[0], -1).mean(1))
                p.add_(p.grad, alpha=-group["lr"])


def test_factored_optimizer_state_is_a_clear_error():
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    opt = _Factored(model.parameters())
    SparseTraining(
        model, opt, method="static", sparsity=0.5, distribution="uniform", total_steps=100
    )
    model(torch.randn(3, 4)).sum().backward()
    with pytest.raises(ValueError, match=r"_Factored keeps state 'row' of shape \(8,\)"):
        opt.step()


def test_load_state_dict_checks_granularity_and_reads_old_states():
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sparse = SparseTraining(
        model, opt, method="static", sparsity=0.5, granularity="channel", total_steps=100
    )
    model2 = _net()
    other = SparseTraining(
        model2,
        torch.optim.SGD(model2.parameters(), lr=0.1),
        method="static",
        sparsity=0.5,
        total_steps=100,
    )
    with pytest.raises(ValueError, match="granularity='channel'"):
        other.load_state_dict(sparse.state_dict())
    old = other.state_dict()
    del old["granularity"]  # a state saved before granularity existed is unstructured
    other.load_state_dict(old)
    assert other.granularity == "unstructured" and math.isclose(other.density, 0.5, abs_tol=0.01)


def _gru_model():
    from sparsediff.models.chirodiff import BiGRUDenoiser

    torch.manual_seed(0)
    return BiGRUDenoiser(hidden=16, layers=2, time_dim=8, num_timesteps=35)


def _gru_units(model):
    """Per GRU layer and direction: (live units, every member agrees)."""
    g, out = model.gru, []
    for layer in range(2):
        for sfx in ("", "_reverse"):
            w = getattr(g, f"weight_ih_l{layer}{sfx}").view(3, 16, -1).ne(0).any(-1)
            live = w.any(0)
            hh = getattr(g, f"weight_hh_l{layer}{sfx}").view(3, 16, 16).ne(0)
            biases = [
                getattr(g, f"{k}_l{layer}{sfx}").view(3, 16).ne(0) for k in ("bias_ih", "bias_hh")
            ]
            agree = bool((w == live).all()) and not bool(
                hh[:, ~live].any() or hh[:, :, ~live].any()
            )
            agree = agree and not any(bool(b[:, ~live].any()) for b in biases)
            out.append((int(live.sum()), agree))
    return out


def test_unit_granularity_masks_whole_gru_units_and_keeps_them_through_updates():
    model = _gru_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sparse = SparseTraining(
        model,
        opt,
        method="rigl",
        sparsity=0.5,
        granularity="unit",
        distribution="uniform",
        update_interval=2,
        total_steps=20,
    )
    assert "gru.bias_ih_l0" in sparse.masks  # the biases go with their units
    assert sparse.density == pytest.approx(0.5, abs=0.05)  # the recurrent weight's square
    before = [u for u, _ in _gru_units(model)]
    for _ in range(6):
        x, t = torch.randn(4, 10, 3), torch.randint(0, 35, (4,))
        model(x, t, torch.tensor([10, 7, 5, 3])).square().mean().backward()
        opt.step()
        opt.zero_grad()
    assert sparse.stats()["last_update_step"] == 6  # the engine updated the units
    units = _gru_units(model)
    assert all(agree for _, agree in units) and [u for u, _ in units] == before
    again = _gru_model()  # resume: the masks come back from the state
    resumed = SparseTraining(
        again,
        torch.optim.AdamW(again.parameters(), lr=1e-2),
        method="rigl",
        sparsity=0.5,
        granularity="unit",
        distribution="uniform",
        update_interval=2,
        total_steps=20,
    )
    resumed.load_state_dict(sparse.state_dict())
    assert all(torch.equal(resumed.masks[n], m) for n, m in sparse.masks.items())


def test_chase_removes_the_thinnest_channels_on_schedule_and_keeps_the_density():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 16))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sparse = SparseTraining(
        model,
        opt,
        method="rigl",
        sparsity=0.5,
        granularity="chase",
        channel_sparsity=0.5,
        distribution="uniform",
        update_interval=2,
        prune_ratio=0.3,
        total_steps=40,
        stop_fraction=0.5,
    )
    density = sparse.density
    removed = []
    for _ in range(40):
        x = torch.randn(16, 32)
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
        rows = (~sparse.masks["0.weight"].any(dim=1)).sum().item()
        removed.append(rows)
    assert removed[0] < removed[9] <= removed[-1] == 32  # gradually, half the rows by the stop
    assert removed == sorted(removed)  # a removed row never comes back
    assert sparse.density == pytest.approx(density, abs=0.01)  # moved, not lost
    dead = ~sparse.masks["0.weight"].any(dim=1)
    assert model[0].weight[dead].eq(0).all()  # zeros, which condense reads


def test_constant_fan_in_holds_and_rows_without_salient_weights_are_ablated():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 16))
    with torch.no_grad():  # a third of the first layer's rows barely matter
        model[0].weight[::3] *= 1e-3
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sparse = SparseTraining(
        model,
        opt,
        method="rigl",
        sparsity=0.5,
        granularity="fanin",
        min_salient=0.5,
        distribution="uniform",
        update_interval=2,
        prune_ratio=0.5,
        total_steps=40,
    )
    mask = sparse.masks["0.weight"]
    assert set(mask.sum(dim=1).tolist()) == {16}  # half of 32 inputs in every row
    active = int(mask.sum())
    for _ in range(12):
        model(torch.randn(16, 32)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    mask = sparse.masks["0.weight"]
    fan = mask.sum(dim=1)
    live = fan > 0
    assert 0 < int((~live).sum()) < 64  # some rows ablated, not all
    assert fan[live].max() - fan[live].min() <= 1  # the live rows share one fan-in (up to 1)
    assert int(mask.sum()) == active  # the count kept
    assert model[0].weight[~live].eq(0).all()
