"""``nnunet-ima-attack --scope case``: whole cases through nnU-Net's sliding-window predictor, scored as
deployed (eval/case_scope.py, case_metrics.py, case_checks.py, case_examples.py).

Unit tests: nnU-Net's empty-class rules against hand counts, the budget's factor, the run keys (a
sample-scope key is spelled as before, a case-scope key carries scope, tile step, mirroring and budget),
the two-scope table, ``read_sample_dice(scope="case")``.

End to end (slow), with raw test cases written here so that the deployed path is exercised: one case is
resampled by the 2d plan (spacing 1.25 mm in-plane, the plan's 1 mm), one has a zero border that nnU-Net
crops away; both are larger than the 32 x 32 patch (overlapping windows). The clean case-scope Dice must
equal the Dice of ``nnUNetv2_predict``'s output files (the real console script, its defaults: tile step
0.5, test-time mirroring) against the label files, computed here from the files.
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import subprocess

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import EVAL_TRAINER, EVAL_TRAINER_3D, TINY_ID, nnunet_env_of
from nnunet_ima_eval.case_metrics import case_dice, case_summary
from nnunet_ima_eval.case_scope import CaseSettings, case_budget, case_keys
from nnunet_ima_eval.metrics import Counts
from nnunet_ima_eval.report import read_sample_dice, row_key, table
from nnunet_ima_eval.runner import AttackSettings



# ---------------------------------------------------------------------------------------------- units
def test_nnunet_empty_class_rules_on_hand_counts():
    """Case A: class 1 Dice 2*3/(6+1+1) = 0.75, class 2 absent from label and prediction (NaN). Case B:
    class 1 2*1/(2+0+2) = 0.5, class 2 predicted where the label has none: 0."""
    c = Counts(np.array([[3, 0], [1, 0]]), np.array([[1, 0], [0, 4]]), np.array([[1, 0], [2, 0]]), ["a", "b"])
    s = case_summary(c)
    assert s["dice3d_per_case"] == {"a": 0.75, "b": 0.25}          # nanmean over the classes defined in the case
    assert s["dice3d"][1] == pytest.approx(0.625)                   # nanmean over cases
    assert s["dice3d"][2] == 0.0                                    # only case B defines class 2
    assert s["dice3d"]["mean"] == pytest.approx(0.3125)             # nnU-Net's foreground_mean: mean of class means
    assert s["adi"] == s["dice3d"] and s["adi_convention"] == "nnunet"
    assert s["tvdi"][1] == pytest.approx(8 / 12) and s["tvdi"][2] == 0.0
    assert s["n_empty"] == {1: 0, 2: 2, "mean": 0}
    empty = Counts(np.zeros((1, 2), int), np.zeros((1, 2), int), np.zeros((1, 2), int), ["c"])
    assert np.isnan(case_dice(empty)[0]) and np.isnan(case_summary(empty)["dice3d"]["mean"])


def test_case_budget_blocks_and_whole():
    blocks, f = case_budget("l2", "blocks", (32, 32), (7, 50, 50))
    assert f == 1.0 and blocks.block == (1, None, None) and blocks.count((7, 50, 50)) == 7
    whole, f = case_budget("l2", "whole", (8, 32, 32), (10, 40, 70))
    assert whole.name == "l2" and f == pytest.approx(math.sqrt(2 * 2 * 3))  # 2 x 2 x 3 patch-grid tiles
    linf, f = case_budget("linf", "whole", (8, 32, 32), (10, 40, 70))
    assert linf.name == "linf" and f == 1.0


def test_case_keys_carry_the_scope_and_the_predictor_and_sample_keys_are_unchanged():
    common = {"model": "m", "dataset": "D", "configuration": "2d", "plans": "p", "fold": "0", "checkpoint": "c",
              "source": "fold", "max_samples": None}
    s = AttackSettings(pgd_steps=3)
    keys = case_keys(common, s, CaseSettings(0.5, True, "blocks"), ["pgd"], [0.0, 2.0])
    assert [k["attack"] for k in keys] == ["clean", "pgd", "pgd"] and all(k["scope"] == "case" for k in keys)
    other = case_keys(common, s, CaseSettings(0.75, True, "blocks"), ["pgd"], [0.0, 2.0])
    mirror = case_keys(common, s, CaseSettings(0.5, False, "blocks"), ["pgd"], [0.0, 2.0])
    whole = case_keys(common, s, CaseSettings(0.5, True, "whole"), ["pgd"], [0.0, 2.0])
    for changed in (other, mirror):
        assert all(row_key(a) != row_key(b) for a, b in zip(keys, changed))
    assert row_key(keys[0]) == row_key(whole[0]) and row_key(keys[2]) != row_key(whole[2])  # clean has no budget
    sample = {**common, "attack": "pgd", "eps": 2.0, "norm": "l2", "loss": "dicece", "steps": 3, "seed": 0,
              "batch_size": 16, "iterate": "final"}
    assert row_key({**sample, "scope": "sample"}) == row_key(sample)  # results stored before the case scope
    assert row_key({**keys[2], "scope": "sample"}) != row_key(keys[2])


def _row(scope, attack, eps, v, model="m"):
    return {"model": model, "scope": scope, "attack": attack, "eps": eps, "class": "mean", "adi": v, "tvdi": v,
            "dice3d": v, "adi_convention": "project" if scope == "sample" else "nnunet"}


def test_table_has_a_column_group_per_scope():
    rows = [_row("sample", "clean", 0.0, 0.9), _row("sample", "pgd", 2.0, 0.5),
            _row("case", "clean", 0.0, 0.8), _row("case", "pgd", 2.0, 0.7)]
    lines = table(rows, "dice3d").splitlines()
    assert "sample scope" in lines[1] and "case scope" in lines[1]
    assert lines[1].index("case scope") > lines[2].index("P. 2")      # the case group starts after the sample one
    assert lines[2].split()[1:] == ["S.", "Dice", "P.", "2", "S.", "Dice", "P.", "2"]
    assert lines[3].split()[1:] == ["90.00", "50.00", "80.00", "70.00"]
    assert "scope" not in table(rows[:2], "dice3d")  # the sample scope alone: the papers' layout as before


# ---------------------------------------------------------------------------------------------- end to end
def attack(args: list[str]) -> tuple[int, str, str]:
    from nnunet_ima_eval.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(args)
        except SystemExit as e:
            rc = e.code
    return rc, out.getvalue(), err.getvalue()


def write_case(images, labels, name: str, image: np.ndarray, label: np.ndarray, spacing) -> None:
    for arr, path in ((image.astype(np.float32), images / f"{name}_0000.nii.gz"),
                      (label.astype(np.uint8), labels / f"{name}.nii.gz")):
        img = sitk.GetImageFromArray(arr)
        img.SetSpacing([float(s) for s in spacing[::-1]])
        img.SetOrigin((3.0, -2.0, 7.5))
        sitk.WriteImage(img, str(path), True)


@pytest.fixture(scope="module")
def raw_2d(tmp_path_factory):
    """Two raw test cases: ``res`` resampled by the 2d plan (1.25 mm in-plane), ``crop`` with a zero border."""
    from data_gen import synthetic_shapes

    root = tmp_path_factory.mktemp("raw2d")
    images, labels = root / "imagesTs", root / "labelsTs"
    images.mkdir(), labels.mkdir()
    (img, lab), = synthetic_shapes(1, shape=(3, 36, 40), seed=11).values()
    write_case(images, labels, "res", img, lab, (1.0, 1.25, 1.25))
    (img, lab), = synthetic_shapes(1, shape=(4, 40, 44), seed=12).values()
    img[..., :3], img[..., -2:], lab[..., :3], lab[..., -2:] = 0, 0, 0, 0
    write_case(images, labels, "crop", img, lab, (1.0, 1.0, 1.0))
    return images, labels


@pytest.fixture(scope="module")
def env2d(tiny_trained_2d):
    with nnunet_env_of(tiny_trained_2d) as tiny:
        yield tiny


def common_2d(out, raw) -> list[str]:
    return ["-d", str(TINY_ID), "-c", "2d", "-f", "0", "-tr", EVAL_TRAINER, "-o", str(out), "--quiet",
            "-i", str(raw[0]), "-l", str(raw[1]), "--eps", "0", "15", "--attacks", "pgd", "worst",
            "--pgd-steps", "1", "--device", "cpu"]


@pytest.fixture(scope="module")
def run_2d(env2d, raw_2d, tmp_path_factory):
    """The sample scope alone first (the default), then both scopes in the same folder."""
    out = tmp_path_factory.mktemp("case2d")
    rc, first, err = attack(common_2d(out, raw_2d) + ["--no-sanity"])
    assert rc == 0, err
    args = common_2d(out, raw_2d) + ["--scope", "sample", "case", "--save-examples", "2"]
    rc, stdout, err = attack(args)
    assert rc == 0, err
    return out, args, first, stdout, json.loads((out / "results.json").read_text())


def _mean_rows(results, scope, attack_name):
    return [r for r in results["rows"] if r["scope"] == scope and r["attack"] == attack_name and r["class"] == "mean"]


@pytest.mark.slow
def test_both_scopes_in_one_table_csv_and_json(run_2d):
    out, _, first, stdout, results = run_2d
    assert "case scope" not in first
    assert "sample scope (slices / tiles)" in stdout and "case scope (whole cases, as deployed)" in stdout
    assert "case scope: 2 cases" in stdout and "4 of 4 results" not in stdout  # the sample scope was reused
    with open(out / "results.csv", newline="") as f:
        csv_rows = list(csv.DictReader(f))
    assert {r["scope"] for r in csv_rows} == {"sample", "case"}
    case_rows = [r for r in csv_rows if r["scope"] == "case"]
    assert {r["attack"] for r in case_rows} == {"clean", "pgd", "worst"}
    assert {r["tile_step"] for r in case_rows} == {"0.5"} and {r["mirroring"] for r in case_rows} == {"True"}
    assert {r["n_samples"] for r in case_rows} == {"2"}  # a sample is a case
    clean, pgd = _mean_rows(results, "case", "clean")[0], _mean_rows(results, "case", "pgd")
    big = [r for r in pgd if r["eps"] == 15.0][0]
    assert big["dice3d"] < clean["dice3d"] - 0.05
    checks = {c["check"]: c["status"] for c in results["checks"]}
    for name in ("budget[pgd]@case", "eps0_equals_clean[pgd]@case", "noise_weaker@case", "non_increasing[pgd]@case"):
        assert checks[name] == "ok", name
    dice = read_sample_dice(out, scope="case")
    cases, d = dice[(EVAL_TRAINER, "clean", 0.0)]
    assert sorted(cases) == ["crop", "res"] and np.nanmean(d) == pytest.approx(np.mean(
        [p["dice3d"] for p in results["per_case"] if p["scope"] == "case" and p["attack"] == "clean"]))
    assert len(read_sample_dice(out)[(EVAL_TRAINER, "clean", 0.0)][0]) == 7  # the sample scope: 3 + 4 slices


def _file_dice(label_file, pred_file, classes=(1, 2)) -> float:
    """nnU-Net's rule from the files: per class 2TP/(2TP+FP+FN), NaN when absent from both; mean of the defined."""
    ref_img, pred_img = sitk.ReadImage(str(label_file)), sitk.ReadImage(str(pred_file))
    assert ref_img.GetSize() == pred_img.GetSize() and ref_img.GetSpacing() == pred_img.GetSpacing()
    ref, pred = sitk.GetArrayFromImage(ref_img), sitk.GetArrayFromImage(pred_img)
    out = []
    for c in classes:
        tp, fp, fn = (int(((ref == c) & (pred == c)).sum()), int(((ref != c) & (pred == c)).sum()),
                      int(((ref == c) & (pred != c)).sum()))
        out.append(np.nan if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn))
    return float(np.nanmean(out))


