import pytest
import torch
from scipy import stats as scipy_stats
from sparse_helpers import (
    GOOD_SETTINGS,
    batch,
    linear_engine,
    make_sparse,
    mlp,
    saved_and_loaded,
    step_by_hand,
    train_step,
)
from torch import nn

from sparsediff.sparsity import SparseTraining, check_settings
from sparsediff.sparsity.granularity import Unstructured


def _params(model):
    return dict(model.named_parameters())


class _Recorder:
    """Snapshots masks, weights and grads after the optimizer step but before the engine."""

    def __init__(self, model, opt):
        self.model, self.snaps = model, []
        opt.register_step_post_hook(self)  # registered first, so it runs before the engine

    def __call__(self, opt, args, kwargs):
        self.snaps.append(
            {
                n: (p.detach().clone(), p.grad.clone(), self.masks[n].clone())
                for n, p in _params(self.model).items()
                if n in self.masks
            }
        )


@pytest.mark.parametrize("method", ["rigl", "magran"])
def test_density_exact_and_drop_grow_sets(method):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    rec = _Recorder(model, opt)
    sparse = make_sparse(model, opt, method=method)
    rec.masks = sparse.masks
    start = {n: int(m.sum()) for n, m in sparse.masks.items()}
    params = _params(model)
    regrown = 0
    for step in range(1, 13):
        train_step(model, opt, step)
        changes = 0
        for name, mask in sparse.masks.items():
            weight, grad, before = rec.snaps[-1][name]
            assert int(mask.sum()) == start[name]  # per-layer density exactly preserved
            assert torch.all(params[name][~mask] == 0)
            lost, new = before & ~mask, ~before & mask
            assert int(lost.sum()) == int(new.sum())
            k = int(0.3 * start[name]) if step % 2 == 0 else 0  # floor, as in the reference
            if k:
                # dropped: the k smallest |w| of the post-step active weights (no ties here)
                order = weight.abs().masked_fill(~before, float("inf")).view(-1).argsort()
                dropped = torch.zeros_like(before).view(-1)
                dropped[order[:k]] = True
                dropped = dropped.view_as(before)
                kept = before & ~dropped
                assert torch.all(mask[kept]) and torch.equal(lost, dropped & ~mask)
                assert int((mask & ~kept).sum()) == k  # k grown among all inactive after drop
                assert torch.all(params[name][new] == 0)  # new connections start at zero
                back = dropped & mask  # regrown just-dropped weights keep their value
                assert torch.equal(params[name][back], weight[back])
                regrown += int(back.sum())
                if method == "rigl":  # grown: exactly the top-k |grad| outside `kept`
                    top = torch.topk(grad.abs()[~kept], k).values
                    got = grad.abs()[mask & ~kept]
                    assert torch.equal(got.sort().values, top.sort().values)
            changes += int(lost.sum())
        total = sum(m.numel() for m in sparse.masks.values())
        assert sparse.density == sum(start.values()) / total  # global density exact too
    stats = sparse.stats()
    assert stats["dropped"] == stats["grown"] == changes > 0
    assert stats["last_update_step"] == 12 and stats["step"] == 12
    if method == "rigl":  # a large gradient at a just-dropped weight brings it back
        assert regrown > 0
    assert stats["itop_rate"] > stats["density"]


def test_select_grows_among_all_inactive_after_the_drop():
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(200, generator=g) < 0.3
    weight = torch.randn(200, generator=g) * mask
    # grow scores that favour the active entries: only the just-dropped ones may be picked
    grow = torch.rand(200, generator=g) + 10 * mask
    new = Unstructured().select(mask, weight.abs(), grow, 15)
    assert int(new.sum()) == int(mask.sum())
    assert torch.equal(new, mask)  # every dropped weight had a top grow score: all regrown
    grow = torch.rand(200, generator=g) - 10 * mask  # now the dropped ones rank last
    new = Unstructured().select(mask, weight.abs(), grow, 15)
    dropped = torch.topk(weight.abs().masked_fill(~mask, float("inf")), 15, largest=False)
    assert not new[dropped.indices].any() and int((new & ~mask).sum()) == 15


