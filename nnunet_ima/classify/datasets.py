"""Datasets of the papers, each item ``(x, y, index)``: the index is IMA's sample id.

Loaders read the on-disk formats directly (no download at run time):

* ``moons``   - scikit-learn ``make_moons`` (noise 0.2, our choice: the papers do not say), split
  20000/2000/2000 (train/val/test) as in the earlier paper; values are unbounded (no [0, 1]).
* ``digits``  - scikit-learn 8x8 digits, scaled to [0, 1], split 70/10/20 with a fixed seed.
* ``fashion`` - Fashion-MNIST idx files (``train-images-idx3-ubyte[.gz]`` ...), default folder
  ``/usr/share/datasets/fashion-mnist`` (Debian package ``dataset-fashion-mnist``).
* ``svhn``    - ``train_32x32.mat`` / ``test_32x32.mat`` (torchvision's SVHN format, scipy.io).
* ``cifar10`` - ``cifar-10-batches-py`` pickled batches (torchvision's CIFAR10 format).
* ``covid``   - SARS-CoV-2 CT-scan dataset as class folders ``COVID/`` and ``non-COVID/``, resized
  to 224x224 grey; label 0 uninfected, 1 infected; per class 200 test / 30 val / rest train with a
  fixed seed (1022/1000 train on the full dataset, as in the papers).
* ``imagefolder`` - ``root/<class>/<image>`` split at random (``test_split``, ``val_split``) or
  ``root/train/<class>`` + ``root/test/<class>``; ``size`` resizes on load.

Images are stored as uint8 and scaled to [0, 1] per item. A missing dataset raises
:class:`DatasetMissingError` saying where the files go.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

FASHION_ROOT = "/usr/share/datasets/fashion-mnist"
IMAGE_EXT = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


class DatasetError(ValueError):
    """The dataset cannot be used as it is (one class, images of different sizes, ...); the message
    says what to change."""


class DatasetMissingError(DatasetError, FileNotFoundError):
    """The dataset files are not where the loader looks; the message says where to put them."""


class IndexedDataset(Dataset):
    """``(x, y, index)`` items from in-memory tensors. uint8 ``x`` is scaled to [0, 1] per item;
    ``transform`` (optional) maps one float sample to another (e.g. augmentation)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, transform=None):
        if len(x) != len(y):
            raise ValueError(f"x and y differ in length: {len(x)} vs {len(y)}")
        self.x, self.y, self.transform = x, y.long(), transform

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        x = self.x[i]
        x = x.float().div_(255) if x.dtype == torch.uint8 else x.float()
        if self.transform is not None:
            x = self.transform(x)
        return x, self.y[i], i

    def __getitems__(self, indices):
        """A whole batch at once (DataLoader calls this instead of one __getitem__ per sample)."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        x = self.x[idx]
        x = x.float().div_(255) if x.dtype == torch.uint8 else x.float()
        if self.transform is not None:
            x = torch.stack([self.transform(v) for v in x])
        return x, self.y[idx], idx

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All samples as float tensors (no augmentation)."""
        x = self.x.float() / 255 if self.x.dtype == torch.uint8 else self.x.float()
        return x, self.y


@dataclass
class Splits:
    """train / val (may be None) / test datasets plus what models and attacks need to know."""

    name: str
    train: IndexedDataset
    val: IndexedDataset | None
    test: IndexedDataset
    num_classes: int
    in_shape: tuple
    clip: tuple | None          # valid value range of inputs, e.g. (0.0, 1.0); None = unbounded
    split_digest: str | None = None  # fingerprint() of the whole train / test split (set by the experiment)

    def limit(self, train: int | None = None, test: int | None = None) -> "Splits":
        """The first ``train`` / ``test`` samples (for quick runs); indices are renumbered."""
        def cut(ds, n):
            if ds is None or not n or n >= len(ds):
                return ds
            return IndexedDataset(ds.x[:n], ds.y[:n], ds.transform)
        return Splits(self.name, cut(self.train, train), cut(self.val, test), cut(self.test, test),
                      self.num_classes, self.in_shape, self.clip, self.split_digest)


def fingerprint(*datasets) -> str:
    """SHA-256 (16 hex) of datasets' samples and labels, in order: two equal fingerprints of (train, test)
    mean the same split, so a model trained on one and evaluated on the other never saw its test images."""
    h = hashlib.sha256()
    for ds in datasets:
        for t in (ds.x, ds.y):
            t = t.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.flatten().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------- helpers
