"""The main job, reduced in size: ``nnunet-ima demo`` from nothing to a filled robustness table."""
import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nnunet_ima_demo import TRAINERS
from nnunet_ima_demo.cli import main
from nnunet_ima_demo.nnunet_data import nnunet_command

EPS = [0.0, 1.0, 8.0]


@pytest.mark.slow
def test_demo_reduced_fills_the_table(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("nnUNet_", "NNUNET_IMA_"))}
    env["nnUNet_n_proc_DA"] = "0"
    cmd = nnunet_command("nnunet-ima") + [
        "demo", "--output", str(tmp_path / "work"), "--resolution", "6", "--slab", "2", "--epochs-std", "2",
        "--epochs-adv", "1", "--iters", "2", "--val-iters", "1", "--k", "2", "--n", "2",
        "--eps", *map(str, EPS), "--pgd-steps", "3", "--ifgsm-steps", "3", "--features", "4", "8", "16",
        "--batch-size", "4", "--case-pgd-steps", "2"]
    run = subprocess.run(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         timeout=1800)  # a guard against hangs: minutes when idle, ~20 at load 20 on 2 cores
    assert run.returncode == 0, run.stdout[-6000:]
    work = tmp_path / "work"
    # nnU-Net's own folders were used, under the working folder the demo names
    assert (work / "nnUNet_raw" / "Dataset990_MNIBrain" / "dataset.json").exists()
    for trainer in TRAINERS:
        assert (work / "nnUNet_results" / "Dataset990_MNIBrain" / f"{trainer}__nnUNetPlansDemo__2d" / "fold_0" /
                "checkpoint_final.pth").exists()
    rows = list(csv.DictReader(open(work / "demo_robustness" / "results.csv")))
    mean = {(r["model"], r["attack"], float(r["eps"])): r for r in rows if r["class"] == "mean"}
    for trainer in TRAINERS:
        for attack in ("pgd", "ifgsm", "worst"):
            for eps in EPS:
                r = mean[(trainer, attack, eps)]
                for metric in ("adi", "tvdi"):
                    assert 0.0 <= float(r[metric]) <= 1.0, (trainer, attack, eps, metric, r[metric])
        for eps in EPS:  # the per-sample worst case is at or below every attack it is taken over
            worst = float(mean[(trainer, "worst", eps)]["adi"])
            assert worst <= min(float(mean[(trainer, a, eps)]["adi"]) for a in ("pgd", "ifgsm")) + 1e-9
    # the printed table names every model, and the demo says where its outputs are
    for trainer in TRAINERS:
        assert trainer in run.stdout
    assert "demo_robustness" in run.stdout
    assert "worst case eps=1" in run.stdout and "paired-bootstrap interval" in run.stdout  # per-sample Dice read
    assert "seed 0: " in run.stdout and "training state digest" in run.stdout
    # the case scope: the three models' whole test cases through nnU-Net's predictor, at the middle eps (8)
    case = list(csv.DictReader(open(work / "demo_robustness_case" / "results.csv")))
    assert {(r["model"], r["scope"], r["attack"], float(r["eps"])) for r in case if r["class"] == "mean"} == \
        {(t, "case", a, e) for t in TRAINERS for a, e in (("clean", 0.0), ("pgd", 8.0))}
    line = [ln for ln in run.stdout.splitlines() if "as deployed (whole test cases" in ln]
    assert len(line) == 1 and "PGD-2 at eps 8" in line[0] and "for the deployed predictor" in line[0], line


STD, SAT, IMA = TRAINERS
N = 10  # test slices of the crafted tables


def test_paired_bootstrap_against_a_hand_computation():
    """Differences d_i = a_i - b_i over 10 pairs; a bootstrap draw's mean is fixed by how many times each
    value is drawn, so its quantiles follow from the binomial distribution by hand."""
    from nnunet_ima_demo.verdict import UNCLEAR, paired_bootstrap

    # d = 0 on nine slices, 0.1 on one: a draw's mean is 0.1 k / 10, k ~ Bin(10, 0.1): P(k = 0) = 0.35 > 0.025,
    # P(k <= 2) = 0.930 < 0.975 <= P(k <= 3) = 0.987, so the interval is [0, 0.03]
    d = paired_bootstrap([0.5] * 9 + [0.6], [0.5] * 10)
    assert (d.mean, d.lo, d.hi, d.n) == (pytest.approx(0.01), 0.0, pytest.approx(0.03), 10)
    assert d.word == UNCLEAR and d.text() == "+1.0 points (95% CI +0.0 to +3.0)"
    # d = 0.01 on five slices, 0.03 on five: mean 0.01 + 0.002 k, k ~ Bin(10, 0.5): P(k <= 1) = 0.011 < 0.025 <=
    # P(k <= 2) = 0.055 and P(k <= 7) = 0.945 < 0.975 <= P(k <= 8) = 0.989, so the interval is [0.014, 0.026]
    d = paired_bootstrap([0.51] * 5 + [0.53] * 5, [0.5] * 10)
    assert (d.mean, d.lo, d.hi) == (pytest.approx(0.02), pytest.approx(0.014), pytest.approx(0.026))
    assert d.word == "above"
    d = paired_bootstrap([0.4, np.nan, 0.4], [0.5, 0.5, np.nan])  # pairs with a skipped sample are left out
    assert (d.n, d.mean, d.word) == (1, pytest.approx(-0.1), "below")


