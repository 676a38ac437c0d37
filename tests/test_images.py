import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_idx
from PIL import Image

from sparsediff.data.idx import read_idx
from sparsediff.data.images import (
    DATASET_HELP,
    FASHION_MNIST_DIR,
    FashionMNIST,
    ImageFolderDataset,
    build_image_dataset,
    collate_skip_none,
)
from sparsediff.data.splits import fraction_sizes, seeded_split


def fmnist_fixture(root, n_train=5, n_test=3, compress=True):
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    gz = ".gz" if compress else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28))
        images[0] = 0
        images[0, 0, 0] = 255  # top-left pixel marks where the padding puts the image
        write_idx(root / f"{prefix}-images-idx3-ubyte{gz}", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte{gz}", np.arange(n) % 10)
    return root


def save_image(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8)).save(path)


# ---------------------------------------------------------------- Fashion-MNIST


@pytest.mark.parametrize("compress", [True, False])
def test_fashion_mnist_fixture_padding_and_range(tmp_path, compress):
    root = fmnist_fixture(tmp_path / "fm", compress=compress)
    ds = FashionMNIST(root, split="train")
    assert len(ds) == 5 and ds.labels.tolist() == [0, 1, 2, 3, 4]
    x = ds[0]
    assert x.shape == (1, 32, 32) and x.dtype == torch.float32
    assert x[0, 2, 2].item() == 1.0  # 255 at (0, 0) lands at (2, 2) after 2-pixel padding
    assert (x[:, :2] == -1).all() and (x[:, :, -2:] == -1).all()  # zero padding = background
    assert x.sum().item() == pytest.approx(1.0 - (32 * 32 - 1))
    batch = torch.stack([ds[i] for i in range(len(ds))])
    assert -1 <= batch.min() and batch.max() <= 1
    test = FashionMNIST(root, split="test", pad_to=28, max_items=2)
    assert len(test) == 2 and test[1].shape == (1, 28, 28)
    assert ds.pop_skipped_report() is None


def test_idx_magic_and_truncation_are_validated(tmp_path):
    path = write_idx(tmp_path / "x-idx3-ubyte", np.zeros((2, 3, 3)))
    with pytest.raises(ValueError, match="expected 2049"):
        read_idx(path, 2049)
    floats = write_idx(tmp_path / "f-idx3-ubyte", np.zeros((2, 3, 3)), dtype=">f4")
    with pytest.raises(ValueError, match="expected 2051"):  # float images are not (F)MNIST
        read_idx(floats, 2051)
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x00\x00\x0a\x03" + b"\x00" * 20)  # 0x0a is no IDX type
    with pytest.raises(ValueError, match="magic"):
        read_idx(bad)
    short = tmp_path / "short"
    short.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(ValueError, match="truncated"):
        read_idx(short)


@pytest.mark.parametrize("dtype", ["u1", "i1", ">i2", ">i4", ">f4", ">f8"])
@pytest.mark.parametrize("name", ["x-idx", "x-idx.gz"])
def test_idx_round_trip_of_every_type(tmp_path, dtype, name):
    arr = np.arange(24).reshape(2, 3, 4) - (0 if dtype == "u1" else 12)
    out = read_idx(write_idx(tmp_path / name, arr, dtype=dtype))
    assert out.dtype == np.dtype(dtype).newbyteorder("=") and out.dtype.isnative
    np.testing.assert_array_equal(out, arr)


