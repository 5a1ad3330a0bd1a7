"""The main job, reduced in size: ``nnunet-ima demo`` from nothing to a filled robustness table."""
import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nnunet_ima.demo import TRAINERS
from nnunet_ima.nnunet_data import nnunet_command

EPS = [0.0, 1.0, 8.0]


@pytest.mark.slow
def test_demo_reduced_fills_the_table(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("nnUNet_", "NNUNET_IMA_"))}
    env["nnUNet_n_proc_DA"] = "0"
    cmd = nnunet_command("nnunet-ima") + [
        "demo", "--workdir", str(tmp_path / "work"), "--resolution", "6", "--slab", "2", "--epochs-std", "2",
        "--epochs-adv", "1", "--iters", "2", "--val-iters", "1", "--k", "2", "--n", "2",
        "--eps", *map(str, EPS), "--pgd-steps", "3", "--features", "4", "8", "16", "--batch-size", "4"]
    run = subprocess.run(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         timeout=900)
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
        for attack in ("pgd", "ifgsm"):
            for eps in EPS:
                r = mean[(trainer, attack, eps)]
                for metric in ("adi", "tvdi"):
                    assert 0.0 <= float(r[metric]) <= 1.0, (trainer, attack, eps, metric, r[metric])
    # the printed table names every model, and the demo says where its outputs are
    for trainer in TRAINERS:
        assert trainer in run.stdout
    assert "demo_robustness" in run.stdout


def _results(path: Path, adi: dict) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    with open(path / "results.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["model", "attack", "eps", "class", "adi"])
        w.writeheader()
        for (model, eps), value in adi.items():
            w.writerow({"model": model, "attack": "pgd", "eps": eps, "class": "mean", "adi": value})
            w.writerow({"model": model, "attack": "pgd", "eps": eps, "class": "grey_matter", "adi": 0.0})
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
