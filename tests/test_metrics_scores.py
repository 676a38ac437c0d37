import itertools

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

import sparsediff.metrics.image_metrics as im
from sparsediff.metrics import (
    compute_metrics,
    feature_statistics,
    fid_from_features,
    frechet_distance,
    kid_from_features,
    precision_recall,
)

# float results compared across two computations: CI runs these under other CPU kernels too
pytestmark = pytest.mark.kernels


def _features(n, d, seed, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(d, d, generator=g, dtype=torch.float64)
    return torch.randn(n, d, generator=g, dtype=torch.float64) @ mixing + shift


def _scipy_fid(real, fake):
    # The pytorch-fid / torch-fidelity reference formula, float64 numpy + scipy sqrtm.
    a, b = real.numpy(), fake.numpy()
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def _eigvals_fid(real, fake):
    # Eigenvalue form, valid for singular covariances: tr sqrt(S1 S2) = sum sqrt(eig(S1 S2)).
    a, b = real.numpy(), fake.numpy()
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    tr_covmean = np.sqrt(np.linalg.eigvals(s1 @ s2).astype(complex)).real.sum()
    diff = a.mean(0) - b.mean(0)
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def test_fid_matches_scipy_reference_on_full_rank_features():
    real, fake = _features(300, 8, 0), _features(250, 8, 1, shift=0.5)
    expected = _scipy_fid(real, fake)
    assert expected > 1.0
    assert fid_from_features(real, fake) == pytest.approx(expected, rel=1e-9)
    stats = (*feature_statistics(real), *feature_statistics(fake))
    assert frechet_distance(*stats) == pytest.approx(expected, rel=1e-9)


def test_fid_few_samples_route_matches_covariance_route_and_reference():
    # 12 * 14 <= 16**2: fid_from_features takes the (N, N) data-factor route; both
    # covariances are singular, where sqrtm is unreliable, so compare with the eig form.
    real, fake = _features(12, 16, 2), _features(14, 16, 3, shift=0.3)
    via_factors = fid_from_features(real, fake)
    via_sigmas = frechet_distance(*feature_statistics(real), *feature_statistics(fake))
    assert via_factors == pytest.approx(via_sigmas, rel=1e-9)
    assert via_factors == pytest.approx(_eigvals_fid(real, fake), rel=1e-6)


@pytest.mark.parametrize("n", [6, 200])
def test_fid_of_a_set_with_itself_is_zero(n):
    x = _features(n, 16, 4)
    assert abs(fid_from_features(x, x)) < 1e-6


@pytest.mark.filterwarnings("ignore:Metric `Kernel Inception Distance` will save")
def test_fid_and_kid_agree_with_torchmetrics_on_features():
    class IdentityFeatures(nn.Module):
        num_features = 8

        def forward(self, x):
            return x

    real, fake = _features(40, 8, 5), _features(40, 8, 6, shift=0.2)
    tm_fid = FrechetInceptionDistance(feature=IdentityFeatures())
    tm_fid.update(real, real=True)
    tm_fid.update(fake, real=False)
    assert fid_from_features(real, fake) == pytest.approx(tm_fid.compute().item(), rel=1e-6)
    # One subset covering both whole sets: torchmetrics' random permutation is irrelevant.
    tm_kid = KernelInceptionDistance(feature=IdentityFeatures(), subsets=1, subset_size=40)
    tm_kid.update(real, real=True)
    tm_kid.update(fake, real=False)
    kid_mean, kid_std = kid_from_features(real, fake, subsets=1, subset_size=40)
    assert kid_mean == pytest.approx(tm_kid.compute()[0].item(), rel=1e-9)
    assert kid_std == 0.0


def test_kid_hand_computed_1d():
    # D = 1 so k(a, b) = (a*b + 1)^3. Kxx off-diagonal: 1, 1 -> 1; Kyy off-diagonal:
    # (6+1)^3 = 343 -> 343; Kxy: 1, 1, 27, 64 -> 2 * 93 / 4 = 46.5. MMD^2 = 1 + 343 - 46.5.
    real = torch.tensor([[0.0], [1.0]])
    fake = torch.tensor([[2.0], [3.0]])
    assert kid_from_features(real, fake, subsets=100, subset_size=1000) == (297.5, 0.0)


def _mmd2_loops(x, y):
    m, d = len(x), len(x[0])

    def k(a, b):
        return (sum(ai * bi for ai, bi in zip(a, b)) / d + 1) ** 3

    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_kid_matches_hand_written_unbiased_mmd_on_2d_points():
    real = [[0.0, 1.0], [2.0, -1.0], [0.5, 0.5], [-1.0, 3.0], [1.5, 2.0]]
    fake = [[1.0, 1.0], [3.0, 0.0], [2.5, 2.5], [0.0, -2.0], [4.0, 1.0]]
    mean, std = kid_from_features(torch.tensor(real), torch.tensor(fake), subset_size=5)
    assert mean == pytest.approx(_mmd2_loops(real, fake), rel=1e-12)
    assert std == 0.0


def test_kid_subsets_sample_without_replacement_and_are_seeded():
    real, fake = _features(3, 2, 7), _features(5, 2, 8, shift=1.0)
    # subset_size clips to 3: each subset is all 3 reals and 3 of the 5 fakes, so the mean
    # over many subsets estimates the average over the 10 possible fake triples.
    triples = [
        im._mmd2_unbiased(real, fake[list(c)]).item() for c in itertools.combinations(range(5), 3)
    ]
    mean, std = kid_from_features(real, fake, subsets=400, subset_size=1000, seed=0)
    spread = float(np.std(triples))
    assert spread > 0 and std > 0
    assert mean == pytest.approx(float(np.mean(triples)), abs=4 * spread / 20)
    assert kid_from_features(real, fake, subsets=400, seed=0) == (mean, std)
    assert kid_from_features(real, fake, subsets=400, seed=1) != (mean, std)


def test_precision_recall_hand_computed_1d():
    # k = 2. Real [0, 1, 2, 4] has 2nd-NN radii [2, 1, 2, 3]: union of balls = [-2, 7].
    # Fake [-3, -2.5, -2, 3.5, 4, 5] has radii [1, .5, 1, 1.5, 1, 1.5]: union [-4, -1] U [2, 6.5].
    # Precision: -2, 3.5, 4, 5 inside (-2 on the boundary) -> 4/6.
    # Recall: 2 (boundary of 3.5's ball) and 4 inside, 0 and 1 outside -> 2/4.
    real = torch.tensor([[0.0], [1.0], [2.0], [4.0]])
    fake = torch.tensor([[-3.0], [-2.5], [-2.0], [3.5], [4.0], [5.0]])
    precision, recall = precision_recall(real, fake, k=2)
    assert precision == pytest.approx(4 / 6)
    assert recall == pytest.approx(0.5)


def test_precision_recall_obvious_2d_cases():
    grid = torch.tensor([[x, y] for x in range(4) for y in range(4)], dtype=torch.float64)
    assert precision_recall(grid, grid.clone()) == (1.0, 1.0)
    assert precision_recall(grid, grid + 100.0) == (0.0, 0.0)
    # Fake collapsed onto one corner: all fake are real-looking, few reals are covered.
    collapsed = torch.tensor([[0.0, 0.0], [0.0, 0.1], [0.1, 0.0], [0.1, 0.1]])
    precision, recall = precision_recall(grid, collapsed)
    assert precision == 1.0
    assert recall == pytest.approx(1 / 16)


def test_precision_recall_blocking_does_not_change_result(monkeypatch):
    real, fake = _features(37, 5, 9), _features(29, 5, 10, shift=0.4)
    expected = precision_recall(real, fake)
    assert 0.0 < expected[0] < 1.0 or 0.0 < expected[1] < 1.0
    monkeypatch.setattr(im, "_BLOCK_ELEMENTS", 40)  # one or two rows per distance block
    assert precision_recall(real, fake) == expected


def test_compute_metrics_returns_all_keys():
    real, fake = _features(30, 4, 11), _features(20, 4, 12, shift=2.0)
    out = compute_metrics(real, fake, kid_subsets=10, kid_subset_size=10, seed=3)
    assert set(out) == {"fid", "kid_mean", "kid_std", "precision", "recall", "num_real", "num_fake"}
    assert out["num_real"] == 30 and out["num_fake"] == 20
    assert out["fid"] == pytest.approx(fid_from_features(real, fake))
    assert (out["kid_mean"], out["kid_std"]) == kid_from_features(real, fake, 10, 10, seed=3)
    assert out["fid"] > 1.0 and out["kid_mean"] > 0


@pytest.mark.parametrize(
    ("real", "fake", "match"),
    [
        (torch.zeros(1, 4), torch.zeros(5, 4), "real features: need at least 2"),
        (torch.rand(5, 4), torch.rand(1, 4), "fake features: need at least 2"),
        (torch.rand(5, 4), torch.rand(5, 3), "feature dimensions differ"),
        (torch.full((5, 4), float("nan")), torch.rand(5, 4), "NaN"),
        (torch.rand(5), torch.rand(5, 4), r"expected a \(N, D\)"),
    ],
)
def test_bad_feature_sets_raise(real, fake, match):
    with pytest.raises(ValueError, match=match):
        fid_from_features(real, fake)
    with pytest.raises(ValueError, match=match):
        kid_from_features(real, fake)


def test_precision_recall_needs_more_than_k_samples():
    with pytest.raises(ValueError, match="need at least 4"):
        precision_recall(torch.rand(3, 2), torch.rand(10, 2), k=3)


def test_frechet_distance_rejects_bad_statistics():
    mu, sigma = torch.zeros(3), torch.eye(3)
    with pytest.raises(ValueError, match="covariances"):
        frechet_distance(mu, sigma, mu, torch.eye(2))
    with pytest.raises(ValueError, match="sigma2 contains NaN"):
        frechet_distance(mu, sigma, mu, torch.full((3, 3), float("nan")))