def test_fashion_mnist_missing_files_explain_fix(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        FashionMNIST(tmp_path)
    assert "apt-get install dataset-fashion-mnist" in str(err.value)
    assert "data.path" in str(err.value)


@pytest.mark.skipif(
    not Path(FASHION_MNIST_DIR, "t10k-images-idx3-ubyte.gz").is_file(),
    reason="Debian package dataset-fashion-mnist not installed",
)
def test_real_fashion_mnist_test_split():
    ds = build_image_dataset("fashion-mnist", None, 32, "test")
    assert len(ds) == 10_000 and ds[0].shape == (1, 32, 32)
    assert np.bincount(ds.labels).tolist() == [1000] * 10


# ---------------------------------------------------------------- image folders


def test_image_folder_crop_resize_and_formats(tmp_path):
    wide = np.zeros((40, 80, 3))
    wide[:, :20] = (255, 0, 0)  # left/right bands are cropped away
    wide[:, 60:] = (255, 0, 0)
    wide[:, 20:60] = (0, 0, 255)
    save_image(tmp_path / "a" / "wide.png", wide)
    save_image(tmp_path / "b" / "c" / "gray.jpg", np.full((30, 30), 128))
    Image.new("RGBA", (16, 16), (0, 255, 0, 10)).save(tmp_path / "rgba.webp", lossless=True)
    (tmp_path / "notes.txt").write_text("not an image")
    ds = ImageFolderDataset(tmp_path, resolution=16, split="all")
    assert [Path(f).name for f in ds.files] == ["wide.png", "gray.jpg", "rgba.webp"]
    wide_t, gray_t, rgba_t = ds[0], ds[1], ds[2]
    assert wide_t.shape == gray_t.shape == rgba_t.shape == (3, 16, 16)
    torch.testing.assert_close(wide_t[:, 8, 8], torch.tensor([-1.0, -1.0, 1.0]))
    assert (wide_t[2] > 0.9).all() and (wide_t[0] < -0.9).all()
    assert gray_t.mean().item() == pytest.approx(128 / 127.5 - 1, abs=0.02)
    torch.testing.assert_close(rgba_t[:, 0, 0], torch.tensor([-1.0, 1.0, -1.0]))


def test_seeded_split_cuts_one_seeded_permutation():
    perm = np.random.default_rng(3).permutation(50)  # the split's permutation, pinned
    parts = [seeded_split(50, (40, 5, None), k, seed=3) for k in range(3)]
    np.testing.assert_array_equal(np.concatenate(parts), perm)
    np.testing.assert_array_equal(seeded_split(50, (45, 10), 1, seed=3), perm[45:])  # clipped
    assert len(seeded_split(50, (60, 10), 1, seed=3)) == 0
    assert not np.array_equal(parts[0], seeded_split(50, (40, 5, None), 0, seed=4))
    with pytest.raises(ValueError, match="part"):
        seeded_split(50, (40, 10), 2)
    assert fraction_sizes(50, (0.8, 0.1, 0.1)) == [40, 5, None]
    assert fraction_sizes(10, (1, 1, 2)) == [2, 2, None]  # normalised
    with pytest.raises(ValueError, match="fractions"):
        fraction_sizes(10, (0, 0, 0))


def test_image_folder_seeded_split_rules(tmp_path):
    root = make_folder(tmp_path / "imgs", 20)
    files = sorted(str(p) for p in root.glob("*.png"))
    perm = np.random.default_rng(0).permutation(20)

    def names(split, max_train, max_val, seed=0):
        return ImageFolderDataset(root, 8, split, max_train, max_val, seed).files

    train, val = names("train", 12, 5), names("val", 12, 5)
    assert train == [files[i] for i in perm[:12]]  # shuffled order, not sorted
    assert val == [files[i] for i in perm[12:17]] and names("test", 12, 5) == val
    assert train != names("train", 12, 5, seed=1)
    rest = names("train", None, 4)  # max_train=None leaves max_val files for val
    assert len(rest) == 16 and set(rest) == set(files) - set(names("val", None, 4))
    assert len(names("val", 12, None)) == 8  # max_val=None: val takes the remainder
    assert names("all", 3, 3) == files
    with pytest.raises(ValueError, match="split"):
        names("holdout", 1, 1)


def make_folder(root, n):
    for i in range(n):
        save_image(root / f"img{i:02d}.png", np.full((8, 8, 3), i * 10))
    return root


def test_image_folder_seeded_subsets(tmp_path):
    root = make_folder(tmp_path / "imgs", 10)
    train = ImageFolderDataset(root, 8, "train", max_train=6, max_val=3, split_seed=4)
    val = ImageFolderDataset(root, 8, "val", max_train=6, max_val=3, split_seed=4)
    assert len(train) == 6 and len(val) == 3 and not set(train.files) & set(val.files)
    assert train.identity["count"] == 6 and train.identity["split"] == "train"


def test_split_files_text_and_json(tmp_path):
    root = make_folder(tmp_path / "imgs", 4)
    (tmp_path / "train.txt").write_text("img00.png\nimg02.png\n\n")
    (tmp_path / "val.txt").write_text("# comment\nimg03.png\n")
    train = ImageFolderDataset(root, 8, "train", split_file=tmp_path / "{split}.txt")
    val = ImageFolderDataset(root, 8, "val", split_file=tmp_path / "{split}.txt")
    assert [Path(f).name for f in train.files] == ["img00.png", "img02.png"]
    assert [Path(f).name for f in val.files] == ["img03.png"]
    (tmp_path / "splits.json").write_text(
        json.dumps({"train": ["img01.png"], "validation": ["img00.png"]})
    )
    val_json = ImageFolderDataset(root, 8, "val", split_file=tmp_path / "splits.json")
    assert [Path(f).name for f in val_json.files] == ["img00.png"]
    torch.testing.assert_close(val_json[0], torch.full((3, 8, 8), -1.0))


def test_corrupt_images_skipped_and_reported(tmp_path):
    root = make_folder(tmp_path / "imgs", 3)
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    good = (root / "img01.png").read_bytes()
    (root / "truncated.png").write_bytes(good[: len(good) // 2])
    ds = ImageFolderDataset(root, 8, "all")
    items = [ds[i] for i in range(len(ds))]
    assert sum(item is None for item in items) == 2
    assert {Path(p).name for p in ds.bad_files} == {"broken.png", "truncated.png"}
    batch = collate_skip_none(items)
    assert batch.shape == (3, 3, 8, 8)
    assert collate_skip_none([None, None]) is None
    report = ds.pop_skipped_report()
    assert "2" in report and "broken.png" in report
    assert ds.pop_skipped_report() is None  # reported once per epoch


def test_empty_and_missing_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=str(tmp_path / "empty")):
        ImageFolderDataset(tmp_path / "empty", 8)
    with pytest.raises(FileNotFoundError) as err:
        build_image_dataset("celebahq", str(tmp_path / "nope"), 256, "train")
    msg = str(err.value)
    assert "celebahq" in msg and "data.path" in msg and DATASET_HELP["celebahq"] in msg
    with pytest.raises(FileNotFoundError, match="lsun"):
        build_image_dataset("lsun-bedrooms", None, 256, "train")


def test_build_image_dataset_variants(tmp_path):
    fm = build_image_dataset("fashion-mnist", str(fmnist_fixture(tmp_path / "fm")), 32, "test")
    assert isinstance(fm, FashionMNIST) and len(fm) == 3
    for split, n in (("train", 5), ("val", 2)):
        make_folder(tmp_path / "inette" / split / "n01440764", n)
    train = build_image_dataset("imagenette", str(tmp_path / "inette"), 8, "train", max_train=4)
    val = build_image_dataset("imagenette", str(tmp_path / "inette"), 8, "val")
    assert len(train) == 4 and len(val) == 2 and val.identity["split"] == "val"
    assert all("/val/" in f for f in val.files)
    folder = build_image_dataset("folder", str(tmp_path / "inette"), 8, "train", max_val=1)
    assert len(folder) == 6
    with pytest.raises(ValueError, match="unknown dataset"):
        build_image_dataset("cifar10", str(tmp_path), 32, "train")
