"""Test cases in the network's input space, cut into attack samples and batched.

Two sources, both ending in nnU-Net's preprocessed space (the space the network and the attack
budget eps live in: resampled to the plans' spacing, normalised, cropped to the nonzero region):

* the fold's validation cases from ``$nnUNet_preprocessed`` (``splits_final.json``, read with
  nnU-Net's own dataset class), the default;
* raw images + labels (``-i`` / ``-l``, nnU-Net's raw layout ``CASE_0000.nii.gz`` / ``CASE.nii.gz``),
  preprocessed with the model's own preprocessor (``configuration_manager.preprocessor_class``).

Samples (what ADI averages over):

* 2d: every slice of every case, whole. H and W are padded at the end (bottom, right) with zeros,
  the value nnU-Net's predictor pads with, up to a multiple of the network's pooling factor (the
  product of its pooling strides), since the fully convolutional network needs that. Slices of
  the same padded shape are batched together.
* 3d: non-overlapping tiles of the plans' patch size on a regular grid from the volume's origin;
  tiles at the far border are padded at the end up to the patch size (as nnU-Net pads volumes
  smaller than a patch). Every voxel belongs to exactly one tile.

Padding is never part of a figure: each sample carries the size of its real region (``valid``), the
attack loss is computed on that region only, the network input is multiplied by the region's mask
inside the attacked function (so padding pixels get no gradient and cannot carry adversarial signal),
and padding (plus nnU-Net's ignore label) is masked out of every TP/FP/FN count.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from itertools import product
from pathlib import Path

import numpy as np
import torch

from .errors import EvalError
from .images import read_case


@dataclass
class Case:
    """One preprocessed case: ``image`` (C, *spatial) float32, ``label`` (*spatial) int16; for the case
    scope also nnU-Net's ``properties`` of the case (what its export needs to restore the original
    geometry) and the raw ``label_file`` it is scored against."""

    name: str
    image: np.ndarray
    label: np.ndarray
    properties: dict | None = None
    label_file: str | None = None


@dataclass(frozen=True)
class SampleRef:
    """Where a sample comes from: case index, and the start of the slice/tile in the volume."""

    case: int
    start: tuple
    size: tuple  # real (unpadded) size of the sample


@dataclass
class Batch:
    """A batch of samples: x (B, C, *S) float32, y (B, 1, *S) int64, valid (B, ndim) real sizes,
    ``pad`` (B, *S) bool, True on padding."""

    x: torch.Tensor
    y: torch.Tensor
    valid: torch.Tensor
    pad: torch.Tensor
    refs: list

    def to(self, device) -> "Batch":
        return Batch(self.x.to(device), self.y.to(device), self.valid, self.pad.to(device), self.refs)

    @property
    def mask(self) -> torch.Tensor:
        """(B, 1, *S) float: 1 on the real region, 0 on padding."""
        return (~self.pad).unsqueeze(1).to(self.x.dtype)


def _clean_label(seg: np.ndarray) -> np.ndarray:
    """nnU-Net marks background outside the nonzero mask with -1; it is background (0) here, as in
    nnU-Net's training transforms (RemoveLabelTansform(-1, 0))."""
    seg = np.asarray(seg).astype(np.int16)
    seg[seg < 0] = 0
    return seg


def load_fold_cases(model, fold: str, cases: list[str] | None = None) -> list[Case]:
    """The validation cases of ``fold`` (``splits_final.json``), or every case for fold "all", from
    the model's preprocessed data folder, read with nnU-Net's dataset class."""
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    root = Path(os.environ["nnUNet_preprocessed"]) / model.plans_manager.dataset_name
    folder = root / model.configuration_manager.data_identifier
    if not folder.is_dir():
        raise EvalError(f"no preprocessed data in {folder}: run nnUNetv2_plan_and_preprocess for this "
                        f"configuration, or give raw test cases with -i/-l")
    dataset_class = infer_dataset_class(str(folder))
    if fold == "all":
        ids = dataset_class.get_identifiers(str(folder))
    else:
        splits_file = root / "splits_final.json"
        if not splits_file.is_file():
            raise EvalError(f"no {splits_file}: the split is written by nnUNetv2_train; give -f all or -i/-l")
        splits = load_json(str(splits_file))
        if int(fold) >= len(splits):
            raise EvalError(f"unknown fold {fold}: {splits_file} defines folds 0..{len(splits) - 1}")
        ids = list(splits[int(fold)]["val"])
    if cases:
        missing = sorted(set(cases) - set(ids))
        if missing:
            raise EvalError(f"cases not in fold {fold}'s validation set: {', '.join(missing)}")
        ids = [i for i in ids if i in set(cases)]
    dataset = dataset_class(str(folder), identifiers=list(ids))
    ending = model.dataset_json["file_ending"]
    out = []
    for cid in sorted(ids):
        data, seg, _, props = dataset.load_case(cid)
        out.append(Case(cid, np.asarray(data[:], dtype=np.float32), _clean_label(np.asarray(seg[:])[0]), props,
                        str(root / "gt_segmentations" / f"{cid}{ending}")))
    if not out:
        raise EvalError(f"fold {fold} has no validation cases")
    return out