def test_one_rigl_update_by_hand():
    # 8 weights, 4 active; p = 0.7 gives k = floor(0.7 * 4) = 2 (rounding would give 3).
    model, opt, sparse = linear_engine(4, 2, momentum=0.9, prune_ratio=0.7, total_steps=10)
    # drop entries 0 and 1 (|w| 0.1, 0.2); of all inactive after the drop the largest |grad|
    # are entry 0 (just dropped: regrown, keeps 0.1) and entry 4 (new: starts at 0)
    step_by_hand(
        model,
        opt,
        sparse,
        sparse.state_dict(),
        mask=torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.bool),
        weight=torch.tensor([[0.1, -0.2, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0]]),
        grad=torch.tensor([[5.0, 0.0, 0.0, 0.0], [-4.0, 1.0, 2.0, 0.5]]),
    )
    expected = torch.tensor([[1, 0, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    assert torch.equal(sparse.masks["weight"], expected)
    assert torch.equal(model.weight, torch.tensor([[0.1, 0.0, 3.0, 4.0], [0.0] * 4]))
    momentum = opt.state[model.weight]["momentum_buffer"]
    assert torch.equal(momentum, torch.tensor([[5.0, 0.0, 0.0, 0.0], [0.0] * 4]))
    stats = sparse.stats()
    assert stats["dropped"] == stats["grown"] == 1  # entry 1 left, entry 4 joined


def test_magran_growth_is_uniform():
    model, opt, sparse = linear_engine(
        1, 64, method="magran", prune_ratio=0.25, total_steps=400, seed=3
    )
    mask = sparse.masks["weight"]
    grown = torch.zeros(64)
    eligible = torch.zeros(64)
    g = torch.Generator().manual_seed(0)
    for _ in range(400):
        before = mask.clone().view(-1)
        with torch.no_grad():  # random magnitudes, so every position gets dropped sometimes
            model.weight.copy_(torch.randn(64, 1, generator=g) * mask)
        weight = model.weight.detach().view(-1).abs()
        dropped = torch.zeros(64, dtype=torch.bool)
        dropped[torch.topk(weight.masked_fill(~before, float("inf")), 8, largest=False)[1]] = True
        opt.zero_grad()
        # a fixed gradient ranking that gradient-driven growth would follow
        (model.weight.view(-1) * torch.linspace(0, 1, 64)).sum().backward()
        opt.step()
        candidates = ~before | dropped  # everything inactive after the drop
        grown += (candidates & mask.view(-1)).float()
        eligible += candidates.float()
    expected = eligible * 8 / 40  # k = 8 of 32 inactive + 8 just dropped each update
    assert expected.min() > 20
    # Bernoulli(1/5) per eligible update: variance expected * 4/5
    chi2 = float(((grown - expected) ** 2 / (expected * 0.8)).sum())
    assert scipy_stats.chi2.sf(chi2, df=63) > 1e-3


def _check_state_zeroed(opt_factory):
    model = mlp()
    opt = opt_factory(model.parameters())
    rec = _Recorder(model, opt)
    sparse = make_sparse(model, opt, update_interval=3, total_steps=10)
    rec.masks = sparse.masks
    for step in range(1, 4):
        train_step(model, opt, step)
    params = _params(model)
    for name, mask in sparse.masks.items():
        before = rec.snaps[-1][name][2]
        changed = before ^ mask
        assert changed.any()
        state = [t for t in opt.state[params[name]].values() if t.shape == mask.shape]
        assert state
        for t in state:
            assert torch.all(t[changed] == 0)  # dropped and grown entries start afresh
            assert torch.all(t[~mask] == 0)  # state is exactly as sparse as the weights
            kept = t[before & mask]  # kept entries keep their state (dead units aside)
            assert (kept != 0).float().mean() > 0.5
    return model, opt, sparse


@pytest.mark.parametrize(
    "opt_factory",
    [
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
        lambda p: torch.optim.AdamW(p, lr=1e-2, foreach=False),
        lambda p: torch.optim.AdamW(p, lr=1e-2, foreach=True),
        lambda p: torch.optim.AdamW(p, lr=1e-2, fused=True),
        lambda p: torch.optim.Adam(p, lr=1e-2, amsgrad=True),
    ],
    ids=["sgd-momentum", "adamw", "adamw-foreach", "adamw-fused", "adam-amsgrad"],
)
def test_optimizer_state_zeroed_at_changed_positions(opt_factory):
    _check_state_zeroed(opt_factory)


@pytest.mark.parametrize(
    "opt_factory",
    [
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=0.1),
        lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.5),
        lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.5, fused=True),
    ],
)
def test_masked_weights_stay_zero(opt_factory):
    model = mlp()
    opt = opt_factory(model.parameters())
    sparse = SparseTraining(model, opt, method="static", sparsity=0.6, total_steps=100)
    masks = {n: m.clone() for n, m in sparse.masks.items()}
    params = _params(model)
    for step in range(1, 6):
        train_step(model, opt, step)
        for name, mask in masks.items():
            assert torch.equal(sparse.masks[name], mask)  # static: masks never change
            assert torch.all(params[name][~mask] == 0)
            if not mask.all():  # (ERK may keep a small layer dense)
                assert params[name].grad[~mask].abs().sum() > 0  # gradients are not masked
            assert torch.all(params[name][mask] != 0)


