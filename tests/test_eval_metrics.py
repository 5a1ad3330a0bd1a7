"""ADI / TVDI / per-case 3D Dice against hand-counted TP / FP / FN, and the empty-foreground rule."""
from __future__ import annotations

import math
import numpy as np
import pytest
import torch

from nnunet_ima.predicates import per_sample_dice, tp_fp_fn
from nnunet_ima_eval import metrics as M


def counts(tp, fp, fn, cases):
    return M.Counts(np.array(tp), np.array(fp), np.array(fn), list(cases))


def test_adi_tvdi_dice3d_hand_counted():
    # 3 samples x 2 foreground classes; samples 0, 1 from case "a", sample 2 from case "b"
    c = counts(tp=[[4, 1], [2, 0], [0, 0]],
               fp=[[0, 1], [2, 0], [0, 3]],
               fn=[[4, 0], [0, 0], [0, 0]], cases="aab")
    # per-sample, per-class Dice = 2TP / (2TP + FP + FN)
    d00, d01 = 8 / 12, 2 / 3          # sample 0
    d10, d11 = 4 / 6, math.nan        # sample 1: class 2 absent from truth and prediction -> undefined
    d20, d21 = math.nan, 0.0          # sample 2: class 1 undefined; class 2 only false positives -> 0
    adi = M.adi(c)
    assert adi[1] == pytest.approx((d00 + d10 + 1.0) / 3)        # undefined counts as 1 per class
    assert adi[2] == pytest.approx((d01 + 1.0 + d21) / 3)
    assert adi["mean"] == pytest.approx(((d00 + d01) / 2 + d10 + d21) / 3)  # undefined classes left out
    tv = M.tvdi(c)
    assert tv[1] == pytest.approx(2 * 6 / (2 * 6 + 2 + 4))
    assert tv[2] == pytest.approx(2 * 1 / (2 * 1 + 4 + 0))
    assert tv["mean"] == pytest.approx((tv[1] + tv[2]) / 2)
    d3, per_case = M.dice3d(c)
    a1, a2 = 2 * 6 / (12 + 2 + 4), 2 * 1 / (2 + 1)      # case a: summed counts
    b1, b2 = math.nan, 0.0                               # case b
    assert per_case == pytest.approx({"a": (a1 + a2) / 2, "b": 0.0})
    assert d3[1] == pytest.approx((a1 + 1.0) / 2) and d3[2] == pytest.approx((a2 + b2) / 2)
    assert d3["mean"] == pytest.approx(((a1 + a2) / 2 + 0.0) / 2)
    s = M.summarize(c)
    assert s["n_samples"] == 3 and s["n_empty"] == {1: 1, 2: 2, "mean": 1}


def test_empty_foreground_rule():
    # blank slice predicted blank: Dice 1 for every figure; blank slice with false positives: 0
    blank_ok = counts([[0]], [[0]], [[0]], "a")
    assert M.adi(blank_ok) == {1: 1.0, "mean": 1.0}
    assert M.tvdi(blank_ok) == {1: 1.0, "mean": 1.0}
    assert M.dice3d(blank_ok)[0] == {1: 1.0, "mean": 1.0}
    blank_fp = counts([[0]], [[5]], [[0]], "a")
    assert M.adi(blank_fp)["mean"] == 0.0 and M.tvdi(blank_fp)["mean"] == 0.0
    missed = counts([[0]], [[0]], [[7]], "a")
    assert M.adi(missed)["mean"] == 0.0
    # TVDI pools: a blank slice predicted blank adds nothing to it (ADI counts it as 1) ...
    c = counts([[3], [0]], [[0], [0]], [[3], [0]], "ab")
    assert M.tvdi(c)["mean"] == pytest.approx(6 / 9) and M.adi(c)["mean"] == pytest.approx((6 / 9 + 1) / 2)
    # ... and false positives on the blank slice lower both
    c = counts([[3], [0]], [[0], [3]], [[3], [0]], "ab")
    assert M.tvdi(c)["mean"] == pytest.approx(6 / 12) and M.adi(c)["mean"] == pytest.approx((6 / 9 + 0) / 2)


def test_sample_dice_is_the_kernels_predicate():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 3, 5, 7, generator=g)
    y = torch.randint(0, 3, (6, 5, 7), generator=g)
    y[0] = 0                                           # blank truth
    logits[1, 0] += 10; y[1] = 0                       # blank truth, blank prediction
    tp, fp, fn = tp_fp_fn(logits.argmax(1), y, 3)
    c = M.Counts(tp[:, 1:].numpy(), fp[:, 1:].numpy(), fn[:, 1:].numpy(), list("abcdef"))
    np.testing.assert_allclose(M.sample_dice(c), per_sample_dice(logits, y).numpy())
    assert M.sample_dice(c)[1] == 1.0


def test_nnunet_counts_agree():
    from nnunetv2.evaluation.evaluate_predictions import compute_tp_fp_fn_tn

    rng = np.random.default_rng(1)
    pred, gt = rng.integers(0, 3, (4, 6, 6)), rng.integers(0, 3, (4, 6, 6))
    tp, fp, fn = tp_fp_fn(torch.from_numpy(pred), torch.from_numpy(gt), 3)
    for k in (1, 2):
        for i in range(4):
            ntp, nfp, nfn, _ = compute_tp_fp_fn_tn(gt[i] == k, pred[i] == k)
            assert (tp[i, k], fp[i, k], fn[i, k]) == (ntp, nfp, nfn)


