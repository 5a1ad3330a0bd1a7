"""End to end: ``nnunet-ima-attack`` on a standard nnU-Net model trained in the session (real
``nnUNetv2_train``) and the generated NIfTI test cases (imagesTs / labelsTs).

* the clean row equals the Dice of nnU-Net's own prediction (``nnUNetPredictor``) of the same cases,
  scored with nnU-Net's own ``compute_metrics``;
* Dice under PGD at a large eps is far below the clean one;
* a rerun skips finished rows; bad inputs give one clear message each (exit code 2, no traceback).

Apples to apples: the attack targets the plain network, so the reference prediction is nnU-Net's
with test-time mirroring off (``use_mirroring=False``, ``nnUNetv2_predict --disable_tta``). The tiny
slices are exactly one patch (32 x 32), so the sliding window has one tile and its Gaussian
weighting cancels; the spacing is 1 mm and the images have no zero border, so preprocessing neither
resamples nor crops, and the preprocessed space is the raw space voxel for voxel. What remains is
nnU-Net's half-precision logit accumulation (``predicted_logits`` is float16), which can flip the
argmax of a voxel whose two top logits are within float16 rounding: hence a tolerance of 1e-3.
On real data the two legitimately differ more: nnU-Net predicts 2d slices larger than the patch
with overlapping Gaussian-weighted tiles (we feed whole slices), and resamples to the original spacing.
"""
from __future__ import annotations

import contextlib
import io
import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import EVAL_TRAINER, TINY_ID, nnunet_env_of

pytestmark = pytest.mark.slow

LARGE_EPS = 40.0  # a 32 x 32 z-scored slice has L2 norm ~32: this is a big perturbation


def attack(args: list[str]) -> tuple[int, str, str]:
    """Run the console script's main in-process; returns (exit code, stdout, stderr)."""
    from nnunet_ima_eval.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(args)
        except SystemExit as e:  # argparse's own errors
            rc = e.code
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def env(tiny_trained_2d):
    with nnunet_env_of(tiny_trained_2d) as tiny:
        yield tiny


def common(env, out) -> list[str]:
    """Options every run here shares; ``out`` is the output folder."""
    return ["-d", str(TINY_ID), "-c", "2d", "-f", "0", "-tr", EVAL_TRAINER, "-o", str(out), "--quiet",
            "--batch-size", "16"]


@pytest.fixture(scope="module")
def e2e(env, tmp_path_factory):
    out = tmp_path_factory.mktemp("attack")
    args = common(env, out) + ["-i", str(env.raw / "imagesTs"), "-l", str(env.raw / "labelsTs"),
                               "--eps", "0", str(LARGE_EPS), "--attacks", "pgd", "ifgsm", "worst", "--pgd-steps", "5",
                               "--ifgsm-steps", "3", "--save-examples", "1"]
    rc, stdout, stderr = attack(args)
    assert rc == 0, stderr
    return out, args, stdout, json.loads((out / "results.json").read_text())


def rows(results, attack_name, eps=None, cls="mean"):
    return [r for r in results["rows"] if r["attack"] == attack_name and r["class"] == cls
            and (eps is None or r["eps"] == eps)]


def test_command_runs_and_writes_everything(e2e):
    out, _, stdout, results = e2e
    for f in ("results.csv", "results.json", "robustness.png"):
        assert (out / f).is_file()
    assert "S. Dice" in stdout and "P. 40" in stdout and EVAL_TRAINER in stdout
    # one row per (model, attack, eps, class): clean + 2 noise levels x (PGD, IFGSM, worst); outer, core, mean
    assert len(results["rows"]) == 7 * 3
    assert {r["class"] for r in results["rows"]} == {"outer", "core", "mean"}
    assert all(r["n_samples"] == 16 for r in results["rows"])  # 2 test cases x 8 slices
    checks = {c["check"]: c["status"] for c in results["checks"]}
    assert checks["eps0_equals_clean[pgd]"] == "ok"
    assert checks["budget[pgd]"] == "ok" and checks["budget[ifgsm]"] == "ok"
    assert checks["large_eps_near_zero"] == "ok"
    assert checks["non_increasing[pgd]"] == "ok"
    for name in ("more_steps[pgd]", "more_steps[ifgsm]"):
        assert checks.get(name, "ok") == "ok"
    assert any(c.startswith("more_steps[") for c in checks)
    assert checks["noise_weaker"] == "ok" and checks["gradient_free_weaker"] == "ok"
    assert "W. 40" in stdout and "ADI convention: project" in stdout
    pngs = list((out / "examples" / EVAL_TRAINER).rglob("*.png"))
    niis = list((out / "examples" / EVAL_TRAINER).rglob("*_adversarial.nii.gz"))
    assert pngs and niis


