"""Training loop of nnunet_ima.classify: IMA beats STD on Moons, exact resume, 2-process gloo run
with agreeing margins, and the command line end to end (small sizes)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from nnunet_ima.classify import EvalConfig, TrainConfig, evaluate, load_dataset, train
from nnunet_ima.classify.cli import main
from nnunet_ima.classify.methods import MethodConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


@pytest.fixture(scope="module")
def moons():
    return load_dataset("moons", seed=0).limit(2000, 500)


def moons_cfg(method, out, **kw):
    mc = MethodConfig(eps=0.3, norm="linf", delta=0.03)
    base = dict(method=method, model="moons_mlp", epochs=10, batch_size=128, seed=0, out=str(out), progress=False,
                method_cfg=mc)
    base.update(kw)
    return TrainConfig(**base)


def test_ima_more_robust_than_std_on_moons(moons, tmp_path):
    """Fixed seeds, 2000 training points, 10 epochs (Delta = eps_max / epochs as the earlier paper's rule)."""
    ecfg = EvalConfig(eps=(0.2,), norm="linf", attacks=("pgd",), progress=False)
    acc = {}
    for m in ("std", "ima"):
        model = train(moons_cfg(m, tmp_path / m), moons).model
        acc[m] = evaluate(model, moons.test, 2, ecfg)
    gain = acc["ima"]["pgd"][0.2] - acc["std"]["pgd"][0.2]
    clean_drop = acc["std"]["clean"] - acc["ima"]["clean"]
    assert gain >= 0.05, acc  # at least 5 points more PGD accuracy at the mid noise level
    assert clean_drop <= 0.03, acc  # clean accuracy within 3 points


def test_resume_gives_identical_weights_and_margins(moons, tmp_path):
    small = moons.limit(384, 100)
    full = train(moons_cfg("ima", tmp_path / "full", epochs=3, batch_size=64), small)
    first = train(moons_cfg("ima", tmp_path / "cut", epochs=3, batch_size=64, stop_after_epoch=1), small)
    assert len(first.history) == 1
    resumed = train(moons_cfg("ima", tmp_path / "cut", epochs=3, batch_size=64, resume=True), small)
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
    for (k, a), (_, b) in zip(full.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), k
    assert full.method.store.keys() == resumed.method.store.keys()
    assert torch.equal(full.method.store.margins, resumed.method.store.margins)
    assert not any(p.name.startswith(".") for p in (tmp_path / "cut").iterdir())  # no temporary files left
    assert not any(".tmp" in p.name for p in (tmp_path / "cut").iterdir())
    log = (tmp_path / "cut" / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in log] == [1, 2, 3]  # the log matches the checkpoint's history


def test_resume_is_not_a_fresh_start(moons, tmp_path):
    small = moons.limit(256, 100)
    a = train(moons_cfg("ima", tmp_path / "a", epochs=2, batch_size=64, stop_after_epoch=1), small)
    ck = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    assert ck["epoch"] == 0 and "margins" in ck["method"] and {"torch", "numpy", "python"} <= set(ck["rng"])
    assert torch.equal(ck["method"]["margins"]["margins"], a.method.store.margins)


def test_init_from_pretrained_checkpoint(moons, tmp_path):
    small = moons.limit(256, 50)
    std = train(moons_cfg("std", tmp_path / "std", epochs=1), small)
    ima = train(moons_cfg("ima", tmp_path / "ima", epochs=0, init_from=str(std.checkpoint)), small)
    for (k, a), (_, b) in zip(std.model.state_dict().items(), ima.model.state_dict().items()):
        assert torch.equal(a, b), k


def test_two_gloo_processes_agree_on_margins(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "nnunet_ima.classify", "train", "--dataset", "moons", "--method", "ima", "--limit-train", "400",
           "--limit-test", "50", "--epochs", "2", "--batch-size", "50", "--delta", "0.05", "--device", "cpu",
           "-o", str(tmp_path), "--quiet"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    m0 = torch.load(tmp_path / "margins_rank0.pt", weights_only=True)
    m1 = torch.load(tmp_path / "margins_rank1.pt", weights_only=True)
    by_key = [dict(zip(m["keys"], m["margins"].tolist())) for m in (m0, m1)]
    assert len(by_key[0]) == 400  # every sample, seen on one rank or the other
    assert by_key[0] == by_key[1]  # identical margin for every sample id on both ranks
    assert max(by_key[0].values()) > 0.05  # margins moved (expanded) during training
    ck = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["method"]["margins"]
    assert dict(zip(ck["keys"], ck["margins"].tolist())) == by_key[0]


def test_cli_run_and_eval(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["run", "--quick", "--limit-train", "300", "--limit-test", "60", "--epochs", "2", "--methods",
               "std", "ima", "sat:0.1", "--eps", "0.1", "0.2", "--pgd-steps", "10", "--init-from", "std", "-o", str(out),
               "--quiet"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "S. Acc." in text and "P. 0.2" in text and "SAT0.1" in text and str(out.resolve()) in text
    for f in ("table.txt", "results.csv", "results.json", "accuracy_vs_eps.png", "margins_ima.png",
              "decision_boundaries.png", "std/checkpoint.pt", "sat0.1/checkpoint.pt"):
        assert (out / f).is_file(), f
    rc = main(["eval", str(out / "ima" / "checkpoint.pt"), "--limit-test", "60", "--eps", "0.1", "--attacks",
               "pgd", "ifgsm", "--pgd-steps", "5", "--quiet"])
    assert rc == 0 and "IF. 0.1" in capsys.readouterr().out


def test_cli_missing_dataset_message(tmp_path, capsys):
    rc = main(["train", "--dataset", "svhn", "--data-root", str(tmp_path), "--quiet"])
    assert rc == 2 and "train_32x32.mat" in capsys.readouterr().err


def test_autoattack_two_and_ten_classes():
    """torchattacks AutoAttack: apgd-ce + square for 2 classes, version='standard' for 10 (inputs in [0, 1])."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 1, 6, 6, generator=g)  # L2 Square needs images of at least 5x5 pixels
    torch.manual_seed(0)
    for classes in (2, 10):
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(36, classes)).eval()
        from nnunet_ima.classify.datasets import IndexedDataset

        y = model(x).argmax(1).detach()
        cfg = EvalConfig(eps=(0.5,), norm="l2", attacks=("pgd", "aa"), clip=(0.0, 1.0), aa_queries=20,
                         pgd_steps=10, progress=False)
        r = evaluate(model, IndexedDataset(x, y), classes, cfg)
        assert r["clean"] == 1.0 and 0.0 <= r["aa"][0.5] <= 1.0 and r["pgd"][0.5] <= 1.0
    r = evaluate(model, IndexedDataset(x, y), 10, replace(cfg, clip=None))
    assert "aa" not in r and "AutoAttack skipped" in r["notes"][0]


def test_rng_state_roundtrip_through_weights_only_file(tmp_path):
    import random

    import numpy as np

    from nnunet_ima.classify.train import rng_state, set_rng_state
    from nnunet_ima.plumbing import atomic_torch_save

    atomic_torch_save({"rng": rng_state()}, tmp_path / "r.pt")
    first = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(torch.load(tmp_path / "r.pt", weights_only=True)["rng"])
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], again[0]) and np.array_equal(first[1], again[1]) and first[2] == again[2]
