"""The one reader of raw test images and labels (``-i`` / ``-l``): every problem is one
:class:`~.errors.EvalError` naming the file and what is wrong, never a traceback from SimpleITK or
nnU-Net, and never a damaged file read as if it were whole.

Two steps, both before any attack:

* :func:`check_raw_cases` (before any model is loaded; file headers only, plus one pass over each gzip
  stream): every file is complete (a ``.gz`` cut short is refused: SimpleITK would read its first
  bytes as a shorter image), readable, holds one channel per voxel, and each label lies on its image
  (same size, spacing, origin and direction, as nnU-Net's ``verify_dataset_integrity`` compares them,
  except that a different origin or direction is an error here: the label would be scored against
  other voxels than it marks).
* :func:`read_case` (with the model's reader, as nnU-Net's predictor reads them): the arrays, one
  channel per file as the model expects, no NaN in the images, integer label values.

>>> check_raw_cases(raw_case_files(images, labels, ".nii.gz", 1))
>>> data, seg, props = read_case(reader, "case_006", image_files, label_file, 1)
"""
from __future__ import annotations

import contextlib
import gzip
import io
import zlib
from pathlib import Path

import numpy as np

from .errors import EvalError

#: file endings whose header SimpleITK reads (nnU-Net's SimpleITKIO endings, plus plain NIfTI)
HEADER_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".mha", ".gipl")


def _first_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    for marker in ("ImageIO", "Description:"):  # SimpleITK's reason sits after its source location
        if marker in text:
            text = text[text.index(marker):]
    return (text or type(error).__name__)[:200]


def _gzip_problem(path: Path) -> str | None:
    """Why the gzip stream of ``path`` cannot be read to its end (None when it can)."""
    try:
        with gzip.open(path, "rb") as f:
            while f.read(1 << 24):
                pass
    except EOFError:
        return "truncated: the gzip stream ends before its end marker (a copy cut short?)"
    except (OSError, zlib.error) as e:
        return f"not a valid gzip file though named .gz ({_first_line(e)})"
    return None


def check_file(path) -> dict | None:
    """EvalError unless ``path`` is a complete, readable image file; returns its header ({"size" (x, y, z),
    "spacing", "origin", "direction", "components"}) for the endings SimpleITK reads, else None."""
    import SimpleITK as sitk

    path = Path(path)
    if not path.is_file() or path.stat().st_size == 0:
        raise EvalError(f"{path}: cannot be read as an image (missing or empty)")
    if path.name.endswith(".gz") and (why := _gzip_problem(path)):
        raise EvalError(f"{path}: cannot be read as an image: {why}")
    if not path.name.endswith(HEADER_ENDINGS):
        return None
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as e:
        raise EvalError(f"{path}: cannot be read as an image ({_first_line(e)})") from None
    return {"size": tuple(reader.GetSize()), "spacing": tuple(reader.GetSpacing()), "origin": tuple(reader.GetOrigin()),
            "direction": tuple(reader.GetDirection()), "components": reader.GetNumberOfComponents()}


def _check_geometry(cid: str, image: Path, head: dict, label: Path, lab: dict) -> None:
    """The label lies on its image: one size, spacing, origin and direction (np.allclose, as nnU-Net)."""
    if lab["size"] != head["size"]:
        raise EvalError(f"case {cid}: label shape {lab['size'][::-1]} does not match image shape {head['size'][::-1]} "
                        f"({label})")
    for what in ("spacing", "origin", "direction"):
        if not np.allclose(lab[what], head[what]):
            raise EvalError(f"{label}: its {what} {tuple(round(v, 6) for v in lab[what])} differs from its image's "
                            f"{tuple(round(v, 6) for v in head[what])} ({image.name}): the label does not lie on the "
                            f"image")


def check_raw_cases(cases: list[tuple[str, list, Path]]) -> None:
    """Every file of ``cases`` ((case id, image files, label file), :func:`~.data.raw_case_files`) complete
    and readable, one channel per voxel, each label on its image; EvalError naming the first bad file."""
    for cid, image_files, label in cases:
        heads = [(Path(f), check_file(f)) for f in image_files]
        lab = check_file(label)
        for f, head in heads + [(Path(label), lab)]:
            if head is not None and head["components"] != 1:
                raise EvalError(f"{f}: {head['components']} channels (components) per voxel; nnU-Net reads one "
                                f"channel per file (CASE_0000, CASE_0001, ... as dataset.json's channel_names)")
        if heads[0][1] is not None and lab is not None:
            _check_geometry(cid, heads[0][0], heads[0][1], Path(label), lab)


def _read(what: str, files: list, call):
    """``call()`` with nnU-Net's console chatter kept off the output; any failure is one EvalError naming ``files``."""
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return call()
    except Exception as e:  # noqa: BLE001 - SimpleITK, nibabel, PIL, nnU-Net's asserts: one message, the file named
        names = ", ".join(str(f) for f in files)
        raise EvalError(f"{names}: cannot be read as {what} ({_first_line(e)})") from None


def read_case(reader, cid: str, image_files: list, label_file, num_channels: int) -> tuple:
    """(data (C, *spatial) float32, seg (1, *spatial), properties) of one raw case, read with the model's
    ``reader`` (nnU-Net's reader-writer); EvalError naming the file for anything the model cannot take."""
    data, props = _read("images", image_files, lambda: reader.read_images(image_files))
    seg, _ = _read("a label map", [label_file], lambda: reader.read_seg(str(label_file)))
    if data.ndim != 4 or data.shape[0] != num_channels:
        raise EvalError(f"case {cid}: {', '.join(map(str, image_files))} read as an array of shape {data.shape}; the "
                        f"model takes {num_channels} channel(s), one file per channel")
    if tuple(data.shape[1:]) != tuple(seg.shape[1:]):
        raise EvalError(f"case {cid}: label shape {tuple(seg.shape[1:])} does not match image shape "
                        f"{tuple(data.shape[1:])} ({label_file})")
    if np.isnan(data).any():
        raise EvalError(f"case {cid}: {', '.join(map(str, image_files))} hold NaN values; replace them first")
    values = np.unique(seg)
    fractional = values[values != np.round(values)]
    if fractional.size:
        raise EvalError(f"{label_file}: non-integer label values ({', '.join(f'{v:g}' for v in fractional[:3])}); a "
                        f"label map holds class numbers")
    return data, seg, props
