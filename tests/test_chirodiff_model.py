import numpy as np
import pytest
import torch

from sparsediff.data.sketch_ops import strokes_to_sequence
from sparsediff.models.chirodiff import (
    BiGRUDenoiser,
    TransformerDenoiser,
    build_chirodiff_denoiser,
    masked_mse,
    position_velocity_features,
)

# float results compared across two computations: CI runs these under other CPU kernels too
pytestmark = pytest.mark.kernels


def _batch(seed=0, lengths=(9, 4, 6)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(lengths), max(lengths), 3, generator=g)
    return x, torch.rand(len(lengths), generator=g), torch.tensor(lengths)


def _models():
    torch.manual_seed(0)
    return [
        BiGRUDenoiser("velocity", hidden=16, layers=2),
        BiGRUDenoiser("absolute", hidden=16, layers=1, activation="silu"),
        TransformerDenoiser("velocity", width=16, layers=2, heads=2),
        TransformerDenoiser("absolute", width=16, layers=1, heads=4),
    ]


def test_default_bigru_has_0417m_parameters_and_fourier_buffer():
    model = BiGRUDenoiser()
    n = sum(p.numel() for p in model.parameters())
    # GRU: 2 dirs x [3(96*13 + 96*96 + 2*96) + 2 x 3(96*192 + 96*96 + 2*96)]
    # + Linear(192->96) + Linear(104->3)
    expected = 2 * (3 * (96 * 13 + 96 * 96 + 192) + 2 * 3 * (96 * 192 + 96 * 96 + 192))
    expected += 192 * 96 + 96 + 104 * 3 + 3
    assert n == expected == 416_859
    assert round(n / 1e6, 3) == 0.417
    assert model.gru.input_size == 13 and model.gru.bidirectional and model.gru.num_layers == 3
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    assert "time_embedding.weight" in buffers and "time_embedding.weight" not in params
    assert "time_embedding.weight" in model.state_dict()
    assert buffers["time_embedding.weight"].shape == (4,)
    # fixed by seed: two models share the projection
    torch.testing.assert_close(
        buffers["time_embedding.weight"], BiGRUDenoiser().time_embedding.weight
    )


@pytest.mark.parametrize("index", range(4))
def test_output_zero_at_padding_and_independent_of_padding_values(index):
    model = _models()[index].eval()
    x, t, lengths = _batch()
    with torch.no_grad():
        out = model(x, t, lengths)
        x2 = x.clone()
        x2[1, 4:] = 1e3
        x2[2, 6:] = float("nan")
        out2 = model(x2, t, lengths)
    assert out.shape == x.shape
    assert out[1, 4:].abs().max() == 0 and out[2, 6:].abs().max() == 0
    torch.testing.assert_close(out, out2)


@pytest.mark.parametrize("index", range(4))
def test_padded_batch_matches_unpadded_single_sequences(index):
    model = _models()[index].eval()
    x, t, lengths = _batch(1)
    with torch.no_grad():
        out = model(x, t, lengths)
        for i, n in enumerate(lengths.tolist()):
            alone = model(x[i : i + 1, :n], t[i : i + 1], lengths[i : i + 1])
            torch.testing.assert_close(out[i : i + 1, :n], alone, atol=1e-5, rtol=1e-4)


def test_output_depends_on_time_and_integer_timesteps():
    model = BiGRUDenoiser(hidden=8, layers=1, num_timesteps=100).eval()
    x, _, lengths = _batch()
    steps = torch.tensor([10, 50, 99])
    with torch.no_grad():
        a = model(x, steps, lengths)
        b = model(x, steps.float() / 100, lengths)
        c = model(x, torch.full((3,), 0.9), lengths)
        d = model(x, 0.9, lengths)  # scalar time broadcasts
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(c, d)
    assert not torch.allclose(a, c)
    with pytest.raises(ValueError, match="num_timesteps"):
        BiGRUDenoiser(hidden=8, layers=1)(x, steps, lengths)
    with pytest.raises(ValueError, match="lengths"):
        model(x, steps, torch.tensor([9, 0, 6]))


def test_features_identical_for_velocity_and_absolute_inputs():
    sketch = [np.array([[0.1, 0.2], [0.3, -0.1], [0.0, 0.4]]), np.array([[-0.2, 0.0], [0.1, 0.1]])]
    vel = torch.from_numpy(strokes_to_sequence(sketch, "velocity"))[None]
    ab = torch.from_numpy(strokes_to_sequence(sketch, "absolute"))[None]
    pad = torch.full((1, 2, 3), 7.0)
    lengths = torch.tensor([5])
    f_vel = position_velocity_features(torch.cat([vel, pad], 1), lengths, "velocity")
    f_abs = position_velocity_features(torch.cat([ab, pad], 1), lengths, "absolute")
    torch.testing.assert_close(f_vel, f_abs)
    torch.testing.assert_close(f_vel[0, :5, :2], ab[0, :, :2])  # positions
    torch.testing.assert_close(f_vel[0, :5, 2:], vel[0])  # velocity + pen
    assert f_vel[0, 5:].abs().max() == 0


def test_masked_mse_ignores_padding_and_normalises_per_sequence():
    pred, _, lengths = _batch(2, lengths=(2, 4))
    target = torch.zeros_like(pred)
    loss = masked_mse(pred, target, lengths)
    manual = (pred[0, :2].pow(2).mean() + pred[1, :4].pow(2).mean()) / 2
    torch.testing.assert_close(loss, manual)
    pred2, target2 = pred.clone(), target.clone()
    pred2[0, 2:] = 1e6
    target2[0, 3:] = float("nan")
    torch.testing.assert_close(masked_mse(pred2, target2, lengths), loss)
    pred3 = pred.clone().requires_grad_(True)
    masked_mse(pred3, target, lengths).backward()
    assert pred3.grad[0, 2:].abs().max() == 0 and pred3.grad[0, :2].abs().min() > 0


def test_training_step_reduces_loss_and_factory():
    torch.manual_seed(0)
    model = build_chirodiff_denoiser("birnn", hidden=16, layers=1)
    assert isinstance(model, BiGRUDenoiser)
    assert isinstance(
        build_chirodiff_denoiser("transformer", width=8, layers=1, heads=2), TransformerDenoiser
    )
    for removed in ("mlp", "gru", "bigru"):  # only "birnn" and "transformer" exist
        with pytest.raises(ValueError, match="birnn"):
            build_chirodiff_denoiser(removed)
    x, t, lengths = _batch(3)
    target = torch.randn_like(x)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        loss = masked_mse(model(x, t, lengths), target, lengths)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