def test_ema_is_exactly_as_sparse_as_model():
    model, ema = mlp(), mlp(seed=1)
    ema.load_state_dict(model.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sparse = make_sparse(
        model, opt, method="magran", sparsity=0.75, prune_ratio=0.5, total_steps=10, ema=ema
    )
    ema_params, params = _params(ema), _params(model)
    for name, mask in sparse.masks.items():  # zeroed at construction
        assert torch.equal(ema_params[name] != 0, mask)
    for step in range(1, 9):
        train_step(model, opt, step, ema=ema)
        for name, mask in sparse.masks.items():
            assert torch.all(ema_params[name][~mask] == 0)
            assert torch.equal(ema_params[name] == 0, params[name] == 0)


def test_dense_method_same_path():
    model = mlp()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sparse = SparseTraining(
        model, opt, method="dense", sparsity=0.9, update_interval=1, total_steps=100
    )
    assert all(bool(m.all()) for m in sparse.masks.values())
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    for step in range(1, 4):
        train_step(model, opt, step)
    stats = sparse.stats()
    assert stats["density"] == 1.0 and stats["step"] == 3 and stats["last_update_step"] is None


@pytest.mark.parametrize("fused", [False, True])
def test_skipped_amp_step_changes_nothing(fused):
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=fused)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    sparse = make_sparse(model, opt, update_interval=3, total_steps=10)
    for step in range(1, 3):
        train_step(model, opt, step, scaler=scaler)
    masks = {n: m.clone() for n, m in sparse.masks.items()}
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    # step 3 would be an update step: make its gradient non-finite
    x, _ = batch(3)
    opt.zero_grad()
    scaler.scale(model(x).sum() * float("inf")).backward()
    scaler.step(opt)
    scaler.update()
    assert sparse.step == 2
    assert all(torch.equal(sparse.masks[n], m) for n, m in masks.items())
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
    train_step(model, opt, 3, scaler=scaler)  # the next good step is the update
    assert sparse.step == 3 and sparse.stats()["last_update_step"] == 3


@pytest.mark.parametrize("fused", [False, True])
def test_grad_scaler_gives_same_masks_as_unscaled(fused):
    runs = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=2.0**12)):
        model = mlp()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=fused)
        sparse = make_sparse(model, opt, prune_schedule="cosine", total_steps=10)
        for step in range(1, 7):
            train_step(model, opt, step, scaler=scaler)
        runs.append({n: m.clone() for n, m in sparse.masks.items()})
    assert all(torch.equal(runs[0][n], runs[1][n]) for n in runs[0])


