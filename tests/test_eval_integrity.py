"""Results of ``nnunet-ima-attack`` that cannot mislead (issue 24), on the model the session trains
(``tiny_trained_2d``) with a few quick attacks each:

* sanity checks are stored results: computed on a rerun when missing, printed from the store every time;
* a row is named by what tells models apart (one trainer under two plans keeps two rows);
* an output folder that cannot be written is refused before any work;
* bad image / label / results files: one line naming the file, nothing written;
* ``--save-examples`` is honoured when the results are reused; Ctrl-C leaves readable results;
* files outside ``-o`` are never renamed or removed; eps is checked against float32 and the inputs;
* the strength checks of a model that segments nothing say they are vacuous.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import EVAL_TRAINER, nnunet_env_of
from test_eval_e2e import attack, common

pytestmark = pytest.mark.slow

FAST = ["--eps", "1", "--attacks", "ifgsm", "--ifgsm-steps", "1", "--max-samples", "4"]
MODEL_DIR = f"{EVAL_TRAINER}__nnUNetPlans__2d"


@pytest.fixture(scope="module")
def env(tiny_trained_2d):
    with nnunet_env_of(tiny_trained_2d) as tiny:
        yield tiny


def results(out) -> dict:
    return json.loads((out / "results.json").read_text())


def as_text(rows) -> str:
    """Rows compared as text (NaN == NaN), without the timing column."""
    return json.dumps([{k: v for k, v in r.items() if k != "seconds"} for r in rows], sort_keys=True, default=str)


def report_rows(out):
    from nnunet_ima_eval.report import read_table

    return read_table(out)


def no_load(monkeypatch):
    import nnunet_ima_eval.pipeline as pipeline

    def refuse(*a, **k):
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr(pipeline, "load_model", refuse)


def one_error_line(rc, stdout, stderr, *words):
    assert rc == 2, stdout + stderr
    assert "Traceback" not in stdout + stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("nnunet-ima-attack: error: "), stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


def copy_model(env, tmp_path, monkeypatch, plans=("nnUNetPlans",)) -> dict:
    """The trained model copied into this test's own nnUNet_results (once per plans name given)."""
    root = tmp_path / "results"
    folders = {}
    for p in plans:
        dst = root / env.dataset_name / f"{EVAL_TRAINER}__{p}__2d"
        shutil.copytree(env.results / env.dataset_name / MODEL_DIR, dst)
        folders[p] = dst
    monkeypatch.setenv("nnUNet_results", str(root))
    return folders


def rewrite_heads(folder, bias) -> None:
    """Segmentation heads that ignore the input: weights 0, ``bias`` (one value per class)."""
    path = folder / "fold_0" / "checkpoint_final.pth"
    ck = torch.load(path, weights_only=False)
    for k, v in ck["network_weights"].items():
        if "seg_layers" in k:
            ck["network_weights"][k] = torch.zeros_like(v) if k.endswith("weight") else torch.tensor(bias, dtype=v.dtype)
    torch.save(ck, path)


