"""``nnunet_ima_eval.report.read_sample_dice``: the per-sample Dice behind each ADI of an output
folder, as written by the evaluation's own ResultStore (no attack is run)."""
from __future__ import annotations

import numpy as np
import pytest

from nnunet_ima_eval import report
from nnunet_ima_eval.metrics import Counts, summarize, worst_counts

BASE = {"norm": "l2", "loss": "dicece", "seed": 0, "batch_size": 16, "dataset": "D", "configuration": "2d",
        "plans": "P", "fold": "0", "checkpoint": "checkpoint_final.pth", "source": "fold", "max_samples": None}
CASES = ["a", "a", "b", "b"]


def counts(tp, fp, fn) -> Counts:
    return Counts(np.array(tp), np.array(fp), np.array(fn), list(CASES))


def write_folder(out, runs: dict) -> None:
    """runs: {(model, attack, eps): Counts}; adds the "worst" group (clean, pgd and ifgsm) at eps 2."""
    store = report.ResultStore(out)
    rows = []
    for (model, attack, eps), c in runs.items():
        key = {**BASE, "model": model, "attack": attack, "eps": eps, "steps": 0 if attack == "clean" else 10}
        store.put(key, {"checkpoint": model}, c, 1.0, {1: "one", 2: "two"}, {})
        rows += report.make_rows(key, summarize(c), {1: "one", 2: "two"}, 1.0)
    for model in {m for m, _, _ in runs}:
        w, _ = worst_counts(runs[(model, "clean", 0.0)], [runs[(model, "pgd", 2.0)], runs[(model, "ifgsm", 2.0)]])
        key = {**BASE, "model": model, "attack": "worst", "eps": 2.0, "steps": 0, "worst_of": "clean,pgd,ifgsm"}
        rows += report.make_rows(key, summarize(w), {1: "one", 2: "two"}, 2.0)
    store.rows = rows
    store.save()


def test_per_sample_dice_by_hand_and_the_worst_case_rebuilt(tmp_path):
    clean = counts([[4, 4], [3, 3], [2, 0], [5, 5]], [[0, 0], [1, 1], [0, 0], [0, 0]], [[0, 0], [1, 1], [0, 0], [0, 0]])
    pgd = counts([[2, 4], [3, 0], [0, 0], [5, 5]], [[2, 0], [1, 3], [0, 2], [0, 0]], [[2, 0], [1, 3], [2, 0], [0, 0]])
    ifgsm = counts([[3, 3], [1, 1], [2, 0], [4, 5]], [[1, 1], [0, 0], [0, 0], [1, 0]], [[1, 1], [2, 2], [0, 0], [1, 0]])
    write_folder(tmp_path, {("M", "clean", 0.0): clean, ("M", "pgd", 2.0): pgd, ("M", "ifgsm", 2.0): ifgsm})
    got = report.read_sample_dice(tmp_path)
    assert set(got) == {("M", "clean", 0.0), ("M", "pgd", 2.0), ("M", "ifgsm", 2.0), ("M", "worst", 2.0)}
    cases, d = got[("M", "pgd", 2.0)]
    assert cases == CASES
    # by hand: 2TP/(2TP+FP+FN) per class, mean over the defined classes (sample 3: class 2 absent from truth,
    # predicted: 0; sample 2 class 2: 0/(0+3+3))
    assert d == pytest.approx([(0.5 + 1.0) / 2, (6 / 8 + 0.0) / 2, (0.0 + 0.0) / 2, 1.0])
    ifg = got[("M", "ifgsm", 2.0)][1]
    assert ifg == pytest.approx([6 / 8, (2 / 4 + 2 / 4) / 2, 1.0, (8 / 10 + 1.0) / 2])
    clean_d = got[("M", "clean", 0.0)][1]
    assert clean_d == pytest.approx([1.0, 6 / 8, 1.0, 1.0])  # sample 2: class 2 undefined
    assert got[("M", "worst", 2.0)][1] == pytest.approx(np.minimum(clean_d, np.minimum(d, ifg)))
    adi = {(r["model"], r["attack"], r["eps"]): r["adi"] for r in report.read_table(tmp_path) if r["class"] == "mean"}
    for name, (_, dice) in got.items():  # each ADI is the mean of its per-sample Dice
        assert adi[name] == pytest.approx(float(np.nanmean(dice)))


def test_no_results_gives_nothing(tmp_path):
    assert report.read_sample_dice(tmp_path) == {}