@pytest.mark.parametrize("method", ["rigl", "magran"])
def test_resume_is_bit_exact(method):
    def make(seed=7):
        model, ema = mlp(), mlp()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        sparse = make_sparse(
            model,
            opt,
            method=method,
            prune_schedule="cosine",
            stop_fraction=0.75,
            ema=ema,
            seed=seed,
        )
        return model, ema, opt, sparse

    model, ema, opt, sparse = make()
    for step in range(1, 13):
        train_step(model, opt, step, ema=ema)

    model2, ema2, opt2, sparse2 = make()
    for step in range(1, 6):
        train_step(model2, opt2, step, ema=ema2)
    ckpt = saved_and_loaded(
        {
            "model": model2.state_dict(),
            "ema": ema2.state_dict(),
            "opt": opt2.state_dict(),
            "sparse": sparse2.state_dict(),
        }
    )
    model3, ema3, opt3, sparse3 = make(seed=99)  # fresh objects, other masks and seed
    model3.load_state_dict(ckpt["model"])
    ema3.load_state_dict(ckpt["ema"])
    opt3.load_state_dict(ckpt["opt"])
    sparse3.load_state_dict(ckpt["sparse"])
    assert sparse3.step == 5
    for step in range(6, 13):
        train_step(model3, opt3, step, ema=ema3)
    for a, b in ((model, model3), (ema, ema3)):
        assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert all(torch.equal(sparse.masks[n], sparse3.masks[n]) for n in sparse.masks)
    a, b = sparse.stats(), sparse3.stats()
    assert a.pop("update_time_s") >= 0 and b.pop("update_time_s") >= 0
    assert a == b


def test_load_state_dict_reapplies_masks():
    model = mlp()
    sparse = SparseTraining(
        model, torch.optim.SGD(model.parameters(), lr=0.1), sparsity=0.8, total_steps=100
    )
    state = sparse.state_dict()
    fresh, fresh_ema = mlp(seed=5), mlp(seed=6)
    other = SparseTraining(
        fresh,
        torch.optim.SGD(fresh.parameters(), lr=0.1),
        sparsity=0.8,
        seed=1,
        ema=fresh_ema,
        total_steps=100,
    )
    with torch.no_grad():  # dense again, as if loaded from a dense checkpoint
        for p in list(fresh.parameters()) + list(fresh_ema.parameters()):
            p.fill_(1.0)
    other.load_state_dict(state)
    for name, p in list(fresh.named_parameters()) + list(fresh_ema.named_parameters()):
        if name in state["masks"]:
            assert torch.equal(p != 0, state["masks"][name])


def test_load_state_dict_rejects_other_method():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    state = SparseTraining(model, opt, method="static", total_steps=100).state_dict()
    model2 = mlp()
    other = SparseTraining(
        model2, torch.optim.SGD(model2.parameters(), lr=0.1), method="rigl", total_steps=100
    )
    with pytest.raises(ValueError, match="method"):
        other.load_state_dict(state)


def test_clip_grad_norm_counts_active_entries_only():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    sparse = SparseTraining(model, opt, method="rigl", sparsity=0.8, total_steps=100)
    x, y = batch(0)
    (model(x) - y).pow(2).mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    expected = torch.linalg.vector_norm(
        torch.stack(
            [
                torch.linalg.vector_norm(g * sparse.masks[n] if n in sparse.masks else g)
                for n, g in grads.items()
            ]
        )
    )
    total = sparse.clip_grad_norm_(max_norm=float(expected) / 2)
    assert torch.allclose(total, expected)
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, grads[name] / 2, rtol=1e-4)  # scaled, not masked


def test_masks_are_read_only_and_remove_detaches():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sparse = SparseTraining(model, opt, method="static", sparsity=0.5, total_steps=100)
    with pytest.raises(TypeError):
        sparse.masks["0.weight"] = torch.ones(24, 12, dtype=torch.bool)
    assert len(opt._optimizer_step_post_hooks) == 1
    sparse.remove()
    sparse.remove()  # safe to call twice
    assert len(opt._optimizer_step_post_hooks) == 0
    train_step(model, opt, 1)
    assert sparse.step == 0
    assert sparse.verify_consistent() is True  # not distributed: a no-op