# ------------------------------------------------------------------------------------- defect 2
def test_sanity_checks_are_stored_results_computed_when_missing(env, tmp_path, monkeypatch):
    import nnunet_ima_eval.sanity as sanity

    out = tmp_path / "out"
    args = common(env, out) + FAST
    rc, _, stderr = attack(args + ["--no-sanity"])
    assert rc == 0, stderr
    rows = report_rows(out)
    rc, stdout, stderr = attack(args)  # the checks were never run: computed now, the results reused
    assert rc == 0, stderr
    assert "recomputing" not in stdout
    for name in ("eps0_equals_clean[ifgsm]", "large_eps_near_zero", "more_steps[ifgsm]", "noise_weaker",
                 "gradient_free_weaker", "budget[ifgsm]", "non_increasing[ifgsm]"):
        assert f"{EVAL_TRAINER}: {name}:" in stdout, name
    assert as_text(report_rows(out)) == as_text(rows)  # no result recomputed or lost
    printed = [line for line in stdout.splitlines() if line.startswith("[")]
    stored = results(out)["checks"]
    assert len(printed) == len(stored) >= 7
    # every later run prints them from the store, without loading the model
    with monkeypatch.context() as m:
        no_load(m)
        rc, stdout, stderr = attack(args)
    assert rc == 0 and "already in" in stdout, stderr
    assert [line for line in stdout.splitlines() if line.startswith("[")] == printed
    # interrupted while the checks run: the next run computes them (the results are kept and reused)
    out2 = tmp_path / "out2"
    with monkeypatch.context() as m:
        m.setattr(sanity.Evaluator, "subset", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
        rc, _, stderr = attack(common(env, out2) + FAST)
    assert rc == 130, stderr
    rc, stdout, stderr = attack(common(env, out2) + FAST)
    assert rc == 0 and "recomputing" not in stdout, stderr
    assert f"{EVAL_TRAINER}: noise_weaker:" in stdout and f"{EVAL_TRAINER}: more_steps[ifgsm]:" in stdout


# ------------------------------------------------------------------------------------- defect 3
def test_one_trainer_under_two_plans_keeps_two_named_rows(env, tmp_path, monkeypatch):
    from nnunet_ima_eval.report import read_sample_dice

    folders = copy_model(env, tmp_path, monkeypatch, plans=("nnUNetPlans", "PlansB"))
    rewrite_heads(folders["PlansB"], [0.0, 0.0, 10.0])  # another model: its figures differ
    out = tmp_path / "out"
    args = common(env, out) + FAST + ["--no-sanity"]
    rc, first, stderr = attack(args)
    assert rc == 0, stderr
    clean_a = [r for r in report_rows(out) if r["attack"] == "clean" and r["class"] == "mean"][0]["adi"]
    rc, second, stderr = attack(args + ["-p", "PlansB"])
    assert rc == 0, stderr
    a, b = f"{EVAL_TRAINER} (plans nnUNetPlans)", f"{EVAL_TRAINER} (plans PlansB)"
    mean = {(r["model"], r["attack"]): r for r in report_rows(out) if r["class"] == "mean"}
    assert {m for m, _ in mean} == {a, b}  # both models, each under its own name (CSV and JSON)
    assert mean[(a, "clean")]["adi"] == clean_a and mean[(b, "clean")]["adi"] != clean_a
    assert mean[(a, "clean")]["plans"] == "nnUNetPlans" and mean[(b, "clean")]["plans"] == "PlansB"
    assert all(r["trainer"] == EVAL_TRAINER for r in mean.values())
    assert b in second  # the table names the model
    dice = read_sample_dice(out)
    assert {(m, at) for m, at, _ in dice} == set(mean)
    # back to the first plans: reused, and neither model's rows swap or disappear
    rc, third, stderr = attack(args)
    assert rc == 0 and "already in" in third, stderr
    again = {(r["model"], r["attack"]): r for r in report_rows(out) if r["class"] == "mean"}
    assert set(again) == set(mean) and as_text(again[k] for k in sorted(mean)) == as_text(mean[k] for k in sorted(mean))
    assert a in third


# ------------------------------------------------------------------------------------- defect 4
def test_output_folder_that_cannot_be_written_is_refused_before_any_work(env, tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("mine")
    no_load(monkeypatch)
    rc, stdout, stderr = attack(common(env, blocker / "out") + FAST)
    one_error_line(rc, stdout, stderr, "-o", str(blocker / "out"), "cannot write")
    assert blocker.read_text() == "mine"


# ------------------------------------------------------------------------------------- defects 5, 10
def _raw_copy(env, tmp_path):
    images, labels = tmp_path / "img", tmp_path / "lab"
    shutil.copytree(env.raw / "imagesTs", images), shutil.copytree(env.raw / "labelsTs", labels)
    return images, labels


def _relabel(path, transform):
    img = sitk.ReadImage(str(path))
    new = transform(img)
    sitk.WriteImage(new, str(path), useCompression=True)


def _with_geometry(spacing=None, origin=None):
    def transform(img):
        out = sitk.Image(img)
        if spacing:
            out.SetSpacing(spacing)
        if origin:
            out.SetOrigin(origin)
        return out
    return transform


def _fractional(img):
    a = sitk.GetArrayFromImage(img).astype(np.float32)
    a[a == 2] = 1.5
    out = sitk.GetImageFromArray(a)
    out.CopyInformation(img)
    return out


def _two_channels(img):
    a = sitk.GetArrayFromImage(img)
    out = sitk.GetImageFromArray(np.stack([a, a], -1), isVector=True)
    out.CopyInformation(img)
    return out


BAD_FILES = {
    "corrupt image": ("img", "case_006_0000.nii.gz", lambda p: p.write_bytes(b"no image here " * 50),
                      "cannot be read"),
    "truncated gzip": ("img", "case_006_0000.nii.gz", lambda p: p.write_bytes(p.read_bytes()[:300]),
                       "truncated"),
    "two channels": ("img", "case_006_0000.nii.gz", lambda p: _relabel(p, _two_channels), "2 channels"),
    "label spacing": ("lab", "case_007.nii.gz", lambda p: _relabel(p, _with_geometry(spacing=(1.0, 1.0, 2.0))),
                      "spacing"),
    "label origin": ("lab", "case_007.nii.gz", lambda p: _relabel(p, _with_geometry(origin=(0.0, 5.0, 0.0))),
                     "origin"),
    "fractional label": ("lab", "case_007.nii.gz", lambda p: _relabel(p, _fractional), "non-integer"),
}


@pytest.mark.parametrize("what", list(BAD_FILES))
def test_bad_image_or_label_file_is_one_line_naming_it(env, tmp_path, what):
    folder, name, spoil, words = BAD_FILES[what]
    images, labels = _raw_copy(env, tmp_path)
    spoil((images if folder == "img" else labels) / name)
    out = tmp_path / "out"
    rc, stdout, stderr = attack(common(env, out) + FAST + ["-i", str(images), "-l", str(labels), "--no-sanity"])
    one_error_line(rc, stdout, stderr, name, words)
    assert not out.exists()


WRONG_STRUCTURE = {
    "runs not a list": {"version": 2, "runs": {"a": 1}},
    "run without a key": {"version": 2, "runs": [{"key": 5, "inputs": {}, "samples": 3}]},
    "rows not a list": {"version": 2, "runs": [], "rows": "abc"},
    "row without fields": {"version": 2, "runs": [], "rows": [{"model": 1}], "per_case": [], "checks": []},
}


@pytest.mark.parametrize("what", list(WRONG_STRUCTURE))
def test_results_file_with_the_wrong_structure_is_named_and_kept(env, tmp_path, what):
    from nnunet_ima_eval.report import read_sample_dice, read_table

    out = tmp_path / "out"
    out.mkdir()
    text = json.dumps(WRONG_STRUCTURE[what])
    (out / "results.json").write_text(text)
    assert read_table(out) == [] and read_sample_dice(out) == {}  # the readers other tools use: no crash
    rc, stdout, stderr = attack(common(env, out) + FAST + ["--no-sanity"])
    assert rc == 0 and "Traceback" not in stderr, stderr
    said = [line for line in stdout.splitlines() if "results.json" in line and ("ignored" in line or "damaged" in line)]
    assert len(said) == 1, stdout
    kept = list(out.glob("results.json.damaged*"))
    assert (kept and kept[0].read_text() == text) or "ignored" in said[0]  # set aside, or the bad entries named
    assert {r["attack"] for r in read_table(out)} == {"clean", "ifgsm"}


# ------------------------------------------------------------------------------------- defect 6
def test_save_examples_is_honoured_when_results_are_reused(env, tmp_path):
    out = tmp_path / "out"
    args = common(env, out) + FAST + ["--no-sanity"]
    rc, _, stderr = attack(args)
    assert rc == 0, stderr
    rows = report_rows(out)
    rc, stdout, stderr = attack(args + ["--save-examples", "1"])
    assert rc == 0, stderr
    assert "recomputing ifgsm eps=1: --save-examples 1" in stdout
    assert list((out / "examples").rglob("*.png")) and list((out / "examples").rglob("*_adversarial.nii.gz"))
    assert as_text(report_rows(out)) == as_text(rows)  # the same figures
    rc, stdout, stderr = attack(args + ["--save-examples", "1"])
    assert rc == 0 and "already in" in stdout, stderr


# ------------------------------------------------------------------------------------- defect 7
def test_interrupted_run_leaves_its_finished_results_readable(env, tmp_path, monkeypatch):
    from nnunet_ima_eval import runner

    out = tmp_path / "out"
    args = common(env, out) + ["--eps", "1", "2", "--attacks", "ifgsm", "--ifgsm-steps", "1", "--max-samples", "4",
                               "--no-sanity"]
    real = runner.Evaluator.run

    def stop_at_eps_2(self, attack_name, eps, **kw):
        if eps == 2.0:
            raise KeyboardInterrupt
        return real(self, attack_name, eps, **kw)

    with monkeypatch.context() as m:
        m.setattr(runner.Evaluator, "run", stop_at_eps_2)
        rc, stdout, stderr = attack(args)
    assert rc == 130
    assert "2 finished results" in stderr and str(out) in stderr, stderr
    done = {(r["attack"], r["eps"]) for r in report_rows(out) if r["class"] == "mean"}
    assert done == {("clean", 0.0), ("ifgsm", 1.0)}
    rc, stdout, stderr = attack(args)
    assert rc == 0, stderr
    assert "recomputing" not in stdout and "1 of 3 results to compute" in stdout
    assert {(r["attack"], r["eps"]) for r in report_rows(out) if r["class"] == "mean"} == done | {("ifgsm", 2.0)}


# ------------------------------------------------------------------------------------- defect 8
@pytest.mark.parametrize("where", ["../victim.npz", "ABSOLUTE"])
def test_results_file_never_moves_files_outside_the_output_folder(env, tmp_path, where):
    out = tmp_path / "out"
    args = common(env, out) + FAST + ["--no-sanity"]
    rc, _, stderr = attack(args)
    assert rc == 0, stderr
    victim = tmp_path / "victim.npz"
    victim.write_bytes(b"someone else's file")
    data = results(out)
    data["runs"][0]["samples"] = str(victim) if where == "ABSOLUTE" else where
    (out / "results.json").write_text(json.dumps(data))
    rc, stdout, stderr = attack(args)
    assert rc == 0, stderr
    assert victim.read_bytes() == b"someone else's file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "victim.npz"]
    assert "outside" in stdout and "ignored" in stdout
    assert {r["attack"] for r in report_rows(out)} == {"clean", "ifgsm"}


# ------------------------------------------------------------------------------------- defect 9
def test_eps_that_float32_cannot_hold_is_refused_before_any_work(env, tmp_path, monkeypatch):
    no_load(monkeypatch)
    out = tmp_path / "out"
    rc, stdout, stderr = attack(common(env, out) + ["--eps", "1", "1e30", "--attacks", "ifgsm"])
    one_error_line(rc, stdout, stderr, "--eps: 1e30", "float32")  # refused by the parser (eps_value)
    assert not out.exists()


def test_linf_eps_of_l2_size_is_warned_and_every_row_names_its_norm(env, tmp_path):
    out = tmp_path / "out"
    linf = ["--eps", "2", "--attacks", "ifgsm", "--ifgsm-steps", "1", "--max-samples", "4", "--norm", "linf"]
    rc, stdout, stderr = attack(common(env, out) + linf + ["--no-sanity"])
    assert rc == 0, stderr
    warning = [line for line in stderr.splitlines() if line.startswith("nnunet-ima-attack: warning: --eps 2")]
    assert warning and "Linf" in warning[0] and "2 per voxel" in warning[0] and "standard deviation" in warning[0]
    rows = report_rows(out)
    assert rows and {r["norm"] for r in rows} == {"linf"}
    assert "ADI (%), class mean, Linf norm" in stdout
    rc, stdout, stderr = attack(common(env, tmp_path / "l2") + FAST + ["--no-sanity"])
    assert rc == 0 and "nnunet-ima-attack: warning" not in stderr, stderr  # the papers' L2 budget: nothing to say
    assert "ADI (%), class mean, L2 norm" in stdout


# ------------------------------------------------------------------------------------- defect 10
def test_strength_checks_of_a_model_that_segments_nothing_say_they_are_vacuous(env, tmp_path, monkeypatch):
    folders = copy_model(env, tmp_path, monkeypatch)
    rewrite_heads(folders["nnUNetPlans"], [0.0, 0.0, 10.0])  # "core" everywhere: clean ADI near 0
    out = tmp_path / "out"
    rc, stdout, stderr = attack(common(env, out) + FAST)
    assert rc == 0, stderr
    checks = {c["check"]: c for c in results(out)["checks"]}
    for name in ("large_eps_near_zero", "more_steps[ifgsm]", "noise_weaker", "gradient_free_weaker"):
        assert checks[name]["status"] == "vacuous", checks[name]
        assert "vacuous" in checks[name]["message"] and "clean ADI" in checks[name]["message"]
    assert checks["eps0_equals_clean[ifgsm]"]["status"] == "ok"  # the mechanics are still checked
    assert "[VACUOUS]" in stdout


def test_truncated_gzip_is_not_read_as_a_short_case(tmp_path):
    """The reader itself: a gzip stream cut short is refused (SimpleITK alone reads part of it)."""
    from nnunet_ima_eval.errors import EvalError
    from nnunet_ima_eval.images import check_file

    img = sitk.GetImageFromArray(np.random.default_rng(0).normal(size=(8, 32, 32)).astype(np.float32))
    path = tmp_path / "x_0000.nii.gz"
    sitk.WriteImage(img, str(path), useCompression=True)
    check_file(path)
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(EvalError, match="x_0000.nii.gz.*truncated"):
        check_file(path)


def test_a_trainer_folder_without_a_checkpoint_is_not_listed_as_a_trained_model(env, tmp_path, monkeypatch):
    """What a refused training run may leave (an empty fold folder) is not a trained model."""
    copy_model(env, tmp_path, monkeypatch)
    (tmp_path / "results" / env.dataset_name / "nnUNetTrainerHalf__nnUNetPlans__2d" / "fold_0").mkdir(parents=True)
    rc, stdout, stderr = attack(common(env, tmp_path / "out") + FAST + ["-tr", "nnUNetTrainerNope"])
    line = one_error_line(rc, stdout, stderr, "unknown trainer 'nnUNetTrainerNope'", MODEL_DIR)
    assert "nnUNetTrainerHalf" not in line