def test_clean_row_equals_nnunet_prediction(e2e, env, tmp_path):
    """Per-case 3D Dice of the clean row == nnU-Net's predictor + nnU-Net's compute_metrics."""
    import torch
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    _, _, _, results = e2e
    predictor = nnUNetPredictor(use_mirroring=False, device=torch.device("cpu"), allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(
        str(env.results / env.dataset_name / f"{EVAL_TRAINER}__nnUNetPlans__2d"), (0,), "checkpoint_final.pth")
    predictor.predict_from_files_sequential(str(env.raw / "imagesTs"), str(tmp_path), False, True, None)
    ours = {p["case"]: p["dice3d"] for p in results["per_case"] if p["attack"] == "clean"}
    assert sorted(ours) == ["case_006", "case_007"]
    for case, dice in ours.items():
        m = compute_metrics(str(env.raw / "labelsTs" / f"{case}.nii.gz"), str(tmp_path / f"{case}.nii.gz"),
                            SimpleITKIO(), [1, 2])
        theirs = float(np.nanmean([m["metrics"][k]["Dice"] for k in (1, 2)]))
        assert dice == pytest.approx(theirs, abs=1e-3), case
    clean = rows(results, "clean")[0]
    assert clean["dice3d"] == pytest.approx(np.mean(list(ours.values())))
    assert clean["adi"] > 0.2 and clean["dice3d"] > 0.3


def test_pgd_at_large_eps_is_far_below_clean(e2e):
    _, _, _, results = e2e
    clean = rows(results, "clean")[0]
    at0 = rows(results, "pgd", 0.0)[0]
    big = rows(results, "pgd", LARGE_EPS)[0]
    assert at0["adi"] == clean["adi"] and at0["tvdi"] == clean["tvdi"]
    for metric in ("adi", "tvdi", "dice3d"):
        assert big[metric] < 0.25 * clean[metric], metric


def test_rerun_skips_finished_rows(e2e, monkeypatch):
    out, args, _, results = e2e
    import nnunet_ima_eval.pipeline as pipeline

    def no_load(*a, **k):
        raise AssertionError("a rerun must not load the model")

    monkeypatch.setattr(pipeline, "load_model", no_load)
    rc, stdout, stderr = attack(args)
    assert rc == 0, stderr
    assert "already in" in stdout and "recomputing" not in stdout
    again = json.loads((out / "results.json").read_text())
    assert again["rows"] == results["rows"]


def test_fold_validation_cases_default(env, tmp_path):
    """Without -i/-l the fold's validation cases (splits_final.json) from nnUNet_preprocessed are used."""
    rc, stdout, stderr = attack(common(env, tmp_path) + ["--eps", "1", "--attacks", "ifgsm", "--ifgsm-steps", "1",
                                                         "--max-samples", "4", "--no-sanity"])
    assert rc == 0, stderr
    results = json.loads((tmp_path / "results.json").read_text())
    split = json.loads((env.preprocessed / "splits_final.json").read_text())[0]["val"]
    cases = {p["case"] for p in results["per_case"]}
    assert cases and cases <= set(split)
    assert rows(results, "clean")[0]["n_samples"] == 4


# --------------------------------------------------------------------------------------- bad input
def _mismatched_labels(env, tmp_path):
    images, labels = tmp_path / "img", tmp_path / "lab"
    images.mkdir(), labels.mkdir()
    shutil.copy(env.raw / "imagesTs" / "case_006_0000.nii.gz", images)
    lab = sitk.GetImageFromArray(np.zeros((8, 32, 30), np.uint8))
    sitk.WriteImage(lab, str(labels / "case_006.nii.gz"))
    return ["-i", str(images), "-l", str(labels)]


def _label_7(env, tmp_path):
    """A label file with a value the 3-class model does not know (issue 12)."""
    images, labels = tmp_path / "img", tmp_path / "lab"
    shutil.copytree(env.raw / "imagesTs", images), shutil.copytree(env.raw / "labelsTs", labels)
    img = sitk.ReadImage(str(labels / "case_007.nii.gz"))
    a = sitk.GetArrayFromImage(img)
    a[0, 0, 0] = 7
    out = sitk.GetImageFromArray(a)
    out.CopyInformation(img)
    sitk.WriteImage(out, str(labels / "case_007.nii.gz"))
    return ["-i", str(images), "-l", str(labels)]


@pytest.mark.parametrize("change, message", [
    ({"--attacks": "foo"}, "--attacks: unknown foo"),
    ({"--norm": "l3"}, "argument --norm: invalid choice: 'l3'"),
    ({"--adi": "authors"}, "argument --adi: invalid choice: 'authors'"),
    ({"--pgd-steps": "0"}, "--pgd-steps must be >= 1"),
    ("o_is_file", "is a file"),
    ("label_7", "has label value(s) 7; the model knows 0..2"),
    ({"-d": "977"}, "unknown dataset '977'"),
    ({"-tr": "nnUNetTrainerNope"}, "unknown trainer 'nnUNetTrainerNope'"),
    ({"-f": "3"}, "unknown fold '3'"),
    ({"-chk": "checkpoint_nope.pth"}, "missing checkpoint"),
    ({"--eps": "-1"}, "--eps: expected noise levels that are finite and >= 0, got -1"),
    ("labels", "label shape (8, 32, 30) does not match image shape (8, 32, 32)"),
])
def test_bad_input_gives_one_clear_message(env, tmp_path, change, message):
    args = common(env, tmp_path / "out") + ["--eps", "1", "--attacks", "ifgsm", "--ifgsm-steps", "1", "--no-sanity"]
    if change == "labels":
        args += _mismatched_labels(env, tmp_path)
    elif change == "label_7":
        args += _label_7(env, tmp_path)
    elif change == "o_is_file":
        (tmp_path / "out").write_text("mine")
    else:
        for k, v in change.items():
            if k in args:
                args[args.index(k) + 1] = v
            else:
                args += [k, v]
    rc, stdout, stderr = attack(args)
    assert rc == 2
    assert "Traceback" not in stderr + stdout
    err = [line for line in stderr.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("nnunet-ima-attack: error: ") and message in err[0], stderr
    if change == "o_is_file":
        assert (tmp_path / "out").read_text() == "mine"
    else:
        assert not (tmp_path / "out").exists()  # checked before anything is created


# --------------------------------------------------------------------------------------- worst case
def test_worst_is_the_per_sample_minimum_of_clean_and_the_attacks(e2e):
    """The "worst" row = per sample the lowest Dice over clean, PGD and IFGSM at that eps (AutoAttack's
    reporting), recomputed here by hand from the stored per-sample counts."""
    from nnunet_ima.predicates import dice_from_counts, reduce_classes
    import torch

    out, _, _, results = e2e
    per_sample = {}
    for run in results["runs"]:
        k = run["key"]
        if (k["eps"] == LARGE_EPS and k["attack"] in ("pgd", "ifgsm")) or k["attack"] == "clean":
            z = np.load(out / run["samples"])
            d = dice_from_counts(*(torch.as_tensor(z[n]) for n in ("tp", "fp", "fn")))
            per_sample[k["attack"]] = reduce_classes(d).numpy()
    assert set(per_sample) == {"clean", "pgd", "ifgsm"}
    worst = rows(results, "worst", LARGE_EPS)[0]
    assert worst["worst_of"] == "clean,pgd,ifgsm"
    lowest = np.minimum.reduce([per_sample[a] for a in ("clean", "pgd", "ifgsm")])
    assert worst["adi"] == pytest.approx(lowest.mean())
    assert worst["adi"] <= min(rows(results, a, LARGE_EPS)[0]["adi"] for a in ("pgd", "ifgsm"))
    assert rows(results, "worst", 0.0)[0]["adi"] == pytest.approx(per_sample["clean"].mean())


# --------------------------------------------------------------------------------------- reuse (issue 12)
def _fast(env, out, images, labels) -> list[str]:
    return common(env, out) + ["-i", str(images), "-l", str(labels), "--eps", "1", "--attacks", "ifgsm",
                               "--ifgsm-steps", "1", "--no-sanity"]


def _clean_adi(out) -> float:
    return rows(json.loads((out / "results.json").read_text()), "clean")[0]["adi"]


def test_rerun_recomputes_exactly_what_changed(env, tmp_path, monkeypatch):
    """A result is reused only with the same checkpoint, labels and settings; else recomputed, saying why."""
    import torch

    images, labels, labels2 = tmp_path / "img", tmp_path / "lab", tmp_path / "lab2"
    shutil.copytree(env.raw / "imagesTs", images), shutil.copytree(env.raw / "labelsTs", labels)
    shutil.copytree(labels, labels2)
    results_root = tmp_path / "results"
    model_dir = f"{EVAL_TRAINER}__nnUNetPlans__2d"
    shutil.copytree(env.results / env.dataset_name / model_dir, results_root / env.dataset_name / model_dir)
    monkeypatch.setenv("nnUNet_results", str(results_root))
    out = tmp_path / "out"
    rc, stdout, stderr = attack(_fast(env, out, images, labels))
    assert rc == 0, stderr
    base = _clean_adi(out)
    rc, stdout, _ = attack(_fast(env, out, images, labels))          # unchanged: nothing recomputed
    assert rc == 0 and "already in" in stdout and "recomputing" not in stdout
    assert base > 0.2
    # one label file changed in place (case_006 blanked): every row of the model recomputed, numbers change
    lab = sitk.ReadImage(str(labels / "case_006.nii.gz"))
    blank = sitk.GetImageFromArray(np.zeros_like(sitk.GetArrayFromImage(lab)))
    blank.CopyInformation(lab)
    sitk.WriteImage(blank, str(labels / "case_006.nii.gz"))
    rc, stdout, _ = attack(_fast(env, out, images, labels))
    assert rc == 0 and "recomputing clean eps=0: the labels changed" in stdout
    assert "recomputing ifgsm eps=1: the labels changed" in stdout and _clean_adi(out) != pytest.approx(base)
    # -l names another folder (the original labels): recomputed again, back to the first numbers
    rc, stdout, _ = attack(_fast(env, out, images, labels2))
    assert rc == 0 and "the labels changed" in stdout and _clean_adi(out) == pytest.approx(base)
    # the checkpoint changed (stock nnU-Net checkpoint with numpy scalars, loaded and saved whole)
    ckpt_path = results_root / env.dataset_name / model_dir / "fold_0" / "checkpoint_final.pth"
    ckpt = torch.load(ckpt_path, weights_only=False)
    for k in [k for k in ckpt["network_weights"] if "seg_layers" in k]:
        ckpt["network_weights"][k] = -ckpt["network_weights"][k]
    torch.save(ckpt, ckpt_path)
    rc, stdout, _ = attack(_fast(env, out, images, labels2))
    assert rc == 0 and "recomputing clean eps=0: the checkpoint changed" in stdout
    assert _clean_adi(out) != pytest.approx(base)
    # a truncated results file: set aside with a message, everything recomputed
    text = (out / "results.json").read_text()
    (out / "results.json").write_text(text[: len(text) // 2])
    rc, stdout, stderr = attack(_fast(env, out, images, labels2))
    assert rc == 0, stderr
    assert "results.json is damaged" in stdout and "kept as results.json.damaged" in stdout
    assert (out / "results.json.damaged").read_text() == text[: len(text) // 2]
    assert len(rows(json.loads((out / "results.json").read_text()), "ifgsm")) == 1


@pytest.mark.usefixtures("one_thread")
def test_strong_suite_runs_and_keeps_what_it_finds(env, tmp_path):
    """--suite strong on the trained model (few steps): every attack runs, the PGD-type attacks keep their
    best iterate (written in each row), and worst is never above clean per sample."""
    from nnunet_ima.predicates import dice_from_counts, reduce_classes
    import torch

    out = tmp_path / "strong"
    rc, stdout, stderr = attack(common(env, out) + ["--eps", "2", "--suite", "strong", "--pgd-steps", "2",
                                                    "--segpgd-steps", "2", "--cospgd-steps", "2", "--apgd-steps", "3",
                                                    "--max-samples", "4", "--no-sanity"])
    assert rc == 0, stderr
    results = json.loads((out / "results.json").read_text())
    got = {r["attack"]: r for r in results["rows"] if r["class"] == "mean" and r["eps"] == 2.0}
    assert set(got) == {"pgd", "segpgd", "cospgd", "apgd-mce", "apgd-bmce", "apgd-js", "worst"}
    assert all(got[a]["iterate"] == "best-project" for a in got if a != "worst")
    assert got["worst"]["worst_of"] == "clean,pgd,segpgd,cospgd,apgd-mce,apgd-bmce,apgd-js"
    per_sample = {}
    for run in results["runs"]:
        z = np.load(out / run["samples"])
        d = dice_from_counts(*(torch.as_tensor(z[n]) for n in ("tp", "fp", "fn")))
        per_sample[run["key"]["attack"]] = reduce_classes(d).numpy()
    lowest = np.minimum.reduce(list(per_sample.values()))
    assert got["worst"]["adi"] == pytest.approx(lowest.mean())
    assert (lowest <= per_sample["clean"]).all()
