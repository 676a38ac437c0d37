import ast
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

import sparsediff.data
from sparsediff.data.images import ImageFolderDataset
from sparsediff.data.latents import LatentCache, LatentDataset
from sparsediff.models.autoencoder import (
    autoencoder_fingerprint,
    build_autoencoder,
    encode_latents,
)

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
    return build_autoencoder("vq", "tiny").eval()


def build(cache_dir, ae, ds, *args, calls=None, **kw):
    """``LatentCache.build_or_load`` with the autoencoder's encode function and fingerprint."""

    def encode(x):
        if calls is not None:
            calls.append(len(x))
        assert not torch.is_grad_enabled()
        return encode_latents(ae, x)

    kw.setdefault("progress", False)
    return LatentCache.build_or_load(
        cache_dir, encode, autoencoder_fingerprint(ae), ds, *args, **kw
    )


def test_build_matches_direct_encoding(tmp_path):
    ds = image_folder(tmp_path / "imgs", n=5)
    ae = tiny_ae()
    calls = []
    lat = build(tmp_path / "cache", ae, ds, batch_size=2, calls=calls)
    assert isinstance(lat, LatentDataset) and len(lat) == 5 and lat.latent_shape == (3, 8, 8)
    assert calls == [2, 2, 1]  # batched
    with torch.no_grad():
        ref = encode_latents(ae, torch.stack([ds[i] for i in range(5)]))
    torch.testing.assert_close(lat.latents, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lat[4], ref[4], rtol=1e-5, atol=1e-5)
    meta = lat.meta
    assert meta["count"] == 5 and meta["skipped"] == 0 and meta["latent_shape"] == [3, 8, 8]
    assert meta["dataset"]["name"] == "toy" and meta["dataset"]["resolution"] == 16
    assert meta["std"] == pytest.approx(ref.double().std().item(), rel=1e-5)
    assert len(meta["channel_std"]) == 3
    with safe_open(str(lat.path), framework="pt") as f:  # self-describing file
        assert json.loads(f.metadata()["sparsediff_latents"])["count"] == 5


def test_cache_hit_skips_encoding_and_mismatch_rebuilds(tmp_path):
    ds = image_folder(tmp_path / "imgs", n=3)
    ae = tiny_ae()
    cache = tmp_path / "cache"
    first = build(cache, ae, ds, 2, {"ckpt": "a"})
    assert first.meta["ae_fingerprint"] == autoencoder_fingerprint(ae)
    calls = []
    again = build(cache, ae, ds, 2, {"ckpt": "a"}, calls=calls)
    assert not calls and again.path == first.path
    torch.testing.assert_close(again.latents, first.latents)

    build(cache, ae, ds, 2, {"ckpt": "b"}, calls=calls)
    assert calls  # extra fingerprint differs → re-encoded
    calls.clear()
    other = tiny_ae(seed=1)  # different weights → different fingerprint → rebuilt
    rebuilt = build(cache, other, ds, 2, {"ckpt": "b"}, calls=calls)
    assert calls and rebuilt.path == first.path
    assert not torch.allclose(rebuilt.latents, first.latents)
    assert [p.name for p in cache.iterdir()] == [first.path.name]  # overwritten, no temp left
    with pytest.raises(TypeError, match="fingerprint"):
        LatentCache.build_or_load(cache, lambda x: x, None, ds, progress=False)


def test_corrupt_images_are_dropped_counted_and_reported(tmp_path, capsys):
    ds = image_folder(tmp_path / "imgs", n=4, corrupt=2)
    lat = build(tmp_path / "c", tiny_ae(), ds, 4)
    assert len(lat) == 4 and lat.meta["skipped"] == 2 and lat.meta["dataset"]["count"] == 6
    out = capsys.readouterr()
    assert "skipped 2 unreadable image(s)" in out.out + out.err and "bad0.png" in out.out + out.err


def test_all_unreadable_is_an_error(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    (root / "x.png").write_bytes(b"nope")
    ds = ImageFolderDataset(root, 16, "all")
    with pytest.raises(ValueError, match="no readable images"):
        build(tmp_path / "c", tiny_ae(), ds, 2)


def test_scale_factor_is_recorded_not_applied_and_float16_storage(tmp_path):
    ds = image_folder(tmp_path / "imgs", n=4)
    ae = tiny_ae()
    lat = build(tmp_path / "c", ae, ds, 4)
    with torch.no_grad():
        ref = encode_latents(ae, torch.stack([ds[i] for i in range(4)]))
    torch.testing.assert_close(lat[0], ref[0], rtol=1e-5, atol=1e-5)  # items are unscaled
    assert lat.scale_factor == pytest.approx(1 / ref.double().std().item(), rel=1e-5)
    assert (lat.latents * lat.scale_factor).std().item() == pytest.approx(1.0, rel=1e-4)
    per_channel = ref.transpose(0, 1).reshape(3, -1).double().std(dim=1)
    assert lat.meta["channel_std"] == pytest.approx(per_channel.tolist(), rel=1e-5)
    half = build(tmp_path / "c", ae, ds, 4, dtype=torch.float16)
    assert half.latents.dtype == torch.float16 and half[0].dtype == torch.float32
    torch.testing.assert_close(half.latents.float(), lat.latents, rtol=2e-3, atol=2e-3)


def test_data_package_imports_no_higher_layer():
    forbidden = ("sparsediff.models", "sparsediff.pipelines", "sparsediff.training")
    for path in Path(sparsediff.data.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            bad = [n for n in names if n.startswith(forbidden)]
            assert not bad, f"{path.name} imports {bad}"
