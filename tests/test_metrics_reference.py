import json

import pytest
import torch
from safetensors.torch import load_file

from sparsediff.metrics import (
    PREPROCESSING_VERSION,
    ReferenceCache,
    feature_statistics,
    key_digest,
    reference_key,
)


class Counter:
    def __init__(self, features):
        self.features = features
        self.calls = 0

    def __call__(self):
        self.calls += 1
        return self.features


def _key(**overrides):
    key = reference_key("celebahq", "val", 500, 256, "a16e4d89", subset_seed=0)
    return {**key, **overrides}


def _float32_features(n=6, d=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g).to(torch.float64)


def test_hit_after_miss_calls_compute_once(tmp_path):
    cache, compute = ReferenceCache(tmp_path), Counter(_float32_features())
    first = cache.get_or_compute(_key(), compute)
    second = cache.get_or_compute(_key(), compute)
    assert compute.calls == 1
    torch.testing.assert_close(second, compute.features, rtol=0, atol=0)
    assert first.dtype == second.dtype == torch.float64
    # A fresh cache object on the same directory also hits (nothing kept in memory only).
    assert ReferenceCache(tmp_path).load(_key()) is not None


def test_different_key_recomputes(tmp_path):
    cache = ReferenceCache(tmp_path)
    a, b = Counter(_float32_features(seed=1)), Counter(_float32_features(seed=2))
    cache.get_or_compute(_key(), a)
    out = cache.get_or_compute(_key(feature_network_sha1="other"), b)
    assert a.calls == 1 and b.calls == 1
    torch.testing.assert_close(out, b.features)
    assert len(list(tmp_path.glob("*.safetensors"))) == 2


def test_key_hash_is_order_independent_and_key_stored_as_json(tmp_path):
    key = _key()
    assert key_digest(dict(reversed(list(key.items())))) == key_digest(key)
    assert key["preprocessing"] == PREPROCESSING_VERSION
    cache = ReferenceCache(tmp_path)
    cache.get_or_compute(key, Counter(_float32_features()))
    tensor_path, json_path = cache.paths(key)
    assert json.loads(json_path.read_text()) == key
    assert tensor_path.name == key_digest(key) + ".safetensors"


def test_stored_statistics_match_features(tmp_path):
    cache = ReferenceCache(tmp_path)
    features = _float32_features(n=20, d=5)
    cache.get_or_compute(_key(), Counter(features))
    entry = cache.load(_key())
    mu, sigma = feature_statistics(features)
    torch.testing.assert_close(entry["mu"], mu)
    torch.testing.assert_close(entry["sigma"], sigma)
    # float32-representable features are stored as float32 (lossless, half the size).
    raw = load_file(cache.paths(_key())[0])
    assert raw["features"].dtype == torch.float32


def test_float64_features_that_need_float64_are_kept_exactly(tmp_path):
    cache = ReferenceCache(tmp_path)
    features = _float32_features() + 1e-12
    cache.get_or_compute(_key(), Counter(features))
    torch.testing.assert_close(cache.load(_key())["features"], features, rtol=0, atol=0)


def test_mismatching_stored_key_is_a_miss(tmp_path):
    cache = ReferenceCache(tmp_path)
    cache.get_or_compute(_key(), Counter(_float32_features()))
    cache.paths(_key())[1].write_text(json.dumps(_key(split="train")))
    compute = Counter(_float32_features(seed=3))
    torch.testing.assert_close(cache.get_or_compute(_key(), compute), compute.features)
    assert compute.calls == 1


def test_bad_keys_and_bad_features_raise(tmp_path):
    cache = ReferenceCache(tmp_path)
    with pytest.raises(ValueError, match="JSON values"):
        cache.get_or_compute({"dataset": object()}, Counter(_float32_features()))
    with pytest.raises(ValueError, match="non-empty dict"):
        cache.get_or_compute({}, Counter(_float32_features()))
    with pytest.raises(ValueError, match="need at least 2"):
        cache.get_or_compute(_key(), Counter(torch.zeros(1, 4)))
    assert not list(tmp_path.iterdir())