@pytest.mark.slow
def test_clean_case_dice_equals_nnunetv2_predicts_output_files(run_2d, raw_2d, env2d, tmp_path):
    from nnunet_ima_demo.nnunet_data import nnunet_command

    _, _, _, _, results = run_2d
    cmd = nnunet_command("nnUNetv2_predict") + ["-i", str(raw_2d[0]), "-o", str(tmp_path), "-d", str(TINY_ID), "-c",
                                                "2d", "-f", "0", "-tr", EVAL_TRAINER, "-device", "cpu", "-npp", "1",
                                                "-nps", "1", "--disable_progress_bar"]
    run = subprocess.run(cmd, env=env2d.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert run.returncode == 0, run.stdout[-3000:]
    ours = {p["case"]: p["dice3d"] for p in results["per_case"] if p["scope"] == "case" and p["attack"] == "clean"}
    assert sorted(ours) == ["crop", "res"]
    for case, dice in ours.items():
        assert dice == pytest.approx(_file_dice(raw_2d[1] / f"{case}.nii.gz", tmp_path / f"{case}.nii.gz"), abs=1e-12)
    assert 0.2 < np.mean(list(ours.values())) < 1


@pytest.mark.slow
def test_examples_are_written_in_the_original_geometry_where_invertible(run_2d, raw_2d):
    out, _, _, _, _ = run_2d
    folder = next((out / "examples" / EVAL_TRAINER).glob("*/case/pgd_eps15"))  # examples/<trainer>/<model>/case/
    note = (folder / "README.txt").read_text()
    assert "crop: images in the original geometry" in note and "res: images on nnU-Net's preprocessed grid" in note
    raw = sitk.ReadImage(str(raw_2d[0] / "crop_0000.nii.gz"))
    for name in ("adversarial", "noise", "pred_adversarial", "pred_clean", "label"):
        img = sitk.ReadImage(str(folder / f"crop_{name}.nii.gz"))
        assert img.GetSize() == raw.GetSize() and img.GetSpacing() == raw.GetSpacing() and img.GetOrigin() == raw.GetOrigin()
    noise = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "crop_noise.nii.gz")))
    assert float(np.abs(noise[..., :3]).max()) == 0 and float(np.abs(noise[..., -2:]).max()) == 0  # cropped away
    per_slice = np.sqrt((noise.astype(np.float64) ** 2).sum((1, 2)))
    assert per_slice.max() <= 15 * (1 + 1e-4) and per_slice.min() > 1  # each slice in its own ball, all used
    res = sitk.ReadImage(str(folder / "res_adversarial.nii.gz"))
    assert res.GetSize() == (50, 45, 3)  # the preprocessed grid (1 mm in-plane)
    assert sitk.ReadImage(str(folder / "res_pred_adversarial.nii.gz")).GetSize() == (40, 36, 3)  # export: original