def _samples(ima_clean, ima_2, ima_5, sat_5=0.45):
    """Per-slice Dice (N slices) of STD, SAT, IMA as read_sample_dice returns them: STD clean 0.8, PGD 0.5."""
    cases = [f"c{i // 4}" for i in range(N)]
    flat = {(STD, "clean", 0.0): 0.8, (STD, "pgd", 2.0): 0.5, (STD, "pgd", 5.0): 0.5, (SAT, "clean", 0.0): 0.8,
            (SAT, "pgd", 2.0): 0.5, (SAT, "pgd", 5.0): sat_5}
    out = {k: (cases, np.full(N, v)) for k, v in flat.items()}
    for key, value in {(IMA, "clean", 0.0): ima_clean, (IMA, "pgd", 2.0): ima_2, (IMA, "pgd", 5.0): ima_5}.items():
        out[key] = (cases, np.broadcast_to(np.asarray(value, float), (N,)).copy())
    return out


def _verdict(monkeypatch, capsys, per_seed: dict, note=None):
    import importlib

    from nnunet_ima_eval import report

    v = importlib.import_module("nnunet_ima_demo.verdict")  # the package's `verdict` is the function

    monkeypatch.setattr(report, "read_sample_dice", lambda out: per_seed[str(out)])
    judgements = v.verdict({s: s for s in per_seed}, [0.0, 2.0, 5.0, 10.0], note=note)
    return judgements, capsys.readouterr().out


NOT_CLEAR = [0.5] * 9 + [0.6]          # IMA - STD: +1.0 [+0.0, +3.0]: includes 0
CLEAR = [0.51] * 5 + [0.53] * 5        # +2.0 [+1.4, +2.6]: above 0


def test_verdict_gives_every_difference_with_its_interval_and_says_not_distinguishable(monkeypatch, capsys):
    (j,), out = _verdict(monkeypatch, capsys, {"0": _samples(0.795, CLEAR, NOT_CLEAR, sat_5=0.5)})
    assert "95% paired-bootstrap interval over 10 test slices" in out
    assert "PGD eps=5         +1.0 [+0.0, +3.0] n.d." in out and "PGD eps=2         +2.0 [+1.4, +2.6] above" in out
    assert "clean             -0.5 [-0.5, -0.5] below" in out  # 0.5 points below STD on every slice
    assert j.holds and not j.shown  # the mean is above STD at the middle eps (5) and clean is within 1 point ...
    assert "seed 0: points the paper's way but is not distinguishable at this size (10 test slices)" in out
    assert "IMA vs SAT under PGD (reported, not judged): eps 5 +1.0 points (95% CI +0.0 to +3.0): not " \
           "distinguishable at this size" in out


@pytest.mark.parametrize("ima_clean,ima_5,shown,holds,says", [
    (0.80, CLEAR, True, True, "shows the paper's effect: IMA is above STD under PGD at eps 5 (interval above 0)"),
    (0.789, CLEAR, False, False, "does NOT show the paper's effect: IMA's clean ADI is 1.1 points below STD's"),
    (0.85, [0.49] * 10, False, False, "IMA is not above STD under PGD at eps 5 (-1.0 points"),
])
def test_verdict_judges_with_the_one_point_tolerance(monkeypatch, capsys, ima_clean, ima_5, shown, holds, says):
    from nnunet_ima_demo.verdict import CLEAN_TOLERANCE, middle_eps

    assert CLEAN_TOLERANCE == 0.01 and middle_eps([0, 2, 5, 10]) == [5] and middle_eps([0, 1, 8]) == [8]
    (j,), out = _verdict(monkeypatch, capsys, {"0": _samples(ima_clean, [0.4] * 10, ima_5)})
    assert (j.shown, j.holds) == (shown, holds) and says in out