def check_label_values(cases: list[Case], num_classes: int, ignore_label: int | None, where: str) -> None:
    """EvalError (before any attack) if a label map holds a value the model has no class for."""
    for case in cases:
        values = np.unique(case.label)
        bad = [int(v) for v in values if not 0 <= v < num_classes and v != ignore_label]
        if bad:
            known = f"0..{num_classes - 1}" + ("" if ignore_label is None else f" and the ignore label {ignore_label}")
            raise EvalError(f"{where}: case {case.name} has label value(s) {', '.join(map(str, bad))}; the model "
                            f"knows {known} (its dataset.json labels)")


def raw_case_files(images: Path, labels: Path, file_ending: str, num_channels: int) -> list[tuple[str, list, Path]]:
    """(case id, image files, label file) for nnU-Net's raw layout; EvalError on anything missing."""
    images, labels = Path(images), Path(labels)
    for what, p in (("images folder (-i)", images), ("labels folder (-l)", labels)):
        if not p.is_dir():
            raise EvalError(f"{what} {p} does not exist")
    pat = re.compile(r"^(.*)_(\d{4})" + re.escape(file_ending) + "$")
    ids = sorted({m.group(1) for f in os.listdir(images) if (m := pat.match(f))})
    if not ids:
        raise EvalError(f"no images named CASE_0000{file_ending} in {images}")
    out = []
    for cid in ids:
        files = [images / f"{cid}_{c:04d}{file_ending}" for c in range(num_channels)]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise EvalError(f"case {cid}: missing channel file(s) {', '.join(missing)} in {images}")
        lab = labels / f"{cid}{file_ending}"
        if not lab.is_file():
            raise EvalError(f"case {cid}: no label file {lab}")
        out.append((cid, [str(f) for f in files], lab))
    return out


def load_raw_cases(model, images, labels, cases: list[str] | None = None) -> list[Case]:
    """Raw cases read by :func:`.images.read_case` (the model's reader; every failure one line naming the
    file) and preprocessed with the model's own preprocessor (as ``nnUNetPredictor`` does); ``cases``: only
    these case ids (a rank's share)."""
    dj = model.dataset_json
    files = raw_case_files(images, labels, dj["file_ending"], len(dj.get("channel_names", dj.get("modality", {0: 0}))))
    if cases is not None:
        missing = sorted(set(cases) - {cid for cid, _, _ in files})
        if missing:
            raise EvalError(f"cases not in {images}: {', '.join(missing)}")
        files = [f for f in files if f[0] in set(cases)]
    pm, cm = model.plans_manager, model.configuration_manager
    reader = pm.image_reader_writer_class()
    pre = cm.preprocessor_class(verbose=False)
    out = []
    for cid, image_files, lab in files:
        data, seg, props = read_case(reader, cid, image_files, lab, len(image_files))
        data, seg, props = pre.run_case_npy(data, seg, props, pm, cm, dj)
        out.append(Case(cid, np.asarray(data, np.float32), _clean_label(seg[0]), props, str(lab)))
    return out


def _round_up(v: int, m: int) -> int:
    return -(-v // m) * m


def sample_refs(cases: list[Case], dim: int, patch_size: tuple, max_samples: int | None = None) -> list[SampleRef]:
    """Every 2d slice (dim 2) or 3d patch tile (dim 3) of every case, in case order."""
    refs = []
    for ci, case in enumerate(cases):
        shape = case.label.shape
        if dim == 2:
            refs += [SampleRef(ci, (z, 0, 0), tuple(shape[1:])) for z in range(shape[0])]
        else:
            starts = [range(0, s, p) for s, p in zip(shape, patch_size)]
            for st in product(*starts):
                refs.append(SampleRef(ci, tuple(st), tuple(min(p, s - a) for a, p, s in zip(st, patch_size, shape))))
    return refs[:max_samples] if max_samples else refs


def padded_shape(ref: SampleRef, dim: int, pool_factor: tuple, patch_size: tuple) -> tuple:
    if dim == 2:
        return tuple(_round_up(s, f) for s, f in zip(ref.size, pool_factor))
    return tuple(patch_size)


def make_batches(cases: list[Case], refs: list[SampleRef], dim: int, pool_factor: tuple, patch_size: tuple,
                 batch_size: int) -> list[Batch]:
    """Group samples by padded shape (order kept within a group) and stack them into batches."""
    groups: dict[tuple, list[SampleRef]] = {}
    for r in refs:
        groups.setdefault(padded_shape(r, dim, pool_factor, patch_size), []).append(r)
    batches = []
    for shape, rs in groups.items():
        for i in range(0, len(rs), batch_size):
            chunk = rs[i:i + batch_size]
            c = cases[chunk[0].case].image.shape[0]
            x = np.zeros((len(chunk), c, *shape), np.float32)
            y = np.zeros((len(chunk), 1, *shape), np.int64)
            pad = np.ones((len(chunk), *shape), bool)
            for j, r in enumerate(chunk):
                case = cases[r.case]
                if dim == 2:
                    xi, yi = case.image[:, r.start[0]], case.label[r.start[0]]
                else:
                    sl = tuple(slice(a, a + s) for a, s in zip(r.start, r.size))
                    xi, yi = case.image[(slice(None),) + sl], case.label[sl]
                region = tuple(slice(0, s) for s in r.size)
                x[(j, slice(None)) + region] = xi
                y[(j, 0) + region] = yi
                pad[(j,) + region] = False
            valid = torch.tensor([r.size for r in chunk], dtype=torch.int64)
            batches.append(Batch(torch.from_numpy(x), torch.from_numpy(y), valid, torch.from_numpy(pad), chunk))
    return batches
