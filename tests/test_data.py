"""Datasets, IDX parsing, on-device loader and batched augmentation."""
from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lpqld_fast.data import (
    DATASET_NAMES,
    IDXFormatError,
    ImageFolderDataset,
    InMemoryDataset,
    InMemoryLoader,
    SyntheticDataset,
    dataset_info,
    get_dataset,
    load_fashion_mnist,
    read_idx,
)
from lpqld_fast.data import transforms as T

FMNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
needs_fmnist = pytest.mark.skipif(
    not (FMNIST_ROOT / "train-images-idx3-ubyte.gz").is_file(),
    reason="Fashion-MNIST not installed (apt-get install -y dataset-fashion-mnist)",
)


def write_idx(path: Path, arr: np.ndarray, compress: bool = True) -> Path:
    """Write an IDX file (big-endian), gzip-compressed by default."""
    codes = {np.dtype("uint8"): 0x08, np.dtype("int8"): 0x09, np.dtype("int16"): 0x0B,
             np.dtype("int32"): 0x0C, np.dtype("float32"): 0x0D, np.dtype("float64"): 0x0E}
    code = codes[arr.dtype]
    raw = struct.pack(">HBB", 0, code, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    raw += arr.astype(arr.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)
    return path


def write_fmnist_like(root: Path, n: int = 12, labels: np.ndarray | None = None, split: str = "train") -> None:
    root.mkdir(parents=True, exist_ok=True)
    prefix = "train" if split == "train" else "t10k"
    rng = np.random.default_rng(0)
    write_idx(root / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
    if labels is None:
        labels = (np.arange(n) % 10).astype(np.uint8)
    write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)


@pytest.fixture(scope="module")
def fmnist_train() -> InMemoryDataset:
    return load_fashion_mnist("train")


@pytest.fixture(scope="module")
def fmnist_test() -> InMemoryDataset:
    return load_fashion_mnist("test")


# --------------------------------------------------------------------------- IDX parsing


@needs_fmnist
def test_read_idx_real_labels():
    labels = read_idx(FMNIST_ROOT / "t10k-labels-idx1-ubyte.gz")
    assert labels.shape == (10000,) and labels.dtype == torch.uint8
    assert int(labels.max()) == 9 and int(labels.min()) == 0


@pytest.mark.parametrize("dtype", ["uint8", "int8", "int16", "int32", "float32", "float64"])
@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_roundtrip(tmp_path, dtype, compress):
    arr = (np.arange(2 * 3 * 5).reshape(2, 3, 5) - 7).astype(dtype) if dtype != "uint8" else \
        np.arange(30, dtype=np.uint8).reshape(2, 3, 5)
    t = read_idx(write_idx(tmp_path / "a.idx", arr, compress))
    assert t.shape == (2, 3, 5)
    np.testing.assert_array_equal(t.numpy(), arr)


def test_read_idx_truncated_gzip_names_file(tmp_path):
    good = write_idx(tmp_path / "good.gz", np.zeros((50, 28, 28), np.uint8))
    bad = tmp_path / "train-images-idx3-ubyte.gz"
    bad.write_bytes(good.read_bytes()[:-30])
    with pytest.raises(IDXFormatError, match="train-images-idx3-ubyte.gz") as e:
        read_idx(bad)
    assert "gzip" in str(e.value)


def test_read_idx_corrupt_gzip_names_file(tmp_path):
    bad = tmp_path / "corrupt.gz"
    bad.write_bytes(b"\x1f\x8b\x08\x00" + b"\xff" * 64)
    with pytest.raises(IDXFormatError, match="corrupt.gz"):
        read_idx(bad)


def test_read_idx_bad_magic_and_sizes(tmp_path):
    p = tmp_path / "magic.gz"
    p.write_bytes(gzip.compress(b"\x12\x34\x08\x01" + struct.pack(">I", 3) + b"abc"))
    with pytest.raises(IDXFormatError, match="magic.gz.*magic"):
        read_idx(p)
    p = tmp_path / "short.gz"  # header claims 10 items, payload has 4
    p.write_bytes(gzip.compress(struct.pack(">HBBI", 0, 8, 1, 10) + b"abcd"))
    with pytest.raises(IDXFormatError, match="short.gz.*truncated"):
        read_idx(p)
    p = tmp_path / "long.gz"
    p.write_bytes(gzip.compress(struct.pack(">HBBI", 0, 8, 1, 2) + b"abcd"))
    with pytest.raises(IDXFormatError, match="long.gz.*trailing"):
        read_idx(p)
    p = tmp_path / "tiny.gz"
    p.write_bytes(gzip.compress(b"\x00"))
    with pytest.raises(IDXFormatError, match="tiny.gz"):
        read_idx(p)


def test_fashion_mnist_missing_dir(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist") as e:
        load_fashion_mnist("train", root=missing)
    assert str(missing) in str(e.value)
    tmp_path.joinpath("empty").mkdir()
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte.gz.*apt-get install -y"):
        load_fashion_mnist("train", root=tmp_path / "empty")


def test_fashion_mnist_root_override_env(tmp_path, monkeypatch):
    write_fmnist_like(tmp_path, n=20)
    monkeypatch.setenv("LPQLD_FASHION_MNIST", str(tmp_path))
    ds = load_fashion_mnist("train")
    assert len(ds) == 20 and ds.images.shape == (20, 1, 28, 28)
    ds2 = get_dataset("fashion-mnist", "train", root=tmp_path)  # argument wins over env too
    assert torch.equal(ds.images, ds2.images)


def test_fashion_mnist_validation(tmp_path):
    write_fmnist_like(tmp_path / "range", labels=np.array([0, 1, 12], np.uint8), n=3)
    with pytest.raises(IDXFormatError, match="labels-idx1.*label 12"):
        load_fashion_mnist("train", root=tmp_path / "range")
    write_fmnist_like(tmp_path / "count", labels=np.zeros(5, np.uint8), n=6)
    with pytest.raises(IDXFormatError, match="6 images.*5 labels"):
        load_fashion_mnist("train", root=tmp_path / "count")
    with pytest.raises(ValueError, match="split"):
        load_fashion_mnist("val", root=tmp_path / "count")


@needs_fmnist
def test_fashion_mnist_splits(fmnist_train, fmnist_test):
    for ds, n in ((fmnist_train, 60000), (fmnist_test, 10000)):
        assert ds.images.shape == (n, 1, 28, 28) and ds.images.dtype == torch.uint8
        assert ds.labels.shape == (n,) and ds.labels.dtype == torch.int64
        assert ds.num_classes == 10 and len(ds.class_names) == 10
        assert int(ds.labels.min()) == 0 and int(ds.labels.max()) == 9
        assert ds.info.in_chans == 1 and ds.info.image_size == 28
    assert fmnist_train.class_counts().tolist() == [6000] * 10
    assert fmnist_test.class_counts().tolist() == [1000] * 10
    # The stored standard statistics match the train set.
    mean, std = T.compute_mean_std(fmnist_train.images[::4])
    assert abs(mean[0] - fmnist_train.mean[0]) < 2e-3 and abs(std[0] - fmnist_train.std[0]) < 2e-3
    assert dataset_info("fashion-mnist").mean == fmnist_train.mean


# --------------------------------------------------------------------------- InMemoryDataset / loader


def test_in_memory_dataset_validation():
    imgs = torch.zeros(4, 1, 8, 8, dtype=torch.uint8)
    with pytest.raises(ValueError, match="uint8"):
        InMemoryDataset(imgs.float(), torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="4 samples.*3"):
        InMemoryDataset(imgs, torch.zeros(3, dtype=torch.int64))
    with pytest.raises(IndexError, match="class id 5"):
        InMemoryDataset(imgs, torch.tensor([0, 1, 2, 5]), num_classes=3, mean=(0.5,), std=(0.5,))
    with pytest.raises(ValueError, match="one per channel"):
        InMemoryDataset(imgs, torch.zeros(4, dtype=torch.int64), mean=(0.1, 0.2), std=(0.1, 0.2))
    ds = InMemoryDataset(imgs, torch.tensor([0, 1, 1, 2], dtype=torch.int32), num_classes=4, mean=(0.5,), std=(0.5,))
    assert ds.labels.dtype == torch.int64 and ds.class_counts().tolist() == [1, 2, 1, 0]
    x, y = ds[1]
    assert x.shape == (1, 8, 8) and int(y) == 1
    assert len(ds.subset([0, 3])) == 2 and ds.indices_of_class(1).tolist() == [1, 2]


def _small_ds(n: int = 37) -> SyntheticDataset:
    return SyntheticDataset(num_classes=5, samples_per_class=n // 5 + 1, in_chans=3, image_size=12, seed=3)


def test_loader_covers_dataset_and_is_deterministic():
    ds = _small_ds()
    n = len(ds)
    a = InMemoryLoader(ds, 8, shuffle=True, augment=True, pad=2, seed=1)
    b = InMemoryLoader(ds, 8, shuffle=True, augment=True, pad=2, seed=1)
    ea, eb = list(a), list(b)
    assert len(ea) == len(a) == -(-n // 8)
    for (xa, ya), (xb, yb) in zip(ea, eb):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert xa.dtype == torch.float32 and xa.shape[1:] == (3, 12, 12)
    assert sorted(torch.cat([y for _, y in ea]).tolist()) == sorted(ds.labels.tolist())
    # The next epoch reshuffles; set_epoch replays an epoch.
    second = list(a)
    assert not torch.equal(ea[0][1], second[0][1]) or not torch.equal(ea[0][0], second[0][0])
    a.set_epoch(0)
    assert torch.equal(next(iter(a))[0], ea[0][0])
    # drop_last and no normalisation
    c = InMemoryLoader(ds, 8, drop_last=True, normalize=False)
    batches = list(c)
    assert len(batches) == n // 8 and batches[0][0].dtype == torch.uint8
    assert torch.equal(batches[0][0], ds.images[:8])


def test_loader_shards_match_single_process():
    ds = _small_ds(40)
    full = list(InMemoryLoader(ds, 10, shuffle=True, augment=True, pad=2, seed=7))
    shards = [list(InMemoryLoader(ds, 10, shuffle=True, augment=True, pad=2, seed=7, rank=r, world_size=3))
              for r in range(3)]
    for b, (x, y) in enumerate(full):
        xs = torch.cat([shards[r][b][0] for r in range(3)])
        ys = torch.cat([shards[r][b][1] for r in range(3)])
        assert torch.equal(x, xs) and torch.equal(y, ys)
    with pytest.raises(ValueError, match="rank"):
        InMemoryLoader(ds, 10, rank=2, world_size=2)


# --------------------------------------------------------------------------- augmentation


@pytest.mark.parametrize("pad_mode,fmode", [("reflect", "reflect"), ("zeros", "constant")])
def test_crop_equals_shifted_slice(pad_mode, fmode):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (6, 2, 10, 9), dtype=torch.uint8, generator=g)
    pad = 3
    dy = torch.tensor([0, 6, 3, 1, 5, 2])
    dx = torch.tensor([6, 0, 3, 4, 2, 5])
    out = T.apply_crop_flip(x, pad, dy, dx, None, pad_mode=pad_mode)
    padded = F.pad(x.float(), (pad,) * 4, mode=fmode)
    for i in range(6):
        assert torch.equal(out[i].float(), padded[i, :, dy[i] : dy[i] + 10, dx[i] : dx[i] + 9])
    assert out.dtype == torch.uint8
    # Offset (pad, pad) is the identity; flips equal torch.flip of the crop.
    centre = torch.full((6,), pad)
    assert torch.equal(T.apply_crop_flip(x, pad, centre, centre, None, pad_mode), x)
    flips = torch.tensor([True, False, True, True, False, True])
    fl = T.apply_crop_flip(x, pad, dy, dx, flips, pad_mode)
    assert torch.equal(fl[flips], torch.flip(out[flips], dims=[-1]))
    assert torch.equal(fl[~flips], out[~flips])


def test_random_crop_flip_seeded_and_float():
    x = torch.randint(0, 256, (32, 1, 28, 28), dtype=torch.uint8)
    a = T.random_crop_flip(x, 2, torch.Generator().manual_seed(5))
    b = T.random_crop_flip(x, 2, torch.Generator().manual_seed(5))
    c = T.random_crop_flip(x, 2, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    xf = x.float() / 255
    af = T.random_crop_flip(xf, 2, torch.Generator().manual_seed(5))
    assert af.dtype == torch.float32 and torch.allclose(af, a.float() / 255)
    assert torch.equal(T.random_crop_flip(x, 0, None, flip=False), x)
    with pytest.raises(ValueError, match="pad"):
        T.random_crop_flip(x, 28, None)
    with pytest.raises(ValueError, match="dy/dx"):
        T.apply_crop_flip(x[:2], 2, torch.tensor([0, 5]), torch.tensor([0, 0]))


def test_normalize_and_denormalize():
    x = torch.tensor([[[[0, 255]], [[51, 102]]]], dtype=torch.uint8)  # [1, 2, 1, 2]
    out = T.normalize(x, (0.5, 0.2), (0.5, 0.1))
    expected = torch.tensor([[[[-1.0, 1.0]], [[0.0, 2.0]]]])
    assert torch.allclose(out, expected, atol=1e-6)
    assert torch.allclose(T.normalize(x.float() / 255, (0.5, 0.2), (0.5, 0.1)), expected, atol=1e-6)
    assert torch.allclose(T.denormalize(out, (0.5, 0.2), (0.5, 0.1)), x.float() / 255, atol=1e-6)
    with pytest.raises(ValueError, match="3 values"):
        T.normalize(x, (0.1, 0.2, 0.3), (1, 1, 1))
    assert T.default_crop_padding(28) == 2 and T.default_crop_padding(32) == 4


# --------------------------------------------------------------------------- ImageFolder


def _make_tree(root: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for wnid, n in (("n02", 2), ("n01", 3), ("n03", 1)):
        d = root / wnid
        d.mkdir(parents=True)
        for i in range(n):
            arr = rng.integers(0, 256, (20 + i, 24, 3), dtype=np.uint8)
            Image.fromarray(arr).save(d / f"{wnid}_{i}.PNG" if i == 0 else d / f"{wnid}_{i}.png")
        (d / "notes.txt").write_text("not an image")


def test_image_folder(tmp_path):
    _make_tree(tmp_path / "train")
    ds = ImageFolderDataset(tmp_path / "train")
    assert ds.classes == ("n01", "n02", "n03") and len(ds) == 6
    assert ds.targets.tolist() == [0, 0, 0, 1, 1, 2] and ds.class_counts().tolist() == [3, 2, 1]
    x, y = ds[3]
    assert x.dtype == torch.uint8 and x.shape == (3, 20, 24) and y == 1
    assert ds.path(-1).endswith(os.path.join("n03", "n03_0.PNG"))
    # With the ImageNet eval transform and a DataLoader.
    ds = get_dataset("imagefolder", "train", root=tmp_path, transform=T.imagenet_eval_transform(16))
    xb, yb = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert xb.shape == (4, 3, 16, 16) and xb.dtype == torch.float32 and yb.tolist() == [0, 0, 0, 1]
    tr = get_dataset("imagefolder", "train", root=tmp_path, image_size=16)  # default train transform
    assert tr[0][0].shape == (3, 16, 16) and tr.info.num_classes == 3
    # A class subset keeps the given order.
    sub = ImageFolderDataset(tmp_path / "train", classes=["n03", "n01"], mode="L")
    assert sub.targets.tolist() == [0, 1, 1, 1] and sub[0][0].shape == (1, 20, 24)


def test_named_folder_datasets(tmp_path):
    """The presets' ImageNet-style datasets: an ImageFolder tree with the named dataset's size, normalisation
    and class count; a tree with another class count or no root is refused with the reason."""
    from lpqld_fast.data import DATASET_INFO, FOLDER_DATASETS, dataset_info

    assert set(FOLDER_DATASETS) <= set(DATASET_INFO)
    assert dataset_info("tiny-imagenet").num_classes == 200 and dataset_info("tiny-imagenet").image_size == 64
    _make_tree(tmp_path / "train")  # 3 classes
    with pytest.raises(ValueError, match=r"holds 3 class folders; tiny-imagenet has 200"):
        get_dataset("tiny-imagenet", "train", root=tmp_path)
    with pytest.raises(ValueError, match=r"tiny-imagenet.*--data-root"):
        get_dataset("tiny-imagenet", "train")
    ds = get_dataset("tiny-imagenet", "train", root=tmp_path, classes=["n01", "n02", "n03"])  # an explicit subset
    x, _ = ds[0]
    assert x.shape == (3, 64, 64) and ds.name == "tiny-imagenet" and ds.image_size == 64
    ev = get_dataset("imagenet-1k", "train", root=tmp_path, classes=["n01", "n02", "n03"], transform=None)
    assert ev.mean == tuple(DATASET_INFO["imagenet-1k"].mean)
    from lpqld_fast.presets import get_preset

    for preset, name in (("tiny-imagenet", "tiny-imagenet"), ("imagenet1k", "imagenet-1k"),
                         ("imagenet21k", "imagenet-21k-p")):
        assert get_preset(preset)["dataset"] == name and dataset_info(name).num_classes > 0


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        ImageFolderDataset(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match=r"train' does not exist"):  # measured from the train split first
        get_dataset("imagefolder", "val", root=tmp_path)
    (tmp_path / "root" / "n01").mkdir(parents=True)
    (tmp_path / "root" / "n01" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match=r"n01.*no images"):
        ImageFolderDataset(tmp_path / "root")
    (tmp_path / "flat").mkdir()
    with pytest.raises(ValueError, match="no class sub-directories"):
        ImageFolderDataset(tmp_path / "flat")
    (tmp_path / "bad" / "n01").mkdir(parents=True)
    (tmp_path / "bad" / "n01" / "broken.jpeg").write_bytes(b"not a jpeg")
    ds = ImageFolderDataset(tmp_path / "bad")
    with pytest.raises(OSError, match="broken.jpeg"):
        ds[0]
    with pytest.raises(IndexError):
        ds[1]


# --------------------------------------------------------------------------- synthetic + registry


def test_synthetic_dataset():
    a = SyntheticDataset(num_classes=7, samples_per_class=6, in_chans=3, image_size=16, seed=1)
    b = SyntheticDataset(num_classes=7, samples_per_class=6, in_chans=3, image_size=16, seed=1)
    t = SyntheticDataset(num_classes=7, samples_per_class=6, in_chans=3, image_size=16, seed=1, split="test")
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, t.images)
    assert a.images.shape == (42, 3, 16, 16) and a.class_counts().tolist() == [6] * 7
    assert a.mean == t.mean == SyntheticDataset.describe(7, in_chans=3, image_size=16, seed=1).mean
    # Learnable: nearest class mean from train classifies the test split.
    x = a.normalized().flatten(1)
    centres = torch.stack([x[a.labels == c].mean(0) for c in range(7)])
    pred = torch.cdist(t.normalized().flatten(1), centres).argmin(1)
    assert (pred == t.labels).float().mean() > 0.95
    big = SyntheticDataset(num_classes=10450, samples_per_class=1, in_chans=1, image_size=8)
    assert big.num_classes == 10450 and int(big.labels.max()) == 10449


def test_get_dataset_registry():
    with pytest.raises(ValueError, match="fashion-mnist.*imagefolder.*synthetic"):
        get_dataset("cifar10", "train")
    assert DATASET_NAMES == ("fashion-mnist", "imagefolder", "synthetic", "imagenet-1k", "imagenet-21k-p",
                             "tiny-imagenet")
    ds = get_dataset("synthetic", "test", num_classes=3, samples_per_class=2)
    assert isinstance(ds, InMemoryDataset) and len(ds) == 6
    assert dataset_info("imagenet-21k-p").num_classes == 10450
    assert dataset_info("synthetic", num_classes=3).num_classes == 3
    with pytest.raises(ValueError, match="root is required"):
        get_dataset("imagefolder", "train")


def test_stratified_subset_is_balanced_fixed_and_refuses_bad_sizes() -> None:
    from lpqld_fast.data import InMemoryDataset, stratified_subset

    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (203,), generator=g)
    labels[:4] = torch.arange(4)  # every class present
    images = torch.randint(0, 256, (203, 1, 5, 5), generator=g, dtype=torch.uint8)
    ds = InMemoryDataset(images, labels, num_classes=5)  # class 4 has no images: it contributes none
    sub = stratified_subset(ds, 40, seed=0)
    assert sub.labels.bincount(minlength=5).tolist() == [8, 8, 8, 8, 0]  # n // C per class
    # rows are real (image, label) pairs of ds, in dataset order
    pos = [int(torch.nonzero((images == im).flatten(1).all(1)).flatten()[0]) for im in sub.images]
    assert pos == sorted(pos) and torch.equal(labels[pos], sub.labels)
    assert torch.equal(stratified_subset(ds, 40, seed=0).images, sub.images)
    assert not torch.equal(stratified_subset(ds, 40, seed=1).images, sub.images)
    assert stratified_subset(ds, 203) is ds and stratified_subset(ds, 1000) is ds
    assert stratified_subset(ds, 2).labels.bincount(minlength=5).tolist() == [1, 1, 1, 1, 0]  # at least one
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="subset size must be a positive int"):
            stratified_subset(ds, bad)
