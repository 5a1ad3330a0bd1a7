"""Real anatomy that ships offline: the MNI152 T1 template with grey/white-matter maps (nilearn).

The template (ICBM 2009a nonlinear symmetric, 1 mm, inside the ``nilearn`` wheel) is resampled to
``resolution_mm`` and cut into axial slabs; each slab is one nnU-Net case. Labels come from the
template's tissue probability maps: background 0, grey matter 1, white matter 2 (the most probable
tissue, where that tissue's probability is at least 0.5... see :func:`tissue_labels`). Slabs are split
into train and test by interleaving (every ``test_every``-th slab is a test case), so both sets
cover the whole brain while no slice appears in both.
"""
from __future__ import annotations

import numpy as np

DATASET_NAME = "MNIBrain"  # nnU-Net folder Dataset<id>_MNIBrain
LABELS = {"background": 0, "grey_matter": 1, "white_matter": 2}


def load_mni(resolution_mm: float = 3.0):
    """(t1, gm, wm) as (z, y, x) float32 arrays at ``resolution_mm`` isotropic, plus the spacing."""
    from nilearn import datasets, image

    target = np.diag([resolution_mm] * 3)
    vols = []
    for loader in (datasets.load_mni152_template, datasets.load_mni152_gm_template, datasets.load_mni152_wm_template):
        img = loader(resolution=1)
        img = image.resample_img(img, target_affine=target, interpolation="continuous", force_resample=True,
                                 copy_header=True)
        vols.append(np.asarray(img.get_fdata(), dtype=np.float32).transpose(2, 1, 0))  # (x,y,z) -> (z,y,x)
    return vols[0], vols[1], vols[2], (resolution_mm,) * 3


def tissue_labels(gm: np.ndarray, wm: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """0 = background, 1 = grey matter, 2 = white matter: the more probable tissue where it reaches
    ``threshold``, background elsewhere."""
    labels = np.zeros(gm.shape, np.uint8)
    labels[(gm >= threshold) & (gm >= wm)] = 1
    labels[(wm >= threshold) & (wm > gm)] = 2
    return labels


def mni_slab_cases(resolution_mm: float = 3.0, slab: int = 4, test_every: int = 3, min_tissue_fraction: float = 0.02):
    """Cut the template into axial slabs; returns (train, test, spacing) with case -> (image, label)."""
    t1, gm, wm, spacing = load_mni(resolution_mm)
    labels = tissue_labels(gm, wm)
    train, test = {}, {}
    n = t1.shape[0] // slab
    kept = 0
    for i in range(n):
        sl = slice(i * slab, (i + 1) * slab)
        lab = labels[sl]
        if (lab > 0).mean() < min_tissue_fraction:
            continue  # slabs above/below the brain carry no tissue
        case = f"mni_slab{i:02d}"
        (test if kept % test_every == test_every - 1 else train)[case] = (t1[sl].copy(), lab.copy())
        kept += 1
    return train, test, spacing
