import pytest
import torch
from torch import nn

from sparsediff.training.ema import EMA


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
        self.register_buffer("stat", torch.tensor([0.0, 0.0], dtype=torch.float64))


def _set(model, w, stat):
    with torch.no_grad():
        model.w.copy_(torch.tensor(w, dtype=torch.float64))
        model.stat.copy_(torch.tensor(stat, dtype=torch.float64))


def test_ema_warmup_decay_and_update_match_a_hand_computation():
    model = _Tiny()
    ema = EMA(model, decay=0.2, warmup=True)  # ema starts as a copy: [1, -2]
    # decay_n = min(0.2, (1 + n) / (10 + n)): 1/10, then 2/11, then min(0.2, 3/12) = 0.2
    # ema <- d * ema + (1 - d) * model
    steps = [
        # model w, model buffer, decay, expected ema w
        ([3.0, 0.5], [7.0, 1.0], 0.1, [0.1 * 1 + 0.9 * 3, 0.1 * -2 + 0.9 * 0.5]),  # [2.8, 0.25]
        ([-1.0, 4.0], [8.0, 2.0], 2 / 11, [-3.4 / 11, 36.5 / 11]),  # [-0.30909, 3.31818]
        ([0.5, 2.0], [9.0, 3.0], 0.2, [0.3381818181818182, 2.2636363636363637]),
    ]
    for n, (w, stat, decay, expected) in enumerate(steps):
        assert ema.num_updates == n
        assert ema.current_decay() == pytest.approx(decay, abs=1e-15)
        _set(model, w, stat)
        ema.update(model)
        torch.testing.assert_close(
            ema.module.w.detach(), torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-12
        )
        # buffers are copied, not averaged, and not shared with the live model
        assert torch.equal(ema.module.stat, torch.tensor(stat, dtype=torch.float64))
        assert ema.module.stat.data_ptr() != model.stat.data_ptr()
    assert ema.num_updates == 3
    assert model.w.tolist() == [0.5, 2.0]  # the live model is never touched


def test_ema_without_warmup_uses_the_decay_from_the_first_update():
    model = _Tiny()
    ema = EMA(model, decay=0.75, warmup=False)
    assert ema.current_decay() == 0.75
    _set(model, [5.0, 2.0], [0.0, 0.0])
    ema.update(model)
    assert ema.module.w.tolist() == [0.75 * 1 + 0.25 * 5, 0.75 * -2 + 0.25 * 2]  # [2.0, -1.0]


def test_ema_state_dict_round_trips_the_update_count():
    model = _Tiny()
    ema = EMA(model, decay=0.5)
    _set(model, [3.0, 3.0], [1.0, 1.0])
    ema.update(model)
    other = EMA(_Tiny(), decay=0.5)
    other.load_state_dict(ema.state_dict())
    assert other.num_updates == 1 and other.current_decay() == pytest.approx(2 / 11)
    assert torch.equal(other.module.w, ema.module.w)
