import math

import pytest
import torch
from torch import nn

from sparsediff.sparsity import SparseTraining, default_maskable, layer_densities, select_parameters
from sparsediff.sparsity.schedules import is_update_step, prune_fraction


def test_erk_clamps_dense_layer_and_resolves():
    # Hand computation, sparsity 0.5 over 40 + 8 + 100 = 148 weights (target 74 active).
    # ERK scales sum/prod: a 14/40 = 0.35, b 6/8 = 0.75, c 20/100 = 0.2; eps = 74 / 40 = 1.85
    # puts b at 1.3875 > 1, so b is dense and eps = (74 - 8) / (0.35*40 + 0.2*100) = 66 / 34.
    shapes = {"a": (4, 10), "b": (2, 4), "c": (10, 10)}
    d = layer_densities(shapes, 0.5, "erk")
    assert d["b"] == 1.0
    assert d["a"] == pytest.approx(0.35 * 66 / 34)
    assert d["c"] == pytest.approx(0.2 * 66 / 34)
    assert 40 * d["a"] + 8 * d["b"] + 100 * d["c"] == pytest.approx(74)


def test_er_ignores_kernel_dims_and_erk_uses_them():
    # conv (8, 4, 3, 3): ER scale (8 + 4) / 32 = 0.375, ERK (8+4+3+3) / 288 = 0.0625;
    # linear (16, 8): ER = ERK = 24 / 128 = 0.1875. Sparsity 0.9 over 288 + 128 = 416.
    shapes = {"conv": (8, 4, 3, 3), "fc": (16, 8)}
    target = 0.1 * 416
    er = layer_densities(shapes, 0.9, "er")
    eps = target / (0.375 * 288 + 0.1875 * 128)
    assert er == pytest.approx({"conv": 0.375 * eps, "fc": 0.1875 * eps})
    erk = layer_densities(shapes, 0.9, "erk")
    eps = target / (0.0625 * 288 + 0.1875 * 128)
    assert erk == pytest.approx({"conv": 0.0625 * eps, "fc": 0.1875 * eps})


def test_erk_power_scale_and_uniform():
    shapes = {"a": (4, 10), "c": (10, 10)}
    # power 0.5: scales sqrt(0.35) and sqrt(0.2)
    d = layer_densities(shapes, 0.6, "erk", erk_power_scale=0.5)
    eps = 0.4 * 140 / (math.sqrt(0.35) * 40 + math.sqrt(0.2) * 100)
    assert d == pytest.approx({"a": math.sqrt(0.35) * eps, "c": math.sqrt(0.2) * eps})
    assert layer_densities(shapes, 0.6, "erk", erk_power_scale=0.0) == pytest.approx(
        {"a": 0.4, "c": 0.4}
    )
    assert layer_densities(shapes, 0.6, "uniform") == pytest.approx({"a": 0.4, "c": 0.4})


def test_gru_weight_is_two_dimensional():
    # GRU(3, 5): weight_ih (15, 3), weight_hh (15, 5); ER == ERK for 2-D weights.
    gru = nn.GRU(3, 5)
    shapes = {n: tuple(p.shape) for n, p in gru.named_parameters() if "weight" in n}
    er, erk = layer_densities(shapes, 0.5, "er"), layer_densities(shapes, 0.5, "erk")
    assert er == pytest.approx(erk)
    eps = 0.5 * (45 + 75) / (18 / 45 * 45 + 20 / 75 * 75)
    assert erk["weight_ih_l0"] == pytest.approx(18 / 45 * eps)


@pytest.mark.parametrize("distribution", ["uniform", "er", "erk"])
def test_model_hits_global_sparsity_within_rounding(distribution):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3), nn.Conv2d(16, 32, 3), nn.Flatten(), nn.Linear(32, 10), nn.Linear(10, 3)
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sparse = SparseTraining(
        model, opt, method="static", sparsity=0.8, distribution=distribution, total_steps=100
    )
    total = sum(m.numel() for m in sparse.masks.values())
    active = sum(int(m.sum()) for m in sparse.masks.values())
    assert abs(active - 0.2 * total) <= len(sparse.masks) / 2
    densities = layer_densities(
        {n: tuple(m.shape) for n, m in sparse.masks.items()}, 0.8, distribution
    )
    for name, mask in sparse.masks.items():  # every layer rounded to the nearest weight
        assert int(mask.sum()) == round(densities[name] * mask.numel())
        weight = dict(model.named_parameters())[name]
        assert torch.all(weight[~mask] == 0)


class _Zoo(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.norm = nn.LayerNorm(8)
        self.conv = nn.Conv1d(8, 8, 3)
        self.up = nn.ConvTranspose2d(4, 4, 2)
        self.gru = nn.GRU(8, 8, bidirectional=True)
        self.attn = nn.MultiheadAttention(8, 2)
        self.head = nn.Linear(8, 2)


def test_default_maskable_and_patterns():
    zoo = _Zoo()
    assert set(default_maskable(zoo)) == {
        "conv.weight",
        "up.weight",
        "gru.weight_ih_l0",
        "gru.weight_hh_l0",
        "gru.weight_ih_l0_reverse",
        "gru.weight_hh_l0_reverse",
        "attn.in_proj_weight",
        "attn.out_proj.weight",
        "head.weight",
    }
    chosen = select_parameters(zoo, include=["emb.*"], exclude=("head.*", "gru.*reverse"))
    assert "emb.weight" in chosen and "head.weight" not in chosen
    assert "gru.weight_ih_l0_reverse" not in chosen and "gru.weight_ih_l0" in chosen
    assert "gru.bias_ih_l0" not in chosen and "norm.weight" not in chosen


def test_schedules():
    assert prune_fraction(0, 0.3, "cosine", 100) == pytest.approx(0.3)
    assert prune_fraction(50, 0.3, "cosine", 100) == pytest.approx(0.15)
    assert prune_fraction(100, 0.3, "cosine", 100) == pytest.approx(0.0)
    assert prune_fraction(25, 0.3, "linear", 100) == pytest.approx(0.225)
    assert prune_fraction(99, 0.3, "constant", 100) == 0.3
    assert prune_fraction(101, 0.3, "constant", 100) == 0.0
    steps = [t for t in range(1, 40) if is_update_step(t, 10, 0.75 * 40)]
    assert steps == [10, 20, 30]