@pytest.mark.slow
def test_rerun_reuses_and_a_new_tile_step_recomputes_the_case_scope_only(run_2d, monkeypatch):
    out, args, _, _, results = run_2d
    import nnunet_ima_eval.pipeline as pipeline

    real = pipeline.load_model

    def no_load(*a, **k):
        raise AssertionError("a rerun must not load the model")

    monkeypatch.setattr(pipeline, "load_model", no_load)
    rc, stdout, err = attack(args)
    assert rc == 0, err
    assert "already in" in stdout and "to compute" not in stdout
    assert json.loads((out / "results.json").read_text())["rows"] == results["rows"]
    monkeypatch.setattr(pipeline, "load_model", real)
    rc, stdout, err = attack(args + ["--tile-step", "0.75", "--no-sanity"])
    assert rc == 0, err
    assert "case scope: 2 cases" in stdout and "3 results to compute" in stdout and "slices in" not in stdout
    again = json.loads((out / "results.json").read_text())
    assert {r["tile_step"] for r in again["rows"] if r["scope"] == "case"} == {0.75}
    assert {r["key"]["tile_step"] for r in again["runs"] if r["key"].get("scope") == "case"} == {0.5, 0.75}


@pytest.mark.parametrize("bad, message", [
    (["--scope", "slices"], "--scope: unknown slices"),
    (["--tile-step", "0"], "--tile-step must be in (0, 1]"),
    (["--case-budget", "ball"], "argument --case-budget: invalid choice"),
])
def test_bad_case_options_are_one_line(bad, message, tmp_path):
    rc, _, err = attack(["-d", "1", "-o", str(tmp_path), "--eps", "1"] + bad)
    assert rc == 2 and len(err.splitlines()) == 1 and message in err, err