def collate(batch):
    """DataLoader collate: batches from ``__getitems__`` pass through, lists of items are stacked."""
    if isinstance(batch, tuple):
        return batch
    from torch.utils.data import default_collate

    return default_collate(batch)


def _missing(name: str, root, expected: str) -> DatasetMissingError:
    return DatasetMissingError(f"{name}: dataset files not found under {root!s}. Expected {expected}. "
                               f"Put the files there or pass --data-root DIR.")


def _find(root: Path, names) -> Path | None:
    for n in names:
        for p in (root / n, root / (n + ".gz")):
            if p.is_file():
                return p
    return None


def read_idx(path) -> np.ndarray:
    """Read an idx file (optionally gzipped): magic 0x00 0x00 dtype ndim, then big-endian dims."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if zero != 0 or dtype_code not in dtypes:
        raise DatasetError(f"{path}: not an idx file (magic {data[:4]!r})")
    dims = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=dtypes[dtype_code], offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise DatasetError(f"{path}: expected {int(np.prod(dims))} values, found {arr.size}")
    return arr.reshape(dims)


def _split_perm(n: int, sizes, seed: int):
    perm = np.random.default_rng(seed).permutation(n)
    out, start = [], 0
    for s in sizes:
        out.append(perm[start:start + s])
        start += s
    return out


def _ds(x, y, idx=None, transform=None):
    if idx is not None:
        idx = torch.as_tensor(idx, dtype=torch.long)
        x, y = x[idx], y[idx]
    return IndexedDataset(x, torch.as_tensor(y), transform)


# ---------------------------------------------------------------------------- loaders
def load_moons(root=None, seed: int = 0, noise: float = 0.2, sizes=(20000, 2000, 2000)) -> Splits:
    from sklearn.datasets import make_moons

    x, y = make_moons(n_samples=sum(sizes), noise=noise, random_state=seed)
    x, y = torch.tensor(x, dtype=torch.float32), torch.tensor(y)
    tr, va, te = _split_perm(len(y), sizes, seed)
    return Splits("moons", _ds(x, y, tr), _ds(x, y, va), _ds(x, y, te), 2, (2,), None)


def load_digits(root=None, seed: int = 0) -> Splits:
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    x = torch.tensor(d.images / 16.0, dtype=torch.float32).unsqueeze(1)  # (N, 1, 8, 8) in [0, 1]
    y = torch.tensor(d.target)
    n = len(y)
    n_tr, n_va = int(0.7 * n), int(0.1 * n)
    tr, va, te = _split_perm(n, (n_tr, n_va, n - n_tr - n_va), seed)
    return Splits("digits", _ds(x, y, tr), _ds(x, y, va), _ds(x, y, te), 10, (1, 8, 8), (0.0, 1.0))


def load_fashion(root=None, seed: int = 0) -> Splits:
    root = Path(root or FASHION_ROOT)
    files = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        for kind, suffix in (("x", "images-idx3-ubyte"), ("y", "labels-idx1-ubyte")):
            p = _find(root, [f"{prefix}-{suffix}", f"{prefix}-{suffix.replace('-idx', '.idx')}"])
            if p is None:
                raise _missing("fashion", root, "train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], "
                               "t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz] (on Debian/Ubuntu: "
                               f"apt-get install dataset-fashion-mnist puts them in {FASHION_ROOT})")
            files[split, kind] = p
    def load(split):
        x = torch.from_numpy(read_idx(files[split, "x"]).copy()).unsqueeze(1)
        y = torch.from_numpy(read_idx(files[split, "y"]).astype(np.int64))
        return IndexedDataset(x, y)
    return Splits("fashion", load("train"), None, load("test"), 10, (1, 28, 28), (0.0, 1.0))


def load_svhn(root=None, seed: int = 0) -> Splits:
    import scipy.io

    root = Path(root or "data/svhn")
    parts = {}
    for split in ("train", "test"):
        p = root / f"{split}_32x32.mat"
        if not p.is_file():
            raise _missing("svhn", root, "train_32x32.mat and test_32x32.mat (torchvision's SVHN format, from "
                           "http://ufldl.stanford.edu/housenumbers/)")
        m = scipy.io.loadmat(p)
        x = torch.from_numpy(np.ascontiguousarray(np.transpose(m["X"], (3, 2, 0, 1))))  # (N, 3, 32, 32)
        y = m["y"].astype(np.int64).reshape(-1)
        y[y == 10] = 0  # SVHN stores digit 0 as label 10 (as torchvision does)
        parts[split] = IndexedDataset(x, torch.from_numpy(y))
    return Splits("svhn", parts["train"], None, parts["test"], 10, (3, 32, 32), (0.0, 1.0))


def load_cifar10(root=None, seed: int = 0, augment: bool = True) -> Splits:
    root = Path(root or "data/cifar10")
    base = root / "cifar-10-batches-py" if (root / "cifar-10-batches-py").is_dir() else root
    names = [f"data_batch_{i}" for i in range(1, 6)]
    if not all((base / n).is_file() for n in names + ["test_batch"]):
        raise _missing("cifar10", root, "cifar-10-batches-py/data_batch_1..5 and test_batch (torchvision's CIFAR10 "
                       "python format)")
    def load(files):
        xs, ys = [], []
        for n in files:
            with open(base / n, "rb") as f:
                d = pickle.load(f, encoding="latin1")
            xs.append(np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.extend(d["labels"])
        return torch.from_numpy(np.concatenate(xs)), torch.tensor(ys)
    xtr, ytr = load(names)
    xte, yte = load(["test_batch"])
    tf = crop_flip if augment else None
    return Splits("cifar10", IndexedDataset(xtr, ytr, tf), None, IndexedDataset(xte, yte), 10, (3, 32, 32),
                  (0.0, 1.0))


def crop_flip(x: torch.Tensor, pad: int = 4) -> torch.Tensor:
    """CIFAR augmentation: random crop with zero padding 4 and a random horizontal flip (global RNG)."""
    h, w = x.shape[-2:]
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    i, j = (int(v) for v in torch.randint(0, 2 * pad + 1, (2,)))
    x = padded[..., i:i + h, j:j + w]
    return x.flip(-1) if bool(torch.rand(()) < 0.5) else x


def _read_images(files, size, grey: bool) -> torch.Tensor:
    """uint8 (N, C, H, W) from image files; ``size`` resizes each to size x size (bilinear).

    Without ``size`` all images must have one size: otherwise a :class:`DatasetError` names two files
    that differ and ``--image-size``. A file PIL cannot read whole (damaged, truncated, not an image) is
    a :class:`DatasetError` naming it.
    """
    out, first = [], None
    for f in files:
        a = _read_image(f, size, grey)
        if first is None:
            first = (f, a.shape[:2])
        elif a.shape[:2] != first[1]:
            raise DatasetError(f"images differ in size: {first[0]} is {first[1][0]}x{first[1][1]}, {f} is "
                               f"{a.shape[0]}x{a.shape[1]}; pass --image-size N to resize all to NxN")
        out.append(a[None] if grey else a.transpose(2, 0, 1))
    return torch.from_numpy(np.stack(out)) if out else torch.empty(0, dtype=torch.uint8)


def _read_image(path, size, grey: bool) -> np.ndarray:
    """One image file as uint8 (H, W) or (H, W, 3); the one reader of image files (every failure a DatasetError)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("L" if grey else "RGB")  # decodes the whole file: a truncated one fails here
            if size:
                im = im.resize((size, size), Image.BILINEAR)
            return np.asarray(im, dtype=np.uint8)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        why = " ".join(str(err).split()) or type(err).__name__
        raise DatasetError(f"{path}: cannot be read as an image ({why[:160]})") from None