def test_repeats_count_the_seeds_in_which_the_effect_held(monkeypatch, capsys):
    per_seed = {"3": _samples(0.80, CLEAR, CLEAR), "4": _samples(0.78, CLEAR, CLEAR, sat_5=0.6),
                "5": _samples(0.80, CLEAR, NOT_CLEAR)}
    judgements, out = _verdict(monkeypatch, capsys, per_seed, note="the study's note")
    assert [j.holds for j in judgements] == [True, False, True]
    assert "over 3 seeds of SAT and IMA from one STD (3, 4, 5)" in out
    assert "clean             -0.7 (-2.0 to +0.0), 0/3" in out  # mean (min to max), seeds above 0
    assert "the paper's effect held in 2 of 3 seeds" in out and "the interval above 0 in 1 of 3" in out
    assert "IMA above SAT under PGD in 2 of 3" in out and out.rstrip().endswith("the study's note")


BAD_ARGS = [  # (arguments, the flag and value the one line must name)
    (["--case-pgd-steps", "-1"], "--case-pgd-steps: got -1"),
    (["--k", "0"], "--k: got 0"),
    (["--n", "-3"], "--n: got -3"),
    (["--ifgsm-steps", "0"], "--ifgsm-steps: got 0"),
    (["--epochs-adv", "0"], "--epochs-adv: got 0"),
    (["--eps", "-1"], "--eps: expected noise levels that are finite and >= 0, got -1"),
    (["--eps", "0"], "--eps: got 0"),
    (["--eps", "2", "nan"], "--eps: expected noise levels that are finite and >= 0, got nan"),
    (["--delta", "50", "--eps-max", "10"], "--delta: got 50"),
    (["--eps-max", "0"], "--eps-max: got 0"),
    (["--sat-eps", "-5"], "--sat-eps: got -5"),
    (["--resolution", "0.5"], "--resolution: got 0.5"),
    (["--resolution", "20"], "--resolution: got 20"),
    (["--features", "8"], "--features: got 8"),
    (["--dataset-id", "1000"], "--dataset-id: got 1000"),
    (["--device", "cuda"], "--device: got cuda"),
    (["--device", "gpu"], "--device: got gpu; expected cpu, cuda or cuda:N"),
    (["--device", "cuda:1"], "--device: got cuda:1"),
    (["--k", "five"], "--k: invalid int value: 'five'"),
]


@pytest.mark.parametrize("bad,named", BAD_ARGS, ids=[" ".join(b) for b, _ in BAD_ARGS])
def test_bad_demo_arguments_fail_in_one_line_before_anything_is_built(tmp_path, capsys, monkeypatch, bad, named):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same answer on a GPU machine
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.delenv(var, raising=False)
    work = tmp_path / "work"
    try:
        rc = main(["demo", "--output", str(work), *bad])
    except SystemExit as e:  # argparse's own type/choice errors
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("nnunet-ima demo: error: ") and named in err, err
    assert not work.exists()  # nothing created, let alone built or trained


def test_demo_refuses_paths_it_cannot_use(tmp_path, capsys, monkeypatch):
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        monkeypatch.delenv(var, raising=False)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert main(["demo", "--output", str(blocker)]) == 2
    assert f"argument --output: got {blocker}; expected a folder, not a file" in capsys.readouterr().err
    monkeypatch.setenv("nnUNet_results", str(blocker))
    assert main(["demo", "--output", str(tmp_path / "w")]) == 2
    assert "environment variable nnUNet_results: got" in capsys.readouterr().err
    monkeypatch.delenv("nnUNet_results")
    other = tmp_path / "w" / "nnUNet_raw" / "Dataset990_SomethingElse"
    other.mkdir(parents=True)  # nnU-Net would later refuse two datasets with id 990
    assert main(["demo", "--output", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err
    assert "argument --dataset-id: got 990" in err and "Dataset990_SomethingElse" in err
    assert not (tmp_path / "w" / "nnUNet_preprocessed").exists()


def test_console_script_bad_argument_is_one_line_without_traceback(tmp_path):
    """The installed ``nnunet-ima`` (not only main()): exit code 2, one stderr line, no traceback."""
    run = subprocess.run(nnunet_command("nnunet-ima") + ["demo", "--output", str(tmp_path / "w"), "--k", "0"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=120)
    assert run.returncode == 2
    assert run.stderr == "nnunet-ima demo: error: argument --k: got 0; expected an integer >= 1\n"
    assert not (tmp_path / "w").exists()


def test_env_command_prints_the_trainers_export_line(capsys, monkeypatch):
    from nnunet_ima_trainers.cli import EXT_DIR

    monkeypatch.delenv("nnUNet_extTrainer", raising=False)
    assert main(["env"]) == 0
    assert capsys.readouterr().out.strip() == f"export nnUNet_extTrainer={EXT_DIR}"