# ---------------------------------------------------------------------------------------------- 3d
@pytest.fixture(scope="module")
def env3d(tiny_trained_3d):
    with nnunet_env_of(tiny_trained_3d) as tiny:
        yield tiny


@pytest.mark.slow
def test_3d_model_both_scopes_end_to_end(env3d, tmp_path):
    """A 3d model on a case of 2 x 2 x 2 overlapping windows (patch 8 x 32 x 32), mirroring off, one L2 ball
    over the whole case (``--case-budget whole``: radius eps x sqrt(8 patch-grid tiles))."""
    import torch
    from data_gen import synthetic_shapes
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    images, labels, out, pred = (tmp_path / n for n in ("img", "lab", "out", "pred"))
    images.mkdir(), labels.mkdir(), pred.mkdir()
    (img, lab), = synthetic_shapes(1, shape=(10, 40, 40), seed=13).values()
    write_case(images, labels, "vol", img, lab, (1.0, 1.0, 1.0))
    args = ["-d", str(TINY_ID), "-c", "3d_fullres", "-f", "0", "-tr", EVAL_TRAINER_3D, "-o", str(out), "--quiet",
            "-i", str(images), "-l", str(labels), "--eps", "0", "5", "--attacks", "pgd", "--pgd-steps", "1",
            "--scope", "sample", "case", "--no-mirroring", "--no-sanity", "--device", "cpu", "--case-budget", "whole",
            "--save-examples", "1"]
    rc, stdout, err = attack(args)
    assert rc == 0, err
    assert "case scope: 1 cases, 8 windows x 1 mirrored passes" in stdout
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["scope"] for r in rows} == {"sample", "case"}
    assert {r["mirroring"] for r in rows if r["scope"] == "case"} == {"False"}
    assert {r["budget"] for r in rows if r["scope"] == "case" and r["attack"] == "pgd"} == {"whole"}
    folder = next((out / "examples" / EVAL_TRAINER_3D).glob("*/case/pgd_eps5"))
    noise = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "vol_noise.nii.gz"))).astype(np.float64)
    assert noise.shape == (10, 40, 40) and 5 * 1.5 < np.sqrt((noise ** 2).sum()) <= 5 * math.sqrt(8) * (1 + 1e-4)
    results = json.loads((out / "results.json").read_text())
    p = nnUNetPredictor(tile_step_size=0.5, use_mirroring=False, device=torch.device("cpu"), allow_tqdm=False)
    p.initialize_from_trained_model_folder(
        str(env3d.results / env3d.dataset_name / f"{EVAL_TRAINER_3D}__nnUNetPlans__3d_fullres"), (0,),
        "checkpoint_final.pth")
    p.predict_from_files_sequential(str(images), str(pred), False, True, None)
    (clean,) = [x["dice3d"] for x in results["per_case"] if x["scope"] == "case" and x["attack"] == "clean"]
    theirs = _file_dice(labels / "vol.nii.gz", pred / "vol.nii.gz")
    assert clean == pytest.approx(theirs, abs=1e-12) or (np.isnan(clean) and np.isnan(theirs))