def _class_files(root: Path) -> dict[str, list[Path]]:
    classes = sorted(d for d in root.iterdir() if d.is_dir()) if root.is_dir() else []
    return {c.name: sorted(p for p in c.rglob("*") if p.suffix.lower() in IMAGE_EXT) for c in classes}


def load_covid(root=None, seed: int = 0, size: int = 224, n_test: int = 200, n_val: int = 30) -> Splits:
    root = Path(root or "data/covid-ct")
    files = _class_files(root)
    wanted = {"non-COVID": 0, "COVID": 1}
    if not all(files.get(c) for c in wanted):
        raise _missing("covid", root, "class folders COVID/ and non-COVID/ with the CT images (the SARS-CoV-2 "
                       "CT-scan dataset of Soares et al. 2020)")
    parts = {"train": ([], []), "val": ([], []), "test": ([], [])}
    for c, label in wanted.items():
        fs = files[c]
        if len(fs) < n_test + n_val + 1:
            raise DatasetError(f"covid: class {c} has {len(fs)} images, need more than {n_test + n_val}")
        perm = np.random.default_rng(seed + label).permutation(len(fs))
        cuts = {"test": perm[:n_test], "val": perm[n_test:n_test + n_val], "train": perm[n_test + n_val:]}
        for split, idx in cuts.items():
            parts[split][0].extend(fs[i] for i in idx)
            parts[split][1].extend([label] * len(idx))
    ds = {s: IndexedDataset(_read_images(f, size, True), torch.tensor(y)) for s, (f, y) in parts.items()}
    return Splits("covid", ds["train"], ds["val"], ds["test"], 2, (1, size, size), (0.0, 1.0))


