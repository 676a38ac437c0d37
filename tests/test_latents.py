import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

import sparsediff.data.latents as latents_mod
from sparsediff.data.images import ImageFolderDataset
from sparsediff.data.latents import LatentCache, LatentDataset
from sparsediff.models.autoencoder import build_autoencoder, encode_latents

pytestmark = pytest.mark.usefixtures("single_thread")


def image_folder(root, n=5, corrupt=0):
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / f"{i}.png")
    for i in range(corrupt):
        (root / f"bad{i}.png").write_bytes(b"garbage")
    return ImageFolderDataset(root, 16, "all", name="toy")


def tiny_ae(seed=0):
    torch.manual_seed(seed)
    return build_autoencoder("vq", "tiny")


def test_build_encodes_in_eval_mode_and_matches_direct_encoding(tmp_path):
    ds = image_folder(tmp_path / "imgs", n=5)
    ae = tiny_ae().train()
    lat = LatentCache.build_or_load(tmp_path / "cache", ae, ds, batch_size=2, progress=False)
    assert isinstance(lat, LatentDataset) and len(lat) == 5 and lat.latent_shape == (3, 8, 8)
    assert ae.training  # mode restored after encoding
    with torch.no_grad():
        ref = encode_latents(ae.eval(), torch.stack([ds[i] for i in range(5)]))
    torch.testing.assert_close(lat.as_tensor(), ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lat[4], ref[4], rtol=1e-5, atol=1e-5)
    meta = lat.meta
    assert meta["count"] == 5 and meta["skipped"] == 0 and meta["latent_shape"] == [3, 8, 8]
    assert meta["dataset"]["name"] == "toy" and meta["dataset"]["resolution"] == 16
    assert meta["std"] == pytest.approx(ref.double().std().item(), rel=1e-5)
    assert len(meta["channel_std"]) == 3
    with safe_open(str(lat.path), framework="pt") as f:  # self-describing file
        assert json.loads(f.metadata()["sparsediff_latents"])["count"] == 5


def test_cache_hit_skips_encoding_and_mismatch_rebuilds(tmp_path, monkeypatch):
    ds = image_folder(tmp_path / "imgs", n=3)
    ae = tiny_ae()
    cache = tmp_path / "cache"
    first = LatentCache.build_or_load(cache, ae, ds, 2, {"ckpt": "a"}, progress=False)
    calls = []
    real_encode = latents_mod.encode_latents

    def counting_encode(*args, **kw):
        calls.append(1)
        return real_encode(*args, **kw)

    monkeypatch.setattr(latents_mod, "encode_latents", counting_encode)
    again = LatentCache.build_or_load(cache, ae, ds, 2, {"ckpt": "a"}, progress=False)
    assert not calls and again.path == first.path
    torch.testing.assert_close(again.as_tensor(), first.as_tensor())

    LatentCache.build_or_load(cache, ae, ds, 2, {"ckpt": "b"}, progress=False)
    assert calls  # extra fingerprint differs → re-encoded
    calls.clear()
    other = tiny_ae(seed=1)  # different weights → different fingerprint → rebuilt
    rebuilt = LatentCache.build_or_load(cache, other, ds, 2, {"ckpt": "b"}, progress=False)
    assert calls and rebuilt.path == first.path
    assert not torch.allclose(rebuilt.as_tensor(), first.as_tensor())
    assert len(list(cache.glob("*.safetensors"))) == 1  # overwritten in place, no temp left


def test_corrupt_images_are_dropped_and_counted(tmp_path):
    ds = image_folder(tmp_path / "imgs", n=4, corrupt=2)
    lat = LatentCache.build_or_load(tmp_path / "c", tiny_ae(), ds, 4, progress=False)
    assert len(lat) == 4 and lat.meta["skipped"] == 2 and lat.meta["dataset"]["count"] == 6


def test_all_unreadable_is_an_error(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    (root / "x.png").write_bytes(b"nope")
    ds = ImageFolderDataset(root, 16, "all")
    with pytest.raises(ValueError, match="no readable images"):
        LatentCache.build_or_load(tmp_path / "c", tiny_ae(), ds, 2, progress=False)


def test_scale_factor_is_recorded_not_applied_and_float16_storage(tmp_path):
    ds = image_folder(tmp_path / "imgs", n=4)
    ae = tiny_ae()
    lat = LatentCache.build_or_load(tmp_path / "c", ae, ds, 4, progress=False)
    with torch.no_grad():
        ref = encode_latents(ae.eval(), torch.stack([ds[i] for i in range(4)]))
    torch.testing.assert_close(lat[0], ref[0], rtol=1e-5, atol=1e-5)  # items are unscaled
    assert lat.scale_factor == pytest.approx(1 / ref.double().std().item(), rel=1e-5)
    assert (lat.as_tensor() * lat.scale_factor).std().item() == pytest.approx(1.0, rel=1e-4)
    per_channel = ref.transpose(0, 1).reshape(3, -1).double().std(dim=1)
    assert lat.channel_std == pytest.approx(per_channel.tolist(), rel=1e-5)
    half = LatentCache.build_or_load(tmp_path / "c", ae, ds, 4, dtype=torch.float16, progress=False)
    assert half.latents.dtype == torch.float16 and half[0].dtype == torch.float32
    torch.testing.assert_close(half.as_tensor(), lat.as_tensor(), rtol=2e-3, atol=2e-3)
