"""EMA objects the engine keeps exactly as sparse as the model: a copy of the model, diffusers'
`EMAModel` (a list of shadow tensors) and torch's `AveragedModel` (a module around a copy)."""

from types import SimpleNamespace

import pytest
import torch
from diffusers.training_utils import EMAModel
from sparse_helpers import make_sparse, mlp, saved_and_loaded, train_step
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from sparsediff.sparsity import SparseTraining
from sparsediff.training.ema import EMA

KINDS = ["module", "EMAModel", "AveragedModel"]


def _ema(kind, model):
    """What is passed as ``ema=``, how its users update it, its tensors by the model's names,
    and the object that saves and loads its state."""
    names = [n for n, _ in model.named_parameters()]
    if kind == "EMAModel":
        ema = EMAModel(model.parameters(), decay=0.9)
        return SimpleNamespace(
            arg=ema,
            update=lambda: ema.step(model.parameters()),
            tensors=lambda: dict(zip(names, ema.shadow_params)),  # read afresh: loads replace it
            holder=ema,
        )
    if kind == "AveragedModel":
        avg = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))
        return SimpleNamespace(
            arg=avg,
            update=lambda: avg.update_parameters(model),
            tensors=lambda: dict(avg.module.named_parameters()),
            holder=avg,
        )
    ema = EMA(model, decay=0.9)
    return SimpleNamespace(
        arg=ema.module,
        update=lambda: ema.update(model),
        tensors=lambda: dict(ema.module.named_parameters()),
        holder=ema,
    )


def _make(kind, seed=0):
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ema = _ema(kind, model)
    sparse = make_sparse(model, opt, ema=ema.arg, seed=seed)
    return model, opt, ema, sparse


def _train(model, opt, ema, steps):
    for step in steps:
        train_step(model, opt, step)
        ema.update()


def _check_as_sparse(model, ema, sparse):
    params, tensors = dict(model.named_parameters()), ema.tensors()
    for name, mask in sparse.masks.items():
        assert torch.all(tensors[name][~mask] == 0)
        assert torch.equal(tensors[name] != 0, params[name] != 0)  # live and EMA masks agree


@pytest.mark.parametrize("kind", KINDS)
def test_ema_is_exactly_as_sparse_through_rigl_updates(single_thread, kind):
    model, opt, ema, sparse = _make(kind)
    masks = {n: m.clone() for n, m in sparse.masks.items()}
    for name, mask in masks.items():  # zeroed at construction
        assert torch.equal(ema.tensors()[name] != 0, mask)
    dropped = 0
    for step in range(1, 9):
        _train(model, opt, ema, [step])
        dropped += sparse.stats()["dropped"] if step % 2 == 0 else 0
        _check_as_sparse(model, ema, sparse)
    assert dropped > 0 and any(not torch.equal(masks[n], m) for n, m in sparse.masks.items())
    # the EMA really averages: it lags the live weights
    params = dict(model.named_parameters())
    assert any(not torch.equal(t, params[n]) for n, t in ema.tensors().items())


@pytest.mark.parametrize("kind", KINDS)
def test_resume_with_ema_is_exact(single_thread, kind):
    model, opt, ema, sparse = _make(kind)
    _train(model, opt, ema, range(1, 9))

    model2, opt2, ema2, sparse2 = _make(kind)
    _train(model2, opt2, ema2, range(1, 4))
    ckpt = saved_and_loaded(
        {
            "model": model2.state_dict(),
            "opt": opt2.state_dict(),
            "ema": ema2.holder.state_dict(),
            "sparse": sparse2.state_dict(),
        }
    )
    model3, opt3, ema3, sparse3 = _make(kind, seed=99)  # other masks
    model3.load_state_dict(ckpt["model"])
    opt3.load_state_dict(ckpt["opt"])
    ema3.holder.load_state_dict(ckpt["ema"])  # EMAModel: a new shadow_params list
    sparse3.load_state_dict(ckpt["sparse"])
    _check_as_sparse(model3, ema3, sparse3)
    _train(model3, opt3, ema3, range(4, 9))  # through updates on the loaded EMA tensors
    _check_as_sparse(model3, ema3, sparse3)
    assert all(torch.equal(sparse.masks[n], sparse3.masks[n]) for n in sparse.masks)
    expected = ema.tensors()
    assert all(torch.equal(t, expected[n]) for n, t in ema3.tensors().items())


def test_ema_objects_that_do_not_fit_the_model_are_refused():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="shadow_params holds 2 tensors"):
        SparseTraining(model, opt, total_steps=10, ema=EMAModel(model[0].parameters()))
    other = AveragedModel(nn.Sequential(nn.Linear(12, 24)))
    with pytest.raises(ValueError, match="'2.weight' is missing"):
        SparseTraining(model, opt, total_steps=10, ema=other)
    with pytest.raises(ValueError, match="ema must be a copy of model"):
        SparseTraining(model, opt, total_steps=10, ema={"0.weight": torch.zeros(24, 12)})
    assert len(opt._optimizer_step_post_hooks) == 0
