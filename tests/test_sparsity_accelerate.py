"""The engine with accelerate's wrapped optimizer (a CPU `Accelerator`, the real classes)."""

import pytest
import torch
from sparse_helpers import loss, make_sparse, mlp

accelerate = pytest.importorskip("accelerate")
from accelerate.state import AcceleratorState, GradientState  # noqa: E402


@pytest.fixture()
def make_accelerator(single_thread):
    """Accelerators share process-wide state: reset it after each test."""
    yield accelerate.Accelerator
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _check_sparse(model, opt, sparse):
    params = dict(model.named_parameters())
    for name, mask in sparse.masks.items():
        assert torch.all(params[name][~mask] == 0)
        for state in opt.state[params[name]].values():
            if state.dim():
                assert torch.all(state[~mask] == 0)


def test_accelerated_optimizer_trains_like_the_plain_one(make_accelerator):
    runs = []
    for wrap in (False, True):
        model = mlp()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        backward = torch.Tensor.backward
        if wrap:
            accelerator = make_accelerator()
            model, opt = accelerator.prepare(model, opt)
            assert type(opt).__name__ == "AcceleratedOptimizer"
            backward = accelerator.backward
        sparse = make_sparse(model, opt)  # the wrapper, not opt.optimizer
        for step in range(1, 7):
            opt.zero_grad()
            backward(loss(model, step))
            opt.step()
            _check_sparse(model, opt, sparse)
        stats = sparse.stats()
        assert stats["step"] == 6 and stats["last_update_step"] == 6 and stats["dropped"] > 0
        runs.append((sparse.masks, dict(model.named_parameters())))
    (masks, params), (masks2, params2) = runs
    assert all(torch.equal(masks[n], masks2[n]) for n in masks)
    assert all(torch.equal(params[n], params2[n]) for n in params)


@pytest.mark.parametrize("fused", [False, True])
def test_fp16_overflow_skipped_step_is_not_counted(make_accelerator, fused):
    accelerator = make_accelerator()
    # What Accelerator(mixed_precision="fp16") sets up on a GPU; a CPU scaler takes the same path.
    accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    model = mlp()
    model, opt = accelerator.prepare(model, torch.optim.AdamW(model.parameters(), fused=fused))
    sparse = make_sparse(model, opt)

    def step(number, scale=1.0):
        opt.zero_grad()
        accelerator.backward(loss(model, number, scale))
        opt.step()

    step(1)
    masks = {n: m.clone() for n, m in sparse.masks.items()}
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    step(2, scale=float("inf"))  # would be an update step: the scaler skips it
    if not fused:  # a fused optimizer is still called (with found_inf), so accelerate can't tell
        assert opt.step_was_skipped
    assert sparse.step == 1 and sparse.stats()["last_update_step"] is None
    assert all(torch.equal(sparse.masks[n], m) for n, m in masks.items())
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())
    step(2)  # the next real step is step 2, the update
    assert sparse.step == 2 and sparse.stats()["last_update_step"] == 2
    _check_sparse(model, opt, sparse)


def test_gradient_accumulation_counts_optimizer_steps(make_accelerator):
    accelerator = make_accelerator(gradient_accumulation_steps=3)
    model = mlp()
    model, opt = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.05))
    sparse = make_sparse(model, opt)
    for micro in range(12):
        with accelerator.accumulate(model):
            accelerator.backward(loss(model, micro))
            opt.step()  # a no-op until the 3rd micro-batch
            opt.zero_grad()
    assert sparse.step == 4 and sparse.stats()["last_update_step"] == 4
