"""The main job, reduced in size: ``nnunet-ima demo`` from nothing to a filled robustness table."""
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nnunet_ima.demo import TRAINERS
from nnunet_ima.demo.cli import main
from nnunet_ima.demo.nnunet_data import nnunet_command

EPS = [0.0, 1.0, 8.0]


@pytest.mark.slow
def test_demo_reduced_fills_the_table(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("nnUNet_", "NNUNET_IMA_"))}
    env["nnUNet_n_proc_DA"] = "0"
    cmd = nnunet_command("nnunet-ima") + [
        "demo", "--workdir", str(tmp_path / "work"), "--resolution", "6", "--slab", "2", "--epochs-std", "2",
        "--epochs-adv", "1", "--iters", "2", "--val-iters", "1", "--k", "2", "--n", "2",
        "--eps", *map(str, EPS), "--pgd-steps", "3", "--ifgsm-steps", "3", "--features", "4", "8", "16",
        "--batch-size", "4"]
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
    assert "worst case eps=1: ADI STD" in run.stdout  # the verdict reads the worst-case rows too


def _results(path: Path, adi: dict, attack: str = "pgd", worst: dict | None = None) -> Path:
    """A results.csv as nnunet-ima-attack writes it (only the columns the verdict needs)."""
    path.mkdir(parents=True, exist_ok=True)
    rows = [(model, attack, eps, value) for (model, eps), value in adi.items()]
    rows += [(model, "worst", eps, value) for (model, eps), value in (worst or {}).items()]
    with open(path / "results.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["model", "attack", "eps", "class", "adi"])
        w.writeheader()
        for model, att, eps, value in rows:
            w.writerow({"model": model, "attack": att, "eps": eps, "class": "mean", "adi": value})
            w.writerow({"model": model, "attack": att, "eps": eps, "class": "grey_matter", "adi": 0.0})
    return path


@pytest.mark.parametrize("ima_mid,ima_clean,shows", [
    ((0.64, 0.55), 0.69, True),     # above STD at eps 2 and 5, clean within 0.05
    ((0.60, 0.55), 0.69, False),    # below STD at eps 2
    ((0.64, 0.55), 0.62, False),    # robust, but clean Dice 0.08 below STD
    ((0.64, 0.55), 0.80, True),     # clean Dice above STD's counts as close (the paper sees this too)
])
def test_verdict_judges_the_table_honestly(tmp_path, capsys, ima_mid, ima_clean, shows):
    from nnunet_ima.demo import verdict

    std, ima = TRAINERS[0], TRAINERS[2]
    sat = TRAINERS[1]
    adi = {(sat, 0.0): 0.60, (sat, 2.0): 0.63, (sat, 5.0): 0.50, (sat, 10.0): 0.40,
           (std, 0.0): 0.70, (std, 2.0): 0.62, (std, 5.0): 0.52, (std, 10.0): 0.37,
           (ima, 0.0): ima_clean, (ima, 2.0): ima_mid[0], (ima, 5.0): ima_mid[1], (ima, 10.0): 0.10}
    verdict(_results(tmp_path, adi), [0.0, 2.0, 5.0, 10.0])
    out = capsys.readouterr().out
    assert "PGD eps=2: ADI STD 0.620 vs IMA" in out and "PGD eps=5:" in out and "eps=10:" not in out
    assert ("shows the paper's effect" in out) == shows
    assert ("does NOT show the paper's effect" in out) == (not shows)
    assert f"(SAT 0.630)" in out and "IMA vs SAT under PGD at eps 2: " in out


def test_verdict_reads_clean_rows_and_reports_the_worst_case(tmp_path, capsys):
    """The clean ADI comes from the "clean" rows when the table has them (not only PGD at eps 0),
    and the per-sample worst case over all attacks is printed and said in words, not judged."""
    from nnunet_ima.demo import verdict

    std, sat, ima = TRAINERS
    adi = {(m, e): v for m, vals in ((std, (0.62, 0.52, 0.37)), (sat, (0.63, 0.50, 0.40)), (ima, (0.64, 0.55, 0.1)))
           for e, v in zip((2.0, 5.0, 10.0), vals)}
    out = _results(tmp_path, adi, worst={(std, 2.0): 0.60, (ima, 2.0): 0.58, (std, 5.0): 0.50, (ima, 5.0): 0.53})
    with open(out / "results.csv", "a", newline="") as fh:  # clean rows: IMA 0.08 below STD
        csv.writer(fh).writerows([[std, "clean", 0.0, "mean", 0.70], [ima, "clean", 0.0, "mean", 0.62]])
    verdict(out, [0.0, 2.0, 5.0, 10.0])
    out_text = capsys.readouterr().out
    assert "does NOT show the paper's effect" in out_text  # clean ADI too far below STD's
    assert "worst case eps=2: ADI STD 0.600 vs IMA 0.580" in out_text
    assert "worst case per sample over all attacks: IMA vs STD at eps 2: not above, 5: above" in out_text


BAD_ARGS = [  # (arguments, the flag and value the one line must name)
    (["--k", "0"], "--k: got 0"),
    (["--n", "-3"], "--n: got -3"),
    (["--ifgsm-steps", "0"], "--ifgsm-steps: got 0"),
    (["--epochs-adv", "0"], "--epochs-adv: got 0"),
    (["--eps", "-1"], "--eps: got -1"),
    (["--eps", "0"], "--eps: got 0"),
    (["--eps", "2", "nan"], "--eps: got 2 nan"),
    (["--delta", "50", "--eps-max", "10"], "--delta: got 50"),
    (["--eps-max", "0"], "--eps-max: got 0"),
    (["--sat-eps", "-5"], "--sat-eps: got -5"),
    (["--resolution", "0.5"], "--resolution: got 0.5"),
    (["--resolution", "20"], "--resolution: got 20"),
    (["--features", "8"], "--features: got 8"),
    (["--dataset-id", "1000"], "--dataset-id: got 1000"),
    (["--device", "cuda"], "--device: got cuda"),
    (["--device", "gpu"], "--device: invalid choice: 'gpu'"),
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
        rc = main(["demo", "--workdir", str(work), *bad])
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
    assert main(["demo", "--workdir", str(blocker)]) == 2
    assert f"argument --workdir: got {blocker}; expected a folder, not a file" in capsys.readouterr().err
    monkeypatch.setenv("nnUNet_results", str(blocker))
    assert main(["demo", "--workdir", str(tmp_path / "w")]) == 2
    assert "environment variable nnUNet_results: got" in capsys.readouterr().err
    monkeypatch.delenv("nnUNet_results")
    other = tmp_path / "w" / "nnUNet_raw" / "Dataset990_SomethingElse"
    other.mkdir(parents=True)  # nnU-Net would later refuse two datasets with id 990
    assert main(["demo", "--workdir", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err
    assert "argument --dataset-id: got 990" in err and "Dataset990_SomethingElse" in err
    assert not (tmp_path / "w" / "nnUNet_preprocessed").exists()


def test_console_script_bad_argument_is_one_line_without_traceback(tmp_path):
    """The installed ``nnunet-ima`` (not only main()): exit code 2, one stderr line, no traceback."""
    run = subprocess.run(nnunet_command("nnunet-ima") + ["demo", "--workdir", str(tmp_path / "w"), "--k", "0"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=120)
    assert run.returncode == 2
    assert run.stderr == "nnunet-ima demo: error: argument --k: got 0; expected an integer >= 1\n"
    assert not (tmp_path / "w").exists()


def test_env_command_prints_the_trainers_export_line(capsys, monkeypatch):
    from nnunet_ima_trainers.cli import EXT_DIR

    monkeypatch.delenv("nnUNet_extTrainer", raising=False)
    assert main(["env"]) == 0
    assert capsys.readouterr().out.strip() == f"export nnUNet_extTrainer={EXT_DIR}"