IMAGEFOLDER_LAYOUT = "DIR/<class>/<image files> (split here) or DIR/train/<class>/... and DIR/test/<class>/..."


def has_train_test(root) -> bool:
    """True when ``root`` uses the train/ + test/ layout (its own split)."""
    return root is not None and (Path(root) / "train").is_dir() and (Path(root) / "test").is_dir()


def load_imagefolder(root=None, seed: int = 0, size: int | None = None, grey: bool = True,
                     test_split: float = 0.2, val_split: float = 0.1) -> Splits:
    """Images in class folders, labels by sorted folder name; uint8 (N, 1 or 3, H, W).

    ``DIR/train/<class>`` + ``DIR/test/<class>``: that split (no val). ``DIR/<class>``: a fixed-seed
    random split, ``test_split`` and ``val_split`` of the images (at least one test image) and the
    rest for training. ``size``: resize every image to size x size on load.
    """
    if root is None:
        raise DatasetMissingError(f"imagefolder: pass --data-root DIR with {IMAGEFOLDER_LAYOUT}")
    root = Path(root)
    if has_train_test(root):
        tr, te = _class_files(root / "train"), _class_files(root / "test")
        classes = sorted(c for c in set(tr) | set(te) if tr.get(c) or te.get(c))
        def make(files):
            fl = [(f, classes.index(c)) for c in sorted(files) for f in files[c]]
            return IndexedDataset(_read_images([f for f, _ in fl], size, grey), torch.tensor([y for _, y in fl]))
        _check_classes(root, classes)
        train, val, test = make(tr), None, make(te)
    else:
        files = _class_files(root)
        classes = sorted(c for c in files if files[c])
        fl = [(f, i) for i, c in enumerate(classes) for f in files[c]]
        if not fl:
            raise _missing("imagefolder", root, IMAGEFOLDER_LAYOUT)
        _check_classes(root, classes)
        x = _read_images([f for f, _ in fl], size, grey)
        y = torch.tensor([c for _, c in fl])
        n = len(fl)
        n_te, n_va = max(1, int(round(test_split * n))), int(round(val_split * n))
        if n - n_te - n_va < 1:
            raise DatasetError(f"imagefolder: {n} images leave none for training with test split {test_split:g} "
                               f"and val split {val_split:g}")
        te, va, tr = _split_perm(n, (n_te, n_va, n - n_te - n_va), seed)
        train, val, test = _ds(x, y, tr), (_ds(x, y, va) if n_va else None), _ds(x, y, te)
    shape = tuple(train.x.shape[1:])
    return Splits("imagefolder", train, val, test, len(classes), shape, (0.0, 1.0))


def _check_classes(root, classes) -> None:
    if len(classes) < 2:
        raise DatasetError(f"imagefolder: need at least 2 class folders with images under {root}, found "
                           f"{classes}; layout: {IMAGEFOLDER_LAYOUT}")


LOADERS = {"moons": load_moons, "digits": load_digits, "fashion": load_fashion, "svhn": load_svhn,
           "cifar10": load_cifar10, "covid": load_covid, "imagefolder": load_imagefolder}


def load_dataset(name: str, root=None, seed: int = 0, **kwargs) -> Splits:
    """Load a dataset by name (see :data:`LOADERS`). ``root`` defaults per loader.

    >>> splits = load_dataset("moons")
    >>> x, y, idx = splits.train[0]
    """
    if name not in LOADERS:
        raise ValueError(f"dataset: unknown dataset {name!r}; known: {sorted(LOADERS)}")
    if root is not None and not os.path.exists(root):
        raise _missing(name, root, "an existing folder")
    return LOADERS[name](root, seed=seed, **kwargs)
