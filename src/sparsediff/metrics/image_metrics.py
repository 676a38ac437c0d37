"""FID, KID and precision/recall computed from pre-extracted (N, D) features, in float64.

Conventions follow torch-fidelity (used by the study): unbiased covariance (N - 1), KID with
the cubic polynomial kernel ``(x.y / D + 1) ** 3``, unbiased MMD^2, 100 subsets of 1000 and a
population std over subsets; precision/recall as Kynkaanniemi et al. (2019) with k = 3.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .checks import check_feature_pair, check_features

# Rows per distance block: keeps a (rows x N) float64 block near 32 MB.
_BLOCK_ELEMENTS = 1 << 22


def feature_statistics(features: Tensor) -> tuple[Tensor, Tensor]:
    """Return the mean (D,) and unbiased covariance (D, D) of (N, D) features, float64."""
    features = check_features(features, "input")
    mu = features.mean(dim=0)
    centred = features - mu
    return mu, centred.T @ centred / (features.shape[0] - 1)


def _psd_factor(sigma: Tensor) -> Tensor:
    """Return F with F @ F.T = sigma, negative rounding-noise eigenvalues clipped to 0."""
    evals, evecs = torch.linalg.eigh((sigma + sigma.T) / 2)
    return evecs * evals.clamp(min=0).sqrt()


def _distance_from_factors(diff: Tensor, f1: Tensor, f2: Tensor) -> float:
    """Fréchet distance given the mean difference and factors with F @ F.T = covariance.

    ``tr (S1 S2)^(1/2)`` is the sum of singular values of ``F1.T @ F2`` and ``tr S = |F|_F^2``.
    """
    tr_covmean = torch.linalg.svdvals(f1.T @ f2).sum()
    return float(diff @ diff + f1.square().sum() + f2.square().sum() - 2 * tr_covmean)


def frechet_distance(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> float:
    """Fréchet distance ``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))`` in float64.

    Computed from symmetric square-root factors of the covariances (eigh). This is the same
    number as ``scipy.linalg.sqrtm`` gives on well-conditioned input, but it stays real and
    accurate when the covariances are singular (fewer samples than dimensions), where sqrtm
    returns complex noise.
    """
    mu1, mu2 = (torch.as_tensor(m, dtype=torch.float64).cpu() for m in (mu1, mu2))
    sigma1, sigma2 = (torch.as_tensor(s, dtype=torch.float64).cpu() for s in (sigma1, sigma2))
    dim = mu1.shape[0]
    if mu1.shape != (dim,) or mu2.shape != (dim,):
        raise ValueError(f"means must both be ({dim},), got {tuple(mu1.shape)}, {tuple(mu2.shape)}")
    if sigma1.shape != (dim, dim) or sigma2.shape != (dim, dim):
        raise ValueError(
            f"covariances must be ({dim}, {dim}), got {tuple(sigma1.shape)}, {tuple(sigma2.shape)}"
        )
    for name, t in (("mu1", mu1), ("sigma1", sigma1), ("mu2", mu2), ("sigma2", sigma2)):
        if not torch.isfinite(t).all():
            raise ValueError(f"{name} contains NaN or infinite values")
    return _distance_from_factors(mu1 - mu2, _psd_factor(sigma1), _psd_factor(sigma2))


def _data_factor(features: Tensor) -> Tensor:
    """(D, N) factor F of the unbiased covariance: F @ F.T = sigma."""
    return (features - features.mean(dim=0)).T / (features.shape[0] - 1) ** 0.5


def fid_from_features(real: Tensor, fake: Tensor) -> float:
    """FID between two (N, D) feature sets (each needs at least 2 samples)."""
    real, fake = check_feature_pair(real, fake)
    if real.shape[0] * fake.shape[0] <= real.shape[1] ** 2:
        # Few samples: an (N_real, N_fake) SVD replaces two (D, D) eigendecompositions.
        diff = real.mean(dim=0) - fake.mean(dim=0)
        return _distance_from_factors(diff, _data_factor(real), _data_factor(fake))
    return frechet_distance(*feature_statistics(real), *feature_statistics(fake))


def _mmd2_unbiased(x: Tensor, y: Tensor) -> Tensor:
    """Unbiased MMD^2 with k(a, b) = (a.b / D + 1)^3 for equal-size sets x, y."""
    m, gamma = x.shape[0], 1.0 / x.shape[1]
    k_xx = (x @ x.T * gamma + 1) ** 3
    k_yy = (y @ y.T * gamma + 1) ** 3
    k_xy = (x @ y.T * gamma + 1) ** 3
    # Unbiased: the within-set means leave out the diagonal k(a, a) terms.
    within = k_xx.sum() - k_xx.diagonal().sum() + k_yy.sum() - k_yy.diagonal().sum()
    return within / (m * (m - 1)) - 2 * k_xy.sum() / (m * m)


def kid_from_features(
    real: Tensor, fake: Tensor, subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """KID mean and std over ``subsets`` random subsets (without replacement) of each set.

    ``subset_size`` is clipped to the smaller set; when that covers both sets entirely every
    subset is identical, so one evaluation is done and the std is 0.
    """
    if subsets < 1 or subset_size < 2:
        raise ValueError(f"need subsets >= 1 and subset_size >= 2, got {subsets}, {subset_size}")
    real, fake = check_feature_pair(real, fake)
    n = min(subset_size, real.shape[0], fake.shape[0])
    if n == real.shape[0] == fake.shape[0]:
        return float(_mmd2_unbiased(real, fake)), 0.0
    gen = torch.Generator().manual_seed(seed)
    scores = torch.stack(
        [
            _mmd2_unbiased(
                real[torch.randperm(real.shape[0], generator=gen)[:n]],
                fake[torch.randperm(fake.shape[0], generator=gen)[:n]],
            )
            for _ in range(subsets)
        ]
    )
    return float(scores.mean()), float(scores.std(unbiased=False))


def _knn_radii(x: Tensor, k: int) -> Tensor:
    """Distance from each row of x to its k-th nearest other row (self excluded)."""
    rows = max(1, _BLOCK_ELEMENTS // x.shape[0])
    radii = []
    for start in range(0, x.shape[0], rows):
        d = torch.cdist(x[start : start + rows], x)
        local = torch.arange(d.shape[0])
        d[local, local + start] = float("inf")
        radii.append(d.topk(k, dim=1, largest=False).values[:, -1])
    return torch.cat(radii)


def _fraction_covered(query: Tensor, ref: Tensor, radii: Tensor) -> float:
    """Fraction of query rows inside at least one ball (ref[j], radii[j])."""
    rows = max(1, _BLOCK_ELEMENTS // ref.shape[0])
    inside = 0
    for chunk in query.split(rows):
        inside += int((torch.cdist(chunk, ref) <= radii).any(dim=1).sum())
    return inside / query.shape[0]


def precision_recall(real: Tensor, fake: Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al., 2019) with k-NN balls.

    precision: fraction of fake samples inside the union of real k-NN balls;
    recall: fraction of real samples inside the union of fake k-NN balls.
    Each set needs more than ``k`` samples.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    real, fake = check_feature_pair(real, fake, min_samples=k + 1)
    precision = _fraction_covered(fake, real, _knn_radii(real, k))
    recall = _fraction_covered(real, fake, _knn_radii(fake, k))
    return precision, recall


def compute_metrics(
    real_features: Tensor,
    fake_features: Tensor,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    pr_k: int = 3,
    seed: int = 0,
) -> dict[str, float | int]:
    """FID, KID (mean, std) and precision/recall between two (N, D) feature sets.

    Returns a dict with keys fid, kid_mean, kid_std, precision, recall, num_real, num_fake.
    """
    real, fake = check_feature_pair(real_features, fake_features, min_samples=max(2, pr_k + 1))
    kid_mean, kid_std = kid_from_features(real, fake, kid_subsets, kid_subset_size, seed)
    precision, recall = precision_recall(real, fake, k=pr_k)
    return {
        "fid": fid_from_features(real, fake),
        "kid_mean": kid_mean,
        "kid_std": kid_std,
        "precision": precision,
        "recall": recall,
        "num_real": int(real.shape[0]),
        "num_fake": int(fake.shape[0]),
    }
