"""Every ```python block of docs/engine.md runs as written.

Each block runs on its own, in a fresh namespace holding small stand-ins for the names the docs
leave to the reader: ``torch``, ``model`` (with the ``conv_in``/``conv``/``conv_out`` the
examples name), ``loader``, ``loss_fn``, ``x``, ``t``, ``total_steps``, ``optimizer``, and
``sparse`` for blocks that do not build their own.
"""

import re
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from sparsediff.sparsity import METHODS, SparseTraining

DOC = Path(__file__).resolve().parents[1] / "docs" / "engine.md"


def _blocks():
    text = DOC.read_text(encoding="utf-8")
    found = []
    for match in re.finditer(r"^```python\n(.*?)^```", text, re.M | re.S):
        line = text.count("\n", 0, match.start(1)) + 1
        found.append(pytest.param(line, match.group(1), id=f"line{line}"))
    return found


class Denoiser(nn.Module):
    """A stand-in for the docs' ``model``: predicts noise from ``x`` and the timestep ``t``."""

    def __init__(self):
        super().__init__()
        self.conv_in = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.conv_out = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, x, t):
        h = self.conv_in(x) + t.view(-1, 1, 1, 1)
        return self.conv_out(torch.relu(self.conv(h)))


def loss_fn(model, batch):
    x, t = batch
    return (model(x, t) - x).pow(2).mean()


def _prelude(block):
    torch.manual_seed(0)
    model = Denoiser()
    x, t = torch.randn(4, 3, 8, 8), torch.rand(4)
    names = {
        "torch": torch,
        "model": model,
        "loader": DataLoader(TensorDataset(x, t), batch_size=2),
        "loss_fn": loss_fn,
        "x": x[:2],
        "t": t[:2],
        "total_steps": 1000,
        "optimizer": torch.optim.AdamW(model.parameters(), lr=1e-4),
    }
    if "SparseTraining(" not in block:
        names["sparse"] = SparseTraining(model, names["optimizer"], total_steps=1000)
    return names


@pytest.fixture()
def sandbox(single_thread, tmp_path, monkeypatch):
    """Blocks may register methods, write files and create an Accelerator: undo all three."""
    monkeypatch.chdir(tmp_path)
    methods = dict(METHODS)
    yield
    METHODS.clear()
    METHODS.update(methods)
    try:
        from accelerate.state import AcceleratorState, GradientState
    except ImportError:
        return
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def test_the_docs_have_examples():
    assert len(_blocks()) >= 5


@pytest.mark.parametrize(("line", "block"), _blocks())
def test_docs_example_runs(sandbox, line, block):
    if "accelerate" in block:
        pytest.importorskip("accelerate")
    code = compile("\n" * (line - 1) + block, str(DOC), "exec")  # tracebacks show doc lines
    exec(code, _prelude(block))
