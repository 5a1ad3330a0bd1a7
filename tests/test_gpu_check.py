"""benchmarks/gpu_check.py (issue 25): its CPU path runs the real commands and reports real
measurements (times that were measured, counts that add up), and ``--device cuda`` without a GPU is
one line. The whole check (``--device cpu --quick``) takes minutes here; the slow test runs its parts
on the session's tiny planned dataset."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def gpu_check(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=900,
                          env=env)


def load_module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_cuda_without_a_gpu_is_one_line(tmp_path):
    out = tmp_path / "report"
    run = gpu_check("--device", "cuda", "--out", str(out), env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check.py: error: --device cuda:"), run.stderr
    assert "no CUDA GPU" in lines[0] and not out.exists() and not run.stdout


def test_count_checks_catch_counts_that_do_not_add_up():
    gc = load_module()
    epoch = {"ima": {"attacked": 3, "samples": 4, "crossed": 1, "fell_back": 1},
             "margins": {"n": 3, "mean": 0.5, "updates": 3}}
    assert all(c["ok"] for c in gc.count_checks(epoch, batch=2, iters=2, attack_samples="all"))
    for wrong in ({"crossed": 4}, {"samples": 6}, {"fell_back": 0}):
        bad = {**epoch, "ima": {**epoch["ima"], **wrong}}
        assert not all(c["ok"] for c in gc.count_checks(bad, batch=2, iters=2, attack_samples="all")), wrong
    assert not all(c["ok"] for c in gc.count_checks({**epoch, "margins": {"n": 3, "mean": 0.5, "updates": 4}},
                                                    batch=2, iters=2, attack_samples="all"))


@pytest.mark.slow
def test_quick_cpu_parts_report_real_measurements(nnunet_tiny, tmp_path):
    """nnUNetv2_train (IMA), bench_trainers.py and nnunet-ima-attack, run by the check on CPU."""
    out = tmp_path / "report"
    run = gpu_check("--device", "cpu", "--quick", "--out", str(out), "--workdir", str(tmp_path / "work"),
                    "--preprocessed", str(nnunet_tiny.preprocessed), "-tr", "nnUNetTrainerIMA",
                    "--parts", "train", "bench", "attack", "train_compile")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    parts = json.loads((out / "gpu_check.json").read_text())["parts"]
    assert list(parts) == ["setup", "train", "bench", "attack", "train_compile"]
    setup = parts["setup"]
    batch = setup["dataset"]["batch"]
    assert setup["status"] == "measured" and setup["imports_s"] > 0 and setup["dataset"]["reused"]

    ima = parts["train"]["runs"]["nnUNetTrainerIMA"]
    assert parts["train"]["status"] == "measured" and ima["status"] == "ok" and ima["seconds"] > 0
    assert ima["epochs_done"] == 1 and ima["epoch_s"][0] > 0 and ima["train_loss"][0] == ima["train_loss"][0]
    counts = ima["counts"][-1]["ima"]
    assert counts["samples"] == 2 * batch  # --quick: 2 iterations of the plan's batch
    assert counts["attacked"] + counts["fell_back"] == counts["samples"]  # --quick attacks every sample
    assert 0 <= counts["crossed"] <= counts["attacked"]
    margins = ima["margins"]
    assert 0 < margins["n"] <= counts["samples"] and margins["finite"]
    assert 0 <= margins["min"] <= margins["max"] <= margins["eps_max"]
    assert ima["checks"] and all(c["ok"] for c in ima["checks"])

    bench = parts["bench"]
    assert bench["status"] == "measured" and bench["k"] == 2 and bench["batch"] == batch
    assert all(v > 0 for v in bench["s_per_iter"].values()) and bench["over_nnunet"]["nnUNetTrainer"] == 1
    assert bench["ima_over_floor"] > 0 and set(bench["k_sweep"]) == {"1", "2"}

    attack = parts["attack"]
    for mode in ("batched", "one_at_a_time"):
        row = attack[mode]["models"]["nnUNetTrainerIMA"]
        assert row["n_samples"] == 8 and row["seconds"] > 0 and 0 <= row["adi"] <= 1
        assert row["slices_per_s"] == pytest.approx(row["n_samples"] / row["seconds"])
    assert attack["batched"]["batch_size"] == 8 and attack["one_at_a_time"]["batch_size"] == 1
    assert attack["speedup"]["nnUNetTrainerIMA"] > 0

    assert parts["train_compile"]["status"] == "skipped" and "CPU" in parts["train_compile"]["reason"]
    md = (out / "gpu_check.md").read_text()
    assert "| train | measured |" in md and "| train_compile | skipped |" in md and "none of these figures" in md
