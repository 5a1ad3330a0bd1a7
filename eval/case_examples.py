"""Progress lines and ``--save-examples`` of the case scope.

Each kept case of each (attack, eps) gets a folder ``examples/<model>/case/<attack>_eps<eps>/`` with:

* ``<case>_pred_adversarial``, ``<case>_pred_clean``: nnU-Net's exported segmentations (what
  ``nnUNetv2_predict`` writes for the adversarial and the clean case), written with the plans' own
  reader/writer: always in the original geometry;
* ``<case>_label``: the raw label file the case is scored against (a copy);
* ``<case>_image``, ``<case>_adversarial``, ``<case>_noise`` (channel 0): the network's input, its
  adversarial version and their difference, **in the network's input units** (after nnU-Net's
  normalisation: an intensity normalisation that depends on the image, such as the per-case z-score,
  cannot be inverted for a perturbed image). They are put back into the original geometry (crop
  undone, axes transposed back, the raw file's spacing, origin and direction; 0 outside nnU-Net's crop)
  where the preprocessing did not resample the case (its shape before and after resampling agree) and
  the images are NIfTI/SimpleITK files; otherwise they stay on the preprocessed grid, and ``README.txt``
  of the folder says so.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from nnunet_ima.plumbing import atomic_write

from .case_metrics import case_summary


def choose_cases(cev, n: int) -> set:
    """``n`` case indices evenly spread over the evaluated cases."""
    if n <= 0:
        return set()
    idx = sorted({int(round(i)) for i in np.linspace(0, len(cev.indices) - 1, min(n, len(cev.indices)))})
    return {cev.indices[i] for i in idx}


def say(cev, evaluation) -> None:
    s = case_summary(evaluation.counts)
    print(f"  {cev.model.label} {evaluation.attack:9} eps={evaluation.eps:<8g} case Dice {100 * s['dice3d']['mean']:6.2f}  "
          f"TVDI {100 * s['tvdi']['mean']:6.2f}  (whole cases, as deployed; {evaluation.seconds:.1f} s)")


def invertible(cev, case) -> bool:
    """Whether the preprocessing of ``case`` can be undone voxel for voxel: no resampling, and geometry
    that SimpleITK can write back (the plans read images with SimpleITKIO)."""
    props = case.properties or {}
    same_grid = tuple(props.get("shape_after_cropping_and_before_resampling", ())) == tuple(case.image.shape[1:])
    rw = cev.model.plans_manager.image_reader_writer_class
    return same_grid and "sitk_stuff" in props and rw.__name__ == "SimpleITKIO"


def to_original(cev, case, a: np.ndarray) -> np.ndarray:
    """A preprocessed-grid array (*S) in the original geometry: crop undone (0 outside), axes back."""
    from acvl_utils.cropping_and_padding.bounding_boxes import insert_crop_into_image

    props = case.properties
    full = np.zeros(props["shape_before_cropping"], np.float32)
    full = insert_crop_into_image(full, a.astype(np.float32), props["bbox_used_for_cropping"])
    return full.transpose(cev.model.plans_manager.transpose_backward)


def _write_float(a: np.ndarray, path: Path, props: dict | None, spacing=None) -> None:
    """A float image; with ``props`` the geometry of the raw file (as SimpleITKIO.write_seg writes it)."""
    import SimpleITK as sitk

    if props is not None and len(props["sitk_stuff"]["spacing"]) == 2:
        a = a[0]
    img = sitk.GetImageFromArray(a.astype(np.float32))
    if props is not None:
        img.SetSpacing(props["sitk_stuff"]["spacing"])
        img.SetOrigin(props["sitk_stuff"]["origin"])
        img.SetDirection(props["sitk_stuff"]["direction"])
    elif spacing is not None:
        img.SetSpacing([float(s) for s in list(spacing)[::-1]])
    sitk.WriteImage(img, str(path), True)


def save_case_examples(folder: Path, cev, evaluation, clean) -> list[Path]:
    """Write the kept cases of one run into ``folder`` (see the module docstring); returns the files written."""
    if not evaluation.examples:
        return []
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ending = cev.model.dataset_json["file_ending"]
    rw = cev.model.plans_manager.image_reader_writer_class()
    clean_seg = {r.index: r.segmentation for r in clean.examples}
    written, notes = [], []
    for res in evaluation.examples:
        case = cev.ev.cases[res.index]
        for name, seg in (("pred_adversarial", res.segmentation), ("pred_clean", clean_seg.get(res.index))):
            if seg is not None:
                rw.write_seg(seg, str(folder / f"{case.name}_{name}{ending}"), case.properties)
                written.append(folder / f"{case.name}_{name}{ending}")
        shutil.copy(case.label_file, folder / f"{case.name}_label{ending}")
        written += [folder / f"{case.name}_label{ending}"] + _save_images(cev, case, res, folder, notes)
    head = ["Segmentations and labels: original geometry (nnU-Net's export).",
            "Images (image, adversarial, noise; channel 0): the network's input units (after nnU-Net's "
            "normalisation)."]
    readme = folder / "README.txt"  # one line per case: the cases of a run may be saved one at a time
    before = [ln for ln in readme.read_text().splitlines() if ln not in head] if readme.is_file() else []
    done = {ln.split(":")[0] for ln in notes}
    lines = head + [ln for ln in before if ln.split(":")[0] not in done] + notes
    with atomic_write(readme, "w") as f:
        f.write("\n".join(lines) + "\n")
    return written


def preprocessed_spacing(cev, case) -> list:
    """The spacing of the preprocessed case (Z, Y, X), as nnU-Net's export reads it: the plans' spacing,
    with the case's own out-of-plane spacing in front for a 2d configuration."""
    spacing = list(cev.model.configuration_manager.spacing)
    if len(spacing) == case.image.ndim - 1:
        return spacing
    transposed = [case.properties["spacing"][i] for i in cev.model.plans_manager.transpose_forward]
    return [transposed[0], *spacing]


def _save_images(cev, case, res, folder: Path, notes: list) -> list[Path]:
    x = case.image[0]
    adv = res.adversarial[0, 0].numpy()
    arrays = {"image": x, "adversarial": adv, "noise": adv - x}
    back, spacing = invertible(cev, case), [float(v) for v in preprocessed_spacing(cev, case)]
    notes.append(f"{case.name}: images in the original geometry" if back else
                 f"{case.name}: images on nnU-Net's preprocessed grid (the preprocessing resampled the case or read "
                 f"it with a reader this tool cannot write back; spacing {spacing}, origin 0, axes as the network sees them)")
    paths = []
    for name, a in arrays.items():
        p = folder / f"{case.name}_{name}.nii.gz"
        if back:
            _write_float(to_original(cev, case, a), p, case.properties)
        else:
            _write_float(a, p, None, spacing)
        paths.append(p)
    return paths
