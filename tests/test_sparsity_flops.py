import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from sparsediff.sparsity import SparseTraining, flops


def _half_sparse_mlp(granularity="unstructured"):
    """Linear(16, 32) and Linear(32, 8) with static masks, 50% sparse in each layer."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    sparse = SparseTraining(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        method="static",
        sparsity=0.5,
        distribution="uniform",
        granularity=granularity,
        total_steps=100,
    )
    return model, sparse


def test_mlp_flops_against_analytic_counts():
    model, sparse = _half_sparse_mlp()
    x = torch.randn(4, 16)
    report = flops.inference_flops(model, x, densities=sparse)
    f0, f2 = 2 * 4 * 16 * 32, 2 * 4 * 32 * 8  # 2 * batch * in * out per Linear
    assert report.per_layer["0.weight"].dense == f0 and report.per_layer["2.weight"].dense == f2
    assert report.dense == f0 + f2 and report.other == 0
    assert report.sparse == pytest.approx(0.5 * (f0 + f2))
    # default densities: the measured non-zero fraction of each weight
    with torch.no_grad():
        model[2].weight.zero_()
    measured = flops.inference_flops(model, x)
    assert measured.per_layer["2.weight"].density == 0.0
    assert measured.sparse == pytest.approx(f0 * int(model[0].weight.count_nonzero()) / 512)
    total, nonzero = flops.count_parameters(model)
    assert total == 16 * 32 + 32 + 32 * 8 + 8
    assert nonzero == int(model[0].weight.count_nonzero()) + 32 + 8


def test_conv_net_flops_against_analytic_counts():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),  # out 8x8x8: 2 * 512 * (3*3*3)
        nn.ReLU(),
        nn.Conv2d(8, 4, 3, stride=2, padding=1),  # out 4x4x4: 2 * 64 * (8*3*3)
        nn.Flatten(),
        nn.Linear(64, 10),  # 2 * 64 * 10
    )
    densities = {"0.weight": 0.5, "2.weight": 0.25}
    report = flops.inference_flops(model, torch.randn(2, 3, 8, 8), densities=densities)
    expected = {"0.weight": 2 * 2 * 512 * 27, "2.weight": 2 * 2 * 64 * 72, "4.weight": 2 * 2 * 640}
    assert {n: r.dense for n, r in report.per_layer.items()} == expected
    assert report.sparse == pytest.approx(
        expected["0.weight"] * 0.5 + expected["2.weight"] * 0.25 + expected["4.weight"]
    )


@pytest.mark.parametrize("granularity", ["channel", "2:4"])
def test_structured_masks_count_by_layer_density(granularity):
    # Linear(16, 32) and Linear(32, 8), uniform 50%: 16 of 32 channels / 4 of 8 channels, or
    # 2 of every 4 weights; each layer's FLOPs scale by its density either way.
    model, sparse = _half_sparse_mlp(granularity)
    report = flops.inference_flops(model, torch.randn(4, 16), densities=sparse)
    f0, f2 = 2 * 4 * 16 * 32, 2 * 4 * 32 * 8
    assert report.per_layer["0.weight"].density == report.per_layer["2.weight"].density == 0.5
    assert report.sparse == pytest.approx(0.5 * (f0 + f2))
    assert flops.inference_flops(model, torch.randn(4, 16)).sparse == pytest.approx(report.sparse)


def _gru_expected(tokens, layers=2, hidden=6, inputs=5, directions=2):
    # per token, layer and direction: 2 * (3H * in + 3H * H)
    total = 0
    for layer in range(layers):
        n_in = inputs if layer == 0 else hidden * directions
        total += directions * 2 * (3 * hidden * n_in + 3 * hidden * hidden) * tokens
    return total


@pytest.mark.parametrize("packed", [False, True])
def test_gru_flops_counted_and_analytic_fallback(packed):
    torch.manual_seed(0)
    gru = nn.GRU(5, 6, num_layers=2, bidirectional=True, batch_first=True)
    x = torch.randn(3, 7, 5)
    tokens = 3 * 7
    if packed:
        x = pack_padded_sequence(x, [7, 4, 2], batch_first=True)
        tokens = 7 + 4 + 2
    counted = flops.inference_flops(gru, x)
    assert counted.dense == _gru_expected(tokens)
    assert set(counted.per_layer) == {n for n, _ in gru.named_parameters() if "weight" in n}
    # A backend whose fused RNN kernel FlopCounterMode does not see: counted analytically.
    aten = torch.ops.aten
    unseen = {aten.mm: lambda *a, **k: 0, aten.addmm: lambda *a, **k: 0}
    fallback = flops.inference_flops(gru, x, flop_formulas=unseen)
    assert {n: r.dense for n, r in fallback.per_layer.items()} == {
        n: r.dense for n, r in counted.per_layer.items()
    }
    assert flops.rnn_flops(gru, tokens)["weight_hh_l1_reverse"] == 2 * 18 * 6 * tokens


def test_attention_products_are_not_reduced():
    attn = nn.MultiheadAttention(8, 2, batch_first=True)
    q, kv = torch.randn(2, 3, 8), torch.randn(2, 5, 8)
    report = flops.inference_flops(attn, q, kv, kv, densities={})  # all dense
    proj_in = 2 * 8 * 8 * (6 + 10 + 10)  # q from 6 tokens, k and v from 10 tokens
    proj_out = 2 * 8 * 8 * 6
    assert report.per_layer["in_proj_weight"].dense == proj_in
    assert report.per_layer["out_proj.weight"].dense == proj_out
    # QK^T and AV: 2 * (batch*heads) * Lq * Lk * head_dim each
    assert report.other == 2 * (2 * 4 * 3 * 5 * 4)
    assert report.sparse == report.dense
    half = flops.inference_flops(
        attn, q, kv, kv, densities={"in_proj_weight": 0.5, "out_proj.weight": 0.5}
    )
    assert half.sparse == pytest.approx(report.other + 0.5 * (proj_in + proj_out))


def test_training_flops_per_step():
    assert flops.training_flops_per_step(100, 30, "dense") == 300
    assert flops.training_flops_per_step(100, 30, "static") == 90
    assert flops.training_flops_per_step(100, 30, "magran", 4) == 90
    # (3 f_S ΔT + 2 f_S + f_D) / (ΔT + 1) = (360 + 60 + 100) / 5
    assert flops.training_flops_per_step(100, 30, "rigl", 4) == pytest.approx(104)
    # a run of 20 steps with updates at 4, 8 and 12 (stop at 0.75 * 20 = 15): 3 dense gradients
    run = flops.training_flops_per_step(100, 30, "rigl", 4, total_steps=20, stop_fraction=0.75)
    assert run == pytest.approx(90 + 3 * (100 - 30) / 20)
    with pytest.raises(ValueError, match="method"):
        flops.training_flops_per_step(100, 30, "set", 4)
    with pytest.raises(ValueError, match="update_interval"):
        flops.training_flops_per_step(100, 30, "rigl", 0)


class _SDPA(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(16, 48, bias=False)

    def forward(self, x):
        q, k, v = self.qkv(x).view(2, 5, 3, 4, 4).permute(2, 0, 3, 1, 4)  # (b, heads, s, d)
        return nn.functional.scaled_dot_product_attention(q, k, v)


def test_sdpa_counted_as_unreduced_activation_flops():
    report = flops.inference_flops(_SDPA(), torch.randn(2, 5, 16), densities={"qkv.weight": 0.5})
    assert report.per_layer["qkv.weight"].dense == 2 * 10 * 16 * 48
    assert report.other == 2 * (2 * 4) * 5 * 5 * (4 + 4)  # QK^T and AV, whatever the backend
    assert report.sparse == pytest.approx(report.other + 0.5 * 2 * 10 * 16 * 48)
