"""The demo's dataset: real anatomy from the MNI152 template, labelled by its tissue maps."""
import numpy as np

from nnunet_ima_demo.mni import LABELS, mni_slab_cases, tissue_labels


def test_tissue_labels_by_hand():
    gm = np.array([0.9, 0.6, 0.4, 0.1, 0.5, 0.0])
    wm = np.array([0.05, 0.3, 0.55, 0.2, 0.5, 0.0])
    # gm wins, gm wins, wm wins, nothing reaches 0.5, tie goes to gm, background
    assert tissue_labels(gm, wm).tolist() == [1, 1, 2, 0, 1, 0]


def test_mni_slabs_are_real_anatomy_and_split_cleanly():
    train, test, spacing = mni_slab_cases(resolution_mm=4.0, slab=4, test_every=3)
    assert spacing == (4.0, 4.0, 4.0)
    assert len(train) >= 4 and len(test) >= 2 and not set(train) & set(test)
    labels = np.concatenate([lab.ravel() for _, lab in train.values()])
    frac = np.bincount(labels, minlength=3) / labels.size
    assert set(np.unique(labels)) == set(LABELS.values())
    # a brain has comparable amounts of grey and white matter, and the slabs hold a good share of tissue
    assert 0.05 < frac[1] < 0.5 and 0.03 < frac[2] < 0.5
    for image, lab in list(train.values()) + list(test.values()):
        assert image.shape == lab.shape and image.shape[0] == 4
        # T1 contrast: white matter is brighter than grey matter, grey brighter than the background
        wm, gmv = image[lab == 2], image[lab == 1]
        if wm.size > 20 and gmv.size > 20:
            assert wm.mean() > gmv.mean()
