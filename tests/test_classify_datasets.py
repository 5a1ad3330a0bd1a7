"""Dataset loaders of nnunet_ima.classify on small generated files in the real on-disk formats."""
from __future__ import annotations

import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

from nnunet_ima.classify.datasets import DatasetMissingError, load_dataset, read_idx


def write_idx(path, arr: np.ndarray, gz: bool = True):
    codes = {np.dtype(np.uint8): 0x08}
    head = struct.pack(">HBB", 0, codes[arr.dtype], arr.ndim) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
    data = head + arr.tobytes()
    (gzip.open if gz else open)(path, "wb").write(data)


def write_png(path, value: int, size=(20, 12), mode="L"):
    from PIL import Image

    shape = size[::-1] if mode == "L" else (*size[::-1], 3)
    Image.fromarray(np.full(shape, value, dtype=np.uint8), mode=mode).save(path)


def test_moons_paper_split_and_indices():
    s = load_dataset("moons", seed=1)
    assert (len(s.train), len(s.val), len(s.test)) == (20000, 2000, 2000)
    x, y, i = s.train[5]
    assert x.shape == (2,) and i == 5 and s.clip is None and s.num_classes == 2


def test_digits_in_unit_range():
    s = load_dataset("digits")
    x, _ = s.train.tensors()
    assert x.shape[1:] == (1, 8, 8) and float(x.min()) >= 0 and float(x.max()) <= 1 and s.clip == (0.0, 1.0)


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_idx_files(tmp_path, gz):
    rng = np.random.default_rng(0)
    sfx = ".gz" if gz else ""
    imgs = rng.integers(0, 256, (7, 28, 28), dtype=np.uint8)
    write_idx(tmp_path / f"train-images-idx3-ubyte{sfx}", imgs, gz)
    write_idx(tmp_path / f"train-labels-idx1-ubyte{sfx}", np.arange(7, dtype=np.uint8), gz)
    write_idx(tmp_path / f"t10k-images-idx3-ubyte{sfx}", imgs[:3], gz)
    write_idx(tmp_path / f"t10k-labels-idx1-ubyte{sfx}", np.arange(3, dtype=np.uint8), gz)
    s = load_dataset("fashion", tmp_path)
    x, y, i = s.train[2]
    assert x.shape == (1, 28, 28) and int(y) == 2 and i == 2
    assert torch.allclose(x[0], torch.from_numpy(imgs[2]).float() / 255)
    assert len(s.test) == 3 and s.clip == (0.0, 1.0)


def test_read_idx_rejects_garbage(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04\x00\x00\x00\x01")
    with pytest.raises(ValueError, match="not an idx file"):
        read_idx(tmp_path / "bad")


def test_svhn_mat(tmp_path):
    import scipy.io

    rng = np.random.default_rng(0)
    for split, n in (("train", 5), ("test", 4)):
        X = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        y = np.array([[10], [1], [2], [3], [4]][:n], dtype=np.uint8)
        scipy.io.savemat(tmp_path / f"{split}_32x32.mat", {"X": X, "y": y})
        if split == "train":
            X0 = X
    s = load_dataset("svhn", tmp_path)
    x, y, _ = s.train[0]
    assert x.shape == (3, 32, 32) and int(y) == 0  # label 10 means digit 0
    assert torch.allclose(x, torch.from_numpy(X0[..., 0]).permute(2, 0, 1).float() / 255)


def test_cifar10_pickles(tmp_path):
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        d = {"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), "labels": [0, 1, 2, 3]}
        with open(base / name, "wb") as f:
            pickle.dump(d, f)
        if name == "data_batch_1":
            first = d["data"][1]
    s = load_dataset("cifar10", tmp_path, augment=False)
    assert len(s.train) == 20 and len(s.test) == 4
    x, y, _ = s.train[1]
    assert int(y) == 1 and torch.allclose(x, torch.from_numpy(first.reshape(3, 32, 32)).float() / 255)
    aug = load_dataset("cifar10", tmp_path, augment=True)
    assert aug.train[0][0].shape == (3, 32, 32)


def test_covid_class_folders_split_and_resize(tmp_path):
    for cls, value, n in (("COVID", 200, 9), ("non-COVID", 50, 8)):
        (tmp_path / cls).mkdir()
        for k in range(n):
            write_png(tmp_path / cls / f"{k}.png", value, mode="RGB")
    s = load_dataset("covid", tmp_path, n_test=2, n_val=1, size=16)
    assert (len(s.train), len(s.val), len(s.test)) == (9 - 3 + 8 - 3, 2, 4)
    x, y, _ = s.test[0]
    assert x.shape == (1, 16, 16) and s.num_classes == 2
    xs, ys = s.train.tensors()
    assert torch.all((ys == 1) == (xs.flatten(1).mean(1) > 0.5))  # COVID (bright here) is label 1
    again = load_dataset("covid", tmp_path, n_test=2, n_val=1, size=16)
    assert torch.equal(again.test.tensors()[0], s.test.tensors()[0])  # fixed-seed split


def test_imagefolder_flat_and_train_test(tmp_path):
    for c, v in (("cats", 10), ("dogs", 240)):
        (tmp_path / "flat" / c).mkdir(parents=True)
        for k in range(10):
            write_png(tmp_path / "flat" / c / f"{k}.png", v)
        for split in ("train", "test"):
            (tmp_path / "tt" / split / c).mkdir(parents=True)
            write_png(tmp_path / "tt" / split / c / "a.png", v)
    s = load_dataset("imagefolder", tmp_path / "flat")
    assert len(s.train) + len(s.val) + len(s.test) == 20 and s.in_shape == (1, 12, 20)
    t = load_dataset("imagefolder", tmp_path / "tt")
    assert len(t.train) == 2 and len(t.test) == 2 and t.num_classes == 2


@pytest.mark.parametrize("name, hint", [("fashion", "dataset-fashion-mnist"), ("svhn", "train_32x32.mat"),
                                        ("cifar10", "cifar-10-batches-py"), ("covid", "non-COVID"),
                                        ("imagefolder", "<class>")])
def test_missing_files_say_where_to_put_them(tmp_path, name, hint):
    with pytest.raises(DatasetMissingError, match="--data-root") as err:
        load_dataset(name, tmp_path)
    assert hint in str(err.value) and str(tmp_path) in str(err.value)