def test_adi_conventions_hand_counted():
    """--adi project (absent class left out, blank predicted blank = 1) vs --adi paper (the authors'
    getOnlineDiceMean: 2TP/(2TP+FP+FN+1e-8), absent class 0, samples without foreground skipped)."""
    c = counts(tp=[[4, 0], [0, 0], [0, 0], [2, 1]],
               fp=[[0, 0], [3, 0], [0, 0], [0, 1]],
               fn=[[4, 0], [0, 0], [0, 0], [0, 0]], cases="abcd")
    # s0: class 2 absent from truth and prediction; s1: no foreground in truth, false positives;
    # s2: blank slice predicted blank; s3: both classes present
    e = 1e-8
    p0 = (8 / (12 + e) + 0.0) / 2                     # paper: the absent class scores 0
    p3 = (4 / (4 + e) + 2 / (3 + e)) / 2
    paper = M.adi(c, "paper")
    assert paper["mean"] == pytest.approx((p0 + p3) / 2, abs=1e-12)   # s1 and s2 skipped
    assert paper[1] == pytest.approx((8 / 12 + 1) / 2) and paper[2] == pytest.approx((0 + 2 / 3) / 2)
    project = M.adi(c, "project")
    assert project["mean"] == pytest.approx((8 / 12 + 0.0 + 1.0 + (1 + 2 / 3) / 2) / 4)
    assert project[2] == pytest.approx((1 + 1 + 1 + 2 / 3) / 4)        # undefined counts 1 per class
    np.testing.assert_allclose(M.sample_dice(c, "paper"), [p0, np.nan, np.nan, p3], rtol=1e-12)
    # TVDI and 3D Dice do not depend on the convention
    s_paper, s_project = M.summarize(c, "paper"), M.summarize(c, "project")
    assert s_paper["tvdi"] == s_project["tvdi"] and s_paper["dice3d"] == s_project["dice3d"]
    assert s_paper["adi_convention"] == "paper"
    # no sample with foreground at all: the paper's ADI is undefined, the project's is 1
    blank = counts([[0]], [[0]], [[0]], "a")
    assert math.isnan(M.adi(blank, "paper")["mean"]) and M.adi(blank, "project")["mean"] == 1.0
    with pytest.raises(ValueError, match="convention"):
        M.adi(c, "authors")


def test_worst_is_the_per_sample_minimum_over_clean_and_attacks():
    """AutoAttack's rule for Dice: per sample the lowest Dice over clean AND every attack, so no sample is
    reported above its clean score, even where an attack's point happens to segment it better."""
    clean = counts(tp=[[3], [1], [2], [0]], fp=[[1], [0], [0], [0]], fn=[[0], [1], [0], [0]], cases="xxyy")
    # clean Dice by hand: 6/7, 2/3, 1, 1 (blank slice predicted blank)
    a = counts(tp=[[4], [0], [2], [0]], fp=[[0], [0], [2], [0]], fn=[[0], [3], [2], [0]], cases="xxyy")  # 1, 0, 1/2, 1
    b = counts(tp=[[2], [2], [3], [0]], fp=[[0], [0], [0], [4]], fn=[[2], [0], [1], [0]], cases="xxyy")  # 2/3, 1, 6/7, 0
    w, choice = M.worst_counts(clean, [a, b])
    assert choice.tolist() == [2, 1, 1, 2]  # 0 = clean, 1 = a, 2 = b
    np.testing.assert_allclose(M.sample_dice(w), [2 / 3, 0.0, 0.5, 0.0])
    # an attack that is above clean on a sample (a on sample 0: 1 > 6/7) does not lift it above clean
    only_a, pick = M.worst_counts(clean, [a])
    assert pick.tolist() == [0, 1, 1, 0]
    np.testing.assert_allclose(M.sample_dice(only_a), [6 / 7, 0.0, 0.5, 1.0])
    for cand in (w, only_a):
        assert (M.sample_dice(cand) <= M.sample_dice(clean) + 1e-12).all()  # never above clean, per sample
    assert M.adi(w)["mean"] == pytest.approx((2 / 3 + 0 + 0.5 + 0) / 4)
    assert M.adi(w)["mean"] <= min(M.adi(r)["mean"] for r in (clean, a, b))
    assert M.tvdi(w)["mean"] == pytest.approx(2 * 4 / (2 * 4 + 6 + 7))   # pooled counts of the chosen samples
    # the paper's convention decides by its own Dice: blank slice 3 is skipped there, the project's Dice decides
    _, pick_paper = M.worst_counts(clean, [a, b], "paper")
    assert pick_paper.tolist() == [2, 1, 1, 2]
    with pytest.raises(ValueError, match="same samples"):
        M.worst_counts(clean, [counts([[1]], [[0]], [[0]], "x")])
    with pytest.raises(ValueError, match="no attack"):
        M.worst_counts(clean, [])
