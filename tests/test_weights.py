"""The compact sparse weights format: exact round trip, layout, sizes, lossy 16-bit values."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sparsediff.models.unet import build_unet
from sparsediff.weights import (
    METADATA_KEY,
    compact_info,
    compact_size_report,
    load_compact,
    load_weights,
    pack_tensor,
    save_compact,
    unpack_tensor,
)


def random_sparse(state, sparsity, seed=0):
    """Zero a random ``sparsity`` fraction of every weight matrix/kernel; 1-D tensors stay."""
    gen = torch.Generator().manual_seed(seed)
    return {
        k: v * (torch.rand(v.shape, generator=gen) >= sparsity) if v.dim() >= 2 else v.clone()
        for k, v in state.items()
    }


@pytest.fixture(scope="module")
def unet_state():
    """A small UNet's fp32 state dict (1.1 M weights, 144 tensors)."""
    torch.manual_seed(0)
    return build_unet("fmnist", block_out_channels=(64, 128)).state_dict()


def stored_keys(path):
    with safe_open(str(path), framework="pt") as f:
        return set(f.keys())


def test_round_trip_is_exact_for_every_dtype(tmp_path, single_thread):
    gen = torch.Generator().manual_seed(0)
    sparse = torch.randn(64, 32, generator=gen) * (torch.rand(64, 32, generator=gen) > 0.7)
    sparse[0, :3] = torch.tensor([-0.0, 1e-30, -2.5])  # -0.0 reads back as +0.0: equal values
    state = {
        "sparse.weight": sparse,
        "dense.weight": torch.randn(40, 40, generator=gen),
        "bias": torch.zeros(7),
        "half": torch.randn(33, 17, generator=gen).half() * (torch.rand(33, 17) > 0.5),
        "bf16": torch.randn(300, generator=gen).bfloat16() * (torch.rand(300) > 0.5),
        "counter": torch.tensor(3, dtype=torch.int64),
        "flags": torch.rand(50, generator=gen) > 0.5,
        "scalar": torch.tensor(0.25),
    }
    path = save_compact(state, tmp_path / "w.safetensors")
    back = load_compact(path)
    assert back.keys() == state.keys()
    for name, t in state.items():
        assert back[name].dtype == t.dtype and back[name].shape == t.shape, name
        assert torch.equal(back[name], t), name
    keys = stored_keys(path)
    assert {"sparse.weight::mask", "sparse.weight::values"} <= keys
    assert {"dense.weight", "bias", "counter", "flags", "scalar"} <= keys  # not worth packing
    assert list(tmp_path.iterdir()) == [path]  # the atomic write left no temporary file


def test_mask_layout_is_numpy_packbits_big_bit_order():
    t = torch.tensor([[1.0, 0, 0, 0, 0, 0, 0, 0, 0, 2.0]])
    mask, values = pack_tensor(t)
    assert mask.dtype == torch.uint8 and mask.tolist() == [0b1000_0000, 0b0100_0000]
    assert values.tolist() == [1.0, 2.0]
    assert torch.equal(unpack_tensor(mask, values, [1, 10], torch.float32), t)
    with pytest.raises(ValueError, match="set bits"):
        unpack_tensor(mask, values[:1], [1, 10], torch.float32)


def test_metadata_names_format_shapes_and_dtypes(tmp_path):
    state = {"w": torch.zeros(64, 64), "b": torch.ones(3)}
    path = save_compact(state, tmp_path / "w.safetensors", value_dtype="bf16")
    info = compact_info(path)
    assert info["format"] == "sparsediff-compact" and info["version"] == 1
    assert info["value_dtype"] == "bfloat16"
    assert info["packed"] == {"w": {"shape": [64, 64], "dtype": "float32"}}
    with safe_open(str(path), framework="pt") as f:
        assert json.loads(f.metadata()[METADATA_KEY]) == info


@pytest.mark.parametrize(("sparsity", "limit"), [(0.5, 0.55), (0.9, 0.15)])
def test_size_against_dense_safetensors(tmp_path, unet_state, sparsity, limit, single_thread):
    state = random_sparse(unet_state, sparsity)
    dense = tmp_path / "dense.safetensors"
    save_file(state, str(dense))
    path = save_compact(state, tmp_path / "compact.safetensors")
    report = compact_size_report(path, dense)
    assert report["dense_bytes"] == dense.stat().st_size
    assert report["ratio"] <= limit, report
    assert report["packed_tensors"] > 0 and report["plain_tensors"] > 0  # biases stay plain
    back = load_compact(path)
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_dense_state_dict_is_not_inflated(tmp_path, unet_state):
    dense = tmp_path / "dense.safetensors"
    save_file(unet_state, str(dense))
    path = save_compact(unet_state, tmp_path / "compact.safetensors")
    assert path.stat().st_size <= dense.stat().st_size * 1.001


@pytest.mark.parametrize("value_dtype", ["fp16", torch.bfloat16])
def test_16_bit_values_are_lossy_but_restore_the_dtype(tmp_path, unet_state, value_dtype):
    state = random_sparse(unet_state, 0.5)
    exact = save_compact(state, tmp_path / "exact.safetensors")
    path = save_compact(state, tmp_path / "half.safetensors", value_dtype=value_dtype)
    assert path.stat().st_size < 0.6 * exact.stat().st_size
    packed = compact_info(path)["packed"]
    back = load_compact(path)
    cast = torch.float16 if value_dtype == "fp16" else torch.bfloat16
    for name, t in state.items():
        assert back[name].dtype == t.dtype
        expected = t.to(cast).to(t.dtype) if name in packed else t
        assert torch.equal(back[name], expected), name
    assert any(not torch.equal(back[k], state[k]) for k in packed)  # rounding happened


def test_load_weights_reads_both_formats(tmp_path):
    state = {"w": torch.randn(50, 50) * (torch.rand(50, 50) > 0.8), "b": torch.randn(5)}
    plain = tmp_path / "plain.safetensors"
    save_file(state, str(plain))
    compact = save_compact(state, tmp_path / "compact.safetensors")
    assert compact_info(plain) is None
    for path in (plain, compact):
        back = load_weights(path)
        assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
    with pytest.raises(ValueError, match="plain"):
        load_compact(plain)


def test_report_without_dense_file_counts_tensor_bytes(tmp_path):
    state = {"w": torch.randn(100, 100) * (torch.rand(100, 100) > 0.9), "b": torch.randn(10)}
    report = compact_size_report(save_compact(state, tmp_path / "c.safetensors"))
    assert report["dense_bytes"] == (100 * 100 + 10) * 4
    assert report["packed_tensors"] == 1 and report["plain_tensors"] == 1
    assert report["ratio"] < 0.2


def test_bad_inputs_are_refused(tmp_path):
    with pytest.raises(ValueError, match="reserved"):
        save_compact({"w::mask": torch.zeros(3)}, tmp_path / "x.safetensors")
    with pytest.raises(ValueError, match="value dtype"):
        save_compact({"w": torch.zeros(3)}, tmp_path / "x.safetensors", value_dtype="int8")
    path = save_compact({"w": torch.zeros(64, 64)}, tmp_path / "w.safetensors")
    tensors = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        info = json.loads(f.metadata()[METADATA_KEY])
    info["version"] = 99
    save_file(tensors, str(path), metadata={METADATA_KEY: json.dumps(info)})
    with pytest.raises(ValueError, match="version"):
        load_weights(path)
