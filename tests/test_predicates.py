"""Dice predicate and per-sample Dice against hand-counted TP/FP/FN."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nnunet_ima import DicePredicate, argmax_correct, bpgd, per_sample_dice, pgd


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def logits_of(pred: torch.Tensor, c: int = 3) -> torch.Tensor:
    """Logits (B, C, H, W) whose argmax is the label map ``pred`` (B, H, W)."""
    return 10.0 * F.one_hot(pred, c).permute(0, 3, 1, 2).float()


# five 2x3 samples, classes 0 (background), 1, 2
GT = torch.tensor([
    [[0, 1, 1], [0, 2, 2]],   # 0: class 1 TP1 FP1 FN1 -> 1/2; class 2 TP1 FP0 FN1 -> 2/3
    [[0, 0, 0], [0, 0, 0]],   # 1: blank slice predicted blank -> 1
    [[0, 0, 0], [0, 0, 0]],   # 2: blank slice, a false positive of class 1 -> 0
    [[1, 1, 0], [0, 0, 0]],   # 3: class 1 perfect, class 2 absent from both -> 1
    [[0, 0, 0], [2, 2, 0]],   # 4: class 2 missed entirely -> 0
])
PRED = torch.tensor([
    [[1, 1, 0], [0, 2, 0]],
    [[0, 0, 0], [0, 0, 0]],
    [[0, 1, 0], [0, 0, 0]],
    [[1, 1, 0], [0, 0, 0]],
    [[0, 0, 0], [0, 0, 0]],
])
MEAN = [(0.5 + 2 / 3) / 2, 1.0, 0.0, 1.0, 0.0]
MAX = [2 / 3, 1.0, 0.0, 1.0, 0.0]


def test_per_sample_dice_mean_by_hand():
    d = per_sample_dice(logits_of(PRED), GT)
    assert d.shape == (5,) and d.dtype == torch.float64
    assert d.tolist() == pytest.approx(MEAN)


def test_per_sample_dice_max_by_hand():
    assert per_sample_dice(logits_of(PRED), GT, reduction="max").tolist() == pytest.approx(MAX)


def test_threshold_and_reductions():
    logits = logits_of(PRED)
    assert DicePredicate()(logits, GT).tolist() == [False, True, False, True, False]  # 0.583 < 0.6
    assert DicePredicate(reduction="max")(logits, GT).tolist() == [True, True, False, True, False]
    assert DicePredicate(threshold=0.5)(logits, GT).tolist() == [True, True, False, True, False]
    assert DicePredicate().threshold == 0.6


def test_channel_targets_and_deep_supervision_lists():
    logits = logits_of(PRED)
    expected = per_sample_dice(logits, GT)
    assert torch.equal(per_sample_dice(logits, GT[:, None]), expected)          # (B, 1, H, W)
    junk = torch.zeros(5, 3, 1, 2)
    ds_target = [GT[:, None], torch.zeros(5, 1, 1, 2, dtype=torch.long)]
    assert torch.equal(per_sample_dice([logits, junk], ds_target), expected)    # nnU-Net deep supervision
    pred = DicePredicate()
    assert torch.equal(pred([logits, junk], ds_target), pred(logits, GT))


def test_float_targets_as_nnunet_stores_them():
    assert per_sample_dice(logits_of(PRED), GT[:, None].float()).tolist() == pytest.approx(MEAN)


def test_ignore_label_pixels_do_not_count():
    gt = torch.tensor([[[1, 1, 3], [0, 0, 3]]])
    pred = torch.tensor([[[1, 1, 1], [0, 2, 2]]])     # the wrong guesses on label 3 pixels are ignored
    logits = logits_of(pred, c=4)
    # class 1: TP 2 FP 0 FN 0 -> 1; class 2: FP 1 at (1,1) -> 0; class 3: ignored -> undefined
    assert per_sample_dice(logits, gt, ignore_label=3).tolist() == pytest.approx([0.5])
    assert DicePredicate(ignore_label=3, reduction="max")(logits, gt).tolist() == [True]


def test_3d_volumes():
    gt = torch.zeros(2, 2, 2, 2, dtype=torch.long)
    gt[0, 0, 0, 0] = 1
    pred = gt.clone()
    pred[1, 1, 1, 1] = 1
    logits = 10.0 * F.one_hot(pred, 2).permute(0, 4, 1, 2, 3).float()
    assert per_sample_dice(logits, gt).tolist() == [1.0, 0.0]


@pytest.mark.parametrize("kwargs, name", [
    (dict(threshold=0.0), "threshold"), (dict(threshold=1.0), "threshold"), (dict(reduction="sum"), "reduction")])
def test_bad_settings(kwargs, name):
    with pytest.raises(ValueError, match=name):
        DicePredicate(**kwargs)
    if "reduction" in kwargs:
        with pytest.raises(ValueError, match="reduction"):
            per_sample_dice(logits_of(PRED), GT, reduction="sum")


def test_argmax_correct_classification_and_dense():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [1.0, 0.5]])
    assert argmax_correct(logits, torch.tensor([0, 1, 1])).tolist() == [True, True, False]
    # dense output: a sample is correct only if every pixel is
    assert argmax_correct(logits_of(PRED), GT).tolist() == [False, True, False, True, False]
    assert argmax_correct(logits_of(GT), GT[:, None]).all()


def test_dice_predicate_drives_bpgd_on_a_segmentation_model():
    """A 1x1-conv segmenter: BPGD with the Dice predicate stops where Dice drops below 0.6."""
    torch.manual_seed(0)
    model = torch.nn.Conv2d(1, 2, 1).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[[[-1.0]]], [[[1.0]]]], dtype=torch.float64))
        model.bias.zero_()
    x = torch.randn(6, 1, 6, 6, dtype=torch.float64)
    y = (x > 0).long()                                    # the model is exactly right: Dice 1
    pred = DicePredicate()
    res = bpgd(model, x, y, 8.0, steps=20, search_steps=12, is_correct=pred)
    assert res.crossed.all()
    with torch.no_grad():
        at_boundary = pred.dice(model(res.x_adv), y)
        beyond = pred.dice(model(pgd(model, x, y, 8.0, steps=20, random_start=False)), y)
    # Dice is a pixel count: one flipped pixel (of ~18 foreground) moves it by ~0.03
    assert ((at_boundary - 0.6).abs() < 0.1).all(), at_boundary
    assert (beyond < 0.6).all() and beyond.mean() < at_boundary.mean() - 0.1, beyond
    none = bpgd(model, x, y, 1e-3, is_correct=pred)
    assert not none.crossed.any()