def _bad(**overrides):
    kwargs = {"method": "rigl", "sparsity": 0.5, "total_steps": 100}
    kwargs.update(overrides)
    return kwargs


@pytest.mark.parametrize(
    ("kwargs", "argument"),
    [
        (_bad(sparsity=1.0), "sparsity"),
        (_bad(sparsity=-0.1), "sparsity"),
        (_bad(method="set"), "method"),
        (_bad(distribution="erdos"), "distribution"),
        (_bad(prune_ratio=0.0), "prune_ratio"),
        (_bad(prune_ratio=1.5), "prune_ratio"),
        (_bad(update_interval=0), "update_interval"),
        (_bad(update_interval=2.5), "update_interval"),
        (_bad(prune_schedule="step"), "prune_schedule"),
        (_bad(total_steps=0), "total_steps"),
        (_bad(stop_fraction=1.5), "stop_fraction"),
        (_bad(exclude=["*weight"]), "nothing to mask"),
        (_bad(include=["nope.*"]), "include"),
        (_bad(ema=nn.Linear(3, 3)), "ema"),
    ],
)
def test_bad_input_raises_and_touches_nothing(kwargs, argument):
    model = mlp()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=argument):
        SparseTraining(model, opt, **kwargs)
    assert len(opt._optimizer_step_post_hooks) == 0
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_bad_input_names_allowed_values():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="'dense', 'static', 'rigl', 'magran'"):
        SparseTraining(model, opt, method="set", total_steps=100)
    with pytest.raises(ValueError, match=r"\[0.0, 1.0\)"):
        SparseTraining(model, opt, sparsity=1.0, total_steps=100)


def test_total_steps_is_required():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="total_steps"):  # no silent default schedule length
        SparseTraining(model, opt, method="rigl", sparsity=0.5)
    with pytest.raises(ValueError, match="total_steps"):
        SparseTraining(model, opt, total_steps=None)
    assert len(opt._optimizer_step_post_hooks) == 0


def test_check_settings_is_the_engines_rule_and_names_the_prefixed_key():
    check_settings(**GOOD_SETTINGS)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for key, bad in [
        ("method", "set"),
        ("sparsity", 1.0),
        ("distribution", "erdos"),
        ("update_interval", 0),
        ("prune_ratio", 0.0),
        ("prune_schedule", "step"),
        ("stop_fraction", 1.5),
        ("erk_power_scale", -1.0),
    ]:
        with pytest.raises(ValueError, match=rf"^sparse\.{key} must be"):
            check_settings(**{**GOOD_SETTINGS, key: bad}, prefix="sparse.")
        with pytest.raises(ValueError, match=rf"^{key} must be"):  # the engine's own message
            SparseTraining(model, opt, **{key: bad}, total_steps=100)


def test_optimizer_without_model_parameters_and_unmaskable_model():
    model = mlp()
    other = torch.optim.SGD(mlp().parameters(), lr=0.1)
    with pytest.raises(ValueError, match="optimizer"):
        SparseTraining(model, other, total_steps=100)
    assert len(other._optimizer_step_post_hooks) == 0
    norm = nn.Sequential(nn.Embedding(4, 4), nn.LayerNorm(4))
    with pytest.raises(ValueError, match="nothing to mask"):
        SparseTraining(norm, torch.optim.SGD(norm.parameters(), lr=0.1), total_steps=100)


def test_schedule_counts_optimizer_steps_not_micro_batches():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sparse = make_sparse(model, opt, prune_ratio=0.05, prune_schedule="cosine", total_steps=10)
    for step in range(1, 5):
        opt.zero_grad()
        for micro in range(3):  # gradient accumulation: 3 backward passes per step
            x, y = batch(10 * step + micro)
            ((model(x) - y).pow(2).mean() / 3).backward()
        opt.step()
    assert sparse.step == 4 and sparse.stats()["last_update_step"] == 4
