"""Evaluation over several processes (issue 23): shards, the share-out, failures, and real jobs.

* Shards are reused only for the same run (settings), the same inputs (checkpoint, data, code) and
  the same samples; the share-out is longest-first and complete.
* Two ranks (threads of this process, one shared store) give the numbers of one; a rank that fails
  stops the other and leaves only finished units, and one process computes exactly the rest.
* Real jobs on the session's tiny nnU-Net model: ``torchrun --nproc_per_node 2 -m nnunet_ima_eval``
  gives per-sample Dice, table, worst case and sanity checks identical to one process; a rank killed in
  the middle (``IMA_EVAL_FAIL_AFTER``) stops the job launched by :func:`distributed.launch` (what
  ``--num-gpus`` runs) with one line naming it, nothing is merged, and one process computes exactly
  the missing units; shards of other settings or another checkpoint are not reused.
* ``--num-gpus 2`` without two GPUs: one line before anything starts.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import EVAL_TRAINER, TINY_ID, nnunet_env_of
from nnunet_ima_eval import distributed, units
from nnunet_ima_eval.data import Case
from nnunet_ima_eval.distributed import LocalStore, World
from nnunet_ima_eval.metrics import Counts
from nnunet_ima_eval.runner import AttackSettings, Evaluation, Evaluator
from nnunet_ima_eval.shards import ShardStore
from test_eval_runner import TinyNet, stub_model

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------- shards
def _evaluation(n: int, seed: int = 0) -> Evaluation:
    rng = np.random.default_rng(seed)
    c = Counts(rng.integers(0, 50, (n, 2)), rng.integers(0, 9, (n, 2)), rng.integers(0, 9, (n, 2)), ["c1"] * n)
    return Evaluation("pgd", 2.0, c, 1.25, distance=rng.random(n), on_pad=np.zeros(n))


def test_a_shard_is_reused_only_for_the_same_run_inputs_and_samples(tmp_path):
    key = {"model": "STD", "attack": "pgd", "eps": 2.0, "steps": 10, "seed": 0, "max_samples": None}
    inputs = {"checkpoint": "sha-a", "images": "i", "labels": "l", "code": "4"}
    starts = [(0, 0, 0), (1, 0, 0), (2, 0, 0)]
    shards, ev = ShardStore(tmp_path), _evaluation(3)
    assert not (tmp_path / "shards").exists()
    path = shards.write(key, inputs, "c1", starts, ev, {"rank": 1, "world_size": 2, "job": "j1"})
    got = shards.read(key, inputs, "c1", starts)
    np.testing.assert_array_equal(got.counts.tp, ev.counts.tp)
    np.testing.assert_array_equal(got.distance, ev.distance)
    assert got.counts.cases == ["c1"] * 3 and got.meta["rank"] == 1 and got.meta["seconds"] == 1.25
    # other settings, another checkpoint, other data or code, other samples: not this unit
    assert shards.read({**key, "steps": 20}, inputs, "c1", starts) is None
    assert shards.read({**key, "seed": 1}, inputs, "c1", starts) is None
    assert shards.read(key, {**inputs, "checkpoint": "sha-b"}, "c1", starts) is None
    assert shards.read(key, {**inputs, "code": "5"}, "c1", starts) is None
    assert shards.read(key, inputs, "c1", starts[:2]) is None
    assert shards.folder({**key, "steps": 20}, inputs) != shards.folder(key, inputs) != \
        shards.folder(key, {**inputs, "checkpoint": "sha-b"})
    # a file copied under another run's name is read back for what it is, not for where it lies
    other = shards.path(key, {**inputs, "checkpoint": "sha-b"}, "c1")
    other.parent.mkdir(parents=True)
    shutil.copy(path, other)
    assert shards.read(key, {**inputs, "checkpoint": "sha-b"}, "c1", starts) is None
    # merge: only when every unit is there
    got, missing = shards.merge(key, inputs, {"c1": starts, "c2": [(0, 0, 0)]})
    assert missing == ["c2"] and len(got) == 1
    path.write_bytes(path.read_bytes()[:40])  # damaged (a half-written file never has the final name)
    assert shards.read(key, inputs, "c1", starts) is None and shards.finished(key, inputs, {"c1": starts}) == []
    shards.clear(key, inputs)
    assert not shards.folder(key, inputs).exists()


def test_the_share_out_is_longest_first_onto_the_least_loaded_rank_and_complete():
    tasks = [units.Task(0, i, (u,), w) for i, (u, w) in enumerate(zip("abcdefg", [5, 1, 4, 4, 2, 3, 1]))]
    shares = units.assign(tasks, 3)
    # by hand: a(5)->0, c(4)->1, d(4)->2, f(3)->1 (4 < 5), e(2)->2 (4 < 5... 4 + 2 = 6), b(1)->0, g(1)->0
    assert [[t.units[0] for t in s] for s in shares] == [["a", "b", "g"], ["c", "f"], ["d", "e"]]
    assert sorted(t.units[0] for s in shares for t in s) == list("abcdefg")
    assert [sum(t.weight for t in s) for s in shares] == [7, 7, 6]
    assert units.assign(tasks, 1) == [tasks] and units.assign([], 2) == [[], []]


# ---------------------------------------------------------------------------------------------- ranks in threads
def _cases() -> list[Case]:
    """Batch 1 packs (PACK_BATCHES = 4 samples): [case_0 case_1] (3 + 2 slices), [case_2] (4)."""
    rng = np.random.default_rng(7)
    out = []
    for i, z in enumerate((3, 2, 4)):
        lab = np.zeros((z, 24, 24), np.int16)
        lab[:, 5:18, 6:20] = 1
        lab[:, 9:13, 10:15] = 2
        out.append(Case(f"case_{i}", (lab * 1.5 + rng.normal(scale=0.5, size=lab.shape)).astype(np.float32)[None], lab))
    return out


RUNS = [{"model": "tiny", "attack": "clean", "eps": 0.0}, {"model": "tiny", "attack": "pgd", "eps": 3.0},
        {"model": "tiny", "attack": "apgd-js", "eps": 3.0}]
INPUTS = {"checkpoint": "x", "images": "y", "labels": "y", "code": "4"}
SETTINGS = AttackSettings(batch_size=1, pgd_steps=2, apgd_steps=2, seed=3)


def _evaluator(cases, packs=None):
    return Evaluator(stub_model(TinyNet()), cases, SETTINGS, progress=False, packs=packs)


def _rank0(world, out):
    ev = _evaluator(_cases())
    order = units.plan_work(world, ev, "tiny", RUNS, INPUTS, ShardStore(out))
    units.lead(world, units.SampleWork(ev), order, ShardStore(out), progress=False)
    return order, units.merge_runs(order, ShardStore(out), SETTINGS.convention)


def _follower(world, out):
    def load(order):
        cases = [c for c in _cases() if c.name in order.cases_of(world.rank)]
        return units.SampleWork(_evaluator(cases, units.share_packs(cases, 2, (32, 32), order, world.rank)))

    units.follow(world, "tiny", load, ShardStore(out))


def _job(out, size: int) -> list:
    """Ranks 0..size-1 as threads sharing one store, each through :func:`distributed.run_as_rank` (the
    one failure line); returns what each returns: rank 0 (order, merged runs), the others None, or an
    exit code."""
    store = LocalStore()
    worlds = [World(r, size, r, size, store) for r in range(size)]
    with ThreadPoolExecutor(size) as pool:
        body = (lambda w: (_rank0 if w.is_main else _follower)(w, out))
        futures = [pool.submit(distributed.run_as_rank, "prog", out, body, w) for w in worlds]
        try:
            return [f.result(timeout=600) for f in futures]
        except TimeoutError:  # never hang the suite: the failure flag stops every waiting rank
            store.add(distributed.PREFIX + "failures", 1)
            raise


def test_two_ranks_give_the_numbers_of_one_and_a_failed_rank_leaves_only_finished_units(tmp_path, monkeypatch,
                                                                                         capsys):
    order1, one = _job(tmp_path / "one", 1)[0]
    (order2, two), rest = _job(tmp_path / "two", 2)
    assert rest is None and capsys.readouterr().err == ""
    assert order1.packs == order2.packs == [["case_0", "case_1"], ["case_2"]]
    assert len(order1.tasks) == len(order2.tasks) == 3 * 2 and order2.todo == 3 * 3
    assert order2.share(0) and order2.share(1)
    for (k1, e1, r1), (k2, e2, r2) in zip(one, two):
        assert k1 == k2 and e1.counts.cases == e2.counts.cases
        for a in ("tp", "fp", "fn"):
            np.testing.assert_array_equal(getattr(e1.counts, a), getattr(e2.counts, a))
        np.testing.assert_array_equal(e1.distance, e2.distance)
        assert {v["rank"] for v in r1.values()} == {0}
    assert {v["rank"] for _, _, r in two for v in r.values()} == {0, 1}
    # rank 1 fails as it starts a task after its first finished unit(s): rank 0 stops; only finished units
    # are on disk
    monkeypatch.setenv(units.FAIL_AFTER_VAR, "1:1")
    assert _job(tmp_path / "failed", 2) == [distributed.STOPPED, distributed.FAILED]
    first, second = order2.share(1)[:2]  # the same plan: the same shares
    (line,) = capsys.readouterr().err.splitlines()
    unit = units.describe_task("tiny", RUNS[second.run], second)
    assert line.startswith(f"prog: error: rank 1 of 2: unit {unit}: RuntimeError: injected failure after "
                           f"{len(first.units)} units")
    assert (tmp_path / "failed" / "errors" / "rank1.txt").is_file() and f"traceback in" in line
    shards = ShardStore(tmp_path / "failed")
    done = {(i, u) for i, k in enumerate(RUNS) for u in shards.finished(k, INPUTS, order2.units)}
    assert {(first.run, u) for u in first.units} <= done and 1 <= len(done) < 9
    assert not {(second.run, u) for u in second.units} & done
    # one process computes exactly the rest, and ends with the numbers of the uninterrupted job
    monkeypatch.delenv(units.FAIL_AFTER_VAR)
    order3, three = _job(tmp_path / "failed", 1)[0]
    assert order3.finished == len(done) and {(t.run, u) for t in order3.tasks for u in t.units} == \
        {(i, u) for i in range(3) for u in order3.units} - done
    for (_, e1, _), (_, e3, r3) in zip(one, three):
        np.testing.assert_array_equal(e1.counts.tp, e3.counts.tp)
        np.testing.assert_array_equal(e1.counts.fn, e3.counts.fn)


def test_the_launcher_stops_every_rank_when_one_dies_and_names_a_rank_killed_by_a_signal(monkeypatch, capsys):
    """What --num-gpus runs: a rank that dies of SIGKILL (out of memory) cannot say so itself; the launcher
    does, in one line, and stops the ranks still running."""
    monkeypatch.setattr(distributed, "REAP_GRACE_S", 0.3)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    killed = subprocess.Popen([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"])
    assert distributed.supervise("prog", [sleeper, killed]) == distributed.FAILED
    assert sleeper.poll() is not None  # stopped, not left running
    assert capsys.readouterr().err.splitlines() == [
        "prog: error: rank 1 of 2 was killed by SIGKILL (out of memory?); finished units are kept, a rerun computes "
        "the rest"]
    ok = [subprocess.Popen([sys.executable, "-c", "pass"]) for _ in range(2)]
    assert distributed.supervise("prog", ok) == 0 and capsys.readouterr().err == ""


# ---------------------------------------------------------------------------------------------- --num-gpus
def _main(argv) -> tuple[int, str, str]:
    from nnunet_ima_eval.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(list(argv))
        except SystemExit as e:
            rc = e.code
    return rc, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("gpus", [0, 1])
def test_num_gpus_without_the_gpus_is_one_line_before_anything_starts(gpus, tmp_path, monkeypatch):
    if gpus:  # a machine with one GPU (simulated): the same line, naming what it has
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    elif torch.cuda.device_count() >= 2:
        pytest.skip("this machine has two GPUs")
    launched = []
    monkeypatch.setattr(distributed, "launch", lambda *a, **k: launched.append(a) or 0)
    out = tmp_path / "out"
    # dataset 12345 does not exist: a later check would name it, not the GPUs
    rc, stdout, stderr = _main(["-d", "12345", "--eps", "1", "-o", str(out), "--num-gpus", "2"])
    assert rc == 2 and stdout == "" and not launched and not out.exists()
    assert stderr.splitlines() == [f"nnunet-ima-attack: error: --num-gpus 2: expected at most the {gpus} GPU(s) "
                                   "PyTorch sees here (for several CPU processes: torchrun --standalone "
                                   "--nproc_per_node 2 -m nnunet_ima_eval ... --device cpu)"]
    rc, _, stderr = _main(["-d", "12345", "--eps", "1", "-o", str(out), "--num-gpus", "2", "--device", "cpu"])
    assert rc == 2 and len(stderr.splitlines()) == 1 and "not --device cpu" in stderr and not out.exists()


# ---------------------------------------------------------------------------------------------- real jobs
LAUNCH = "import sys; from nnunet_ima_eval import distributed; " \
         "sys.exit(distributed.launch('nnunet-ima-attack', sys.argv[1:], 2))"


def _args(env, out, *extra) -> list[str]:
    return ["-d", str(TINY_ID), "-c", "2d", "-f", "0", "-tr", EVAL_TRAINER, "-i", str(env.raw / "imagesTs"),
            "-l", str(env.raw / "labelsTs"), "--eps", "0", "40", "--attacks", "pgd", "ifgsm", "worst",
            "--pgd-steps", "3", "--ifgsm-steps", "2", "--batch-size", "2", "--device", "cpu", "--quiet",
            "--save-examples", "1", "-o", str(out), *extra]


def _spawn(env, command: list[str], **extra_env) -> subprocess.CompletedProcess:
    return subprocess.run(command, env={**os.environ, **env.env, **extra_env}, capture_output=True, text=True,
                          timeout=900)


@pytest.fixture(scope="module")
def env(tiny_trained_2d):
    with nnunet_env_of(tiny_trained_2d) as tiny:
        yield tiny


@pytest.fixture(scope="module")
def one_process(env, tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("one")
    rc, stdout, stderr = _main(_args(env, out))
    assert rc == 0, stderr
    return out


def _sample_dice(out):
    from nnunet_ima_eval.report import read_sample_dice

    return read_sample_dice(out)


def _same_results(a: Path, b: Path, checks: bool = True) -> None:
    ra, rb = (json.loads((p / "results.json").read_text()) for p in (a, b))
    plain = (lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows])
    assert plain(ra["rows"]) == plain(rb["rows"]) and ra["per_case"] == rb["per_case"]
    if checks:
        assert ra["checks"] == rb["checks"]
    da, db = _sample_dice(a), _sample_dice(b)
    assert sorted(da) == sorted(db) and len(da) == 7  # clean, pgd and ifgsm and worst at eps 0 and 40
    for name in da:
        assert da[name][0] == db[name][0], name
        np.testing.assert_array_equal(da[name][1], db[name][1])


@pytest.mark.slow
def test_two_processes_give_the_numbers_of_one(env, one_process, tmp_path):
    from nnunet_ima_eval.report import read_table, table

    out = tmp_path / "two"
    run = _spawn(env, [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                       "-m", "nnunet_ima_eval", *_args(env, out)])
    assert run.returncode == 0, run.stderr[-3000:]
    _same_results(one_process, out)  # per-sample Dice of every (model, attack, eps), worst included; checks
    for metric in ("adi", "tvdi", "dice3d"):
        assert table(read_table(out), metric) == table(read_table(one_process), metric)
    assert f"{EVAL_TRAINER}: 10 of 10 units to compute on 2 processes" in run.stdout
    records = [u for r in json.loads((out / "results.json").read_text())["runs"] for u in r["units"].values()]
    assert {u["rank"] for u in records} == {0, 1} and {u["world_size"] for u in records} == {2}
    assert not (out / "shards").exists()  # merged runs leave no shards behind
    _same_examples(one_process, out)


def _same_examples(a: Path, b: Path) -> None:
    """--save-examples: the same files, the same adversarial images and predictions (saved by the rank
    that computed the unit, with the clean prediction beside)."""
    import SimpleITK as sitk

    files = sorted(p.relative_to(a).as_posix() for p in (a / "examples").rglob("*.nii.gz"))
    assert files == sorted(p.relative_to(b).as_posix() for p in (b / "examples").rglob("*.nii.gz"))
    assert any(f.endswith("_pred_clean.nii.gz") for f in files) and any("pgd_eps40" in f for f in files)
    for f in files:
        np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(a / f))),
                                      sitk.GetArrayFromImage(sitk.ReadImage(str(b / f))), err_msg=f)


def _shard_records(out: Path) -> dict:
    """{(attack, eps, unit): meta} of every finished unit on disk."""
    got = {}
    for f in (out / "shards").rglob("*.npz"):
        with np.load(f, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
        got[(meta["key"]["attack"], meta["key"]["eps"], meta["unit"])] = meta
    return got


@pytest.mark.slow
@pytest.mark.slow
def test_the_case_scope_shared_over_two_processes_gives_the_numbers_of_one(env, tmp_path):
    """``--scope case`` under torchrun: the whole cases of each run are shared out (one unit per case) and
    the per-case results, rows and case-scope checks are those of one process (each case's random start
    has its own seed)."""
    args = ["-d", str(TINY_ID), "-c", "2d", "-f", "0", "-tr", EVAL_TRAINER, "-i", str(env.raw / "imagesTs"),
            "-l", str(env.raw / "labelsTs"), "--eps", "40", "--attacks", "pgd", "--pgd-steps", "2", "--scope",
            "case", "--device", "cpu", "--quiet"]
    rc, stdout, stderr = _main([*args, "-o", str(tmp_path / "one")])
    assert rc == 0, stderr
    assert f"{EVAL_TRAINER} (case scope): 4 of 4 units to compute in this process" in stdout  # 2 cases x 2 runs
    run = _spawn(env, [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                       "-m", "nnunet_ima_eval", *args, "-o", str(tmp_path / "two")])
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"{EVAL_TRAINER} (case scope): 4 of 4 units to compute on 2 processes" in run.stdout
    # a case-only run names nnU-Net's per-case rule, not the sample scope's ADI convention
    assert "Case scope: whole cases" in run.stdout and "ADI convention:" not in run.stdout
    one, two = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
    plain = (lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows])
    assert {r["scope"] for r in two["rows"]} == {"case"} and plain(one["rows"]) == plain(two["rows"])
    assert one["per_case"] == two["per_case"] and one["checks"] == two["checks"]
    ranks = {rec["rank"] for r in two["runs"] for rec in r["units"].values()}
    assert ranks == {0, 1}  # both processes computed cases
    assert not (tmp_path / "two" / "shards").exists()


def test_a_killed_rank_stops_the_job_with_one_line_and_one_process_computes_only_the_rest(
        env, one_process, tmp_path, monkeypatch):
    out = tmp_path / "killed"
    run = _spawn(env, [sys.executable, "-c", LAUNCH, *_args(env, out, "--no-sanity")],
                 **{units.FAIL_AFTER_VAR: "1:1"})
    lines = [ln for ln in run.stderr.strip().splitlines() if ": warning: " not in ln]  # eps 40 is large here
    assert run.returncode == 1 and len(lines) == 1, run.stderr[-3000:]
    m = re.match(rf"nnunet-ima-attack: error: rank 1 of 2: unit {EVAL_TRAINER} (\S+) eps=(\S+) case (\S+): "
                 rf"RuntimeError: injected failure after 1 units", lines[0])
    assert m, lines[0]
    assert not (out / "results.json").exists()  # nothing merged: no run has all its units
    finished = _shard_records(out)
    assert (m.group(1), float(m.group(2)), m.group(3)) not in finished and 1 <= len(finished) < 10
    assert len({meta["job"] for meta in finished.values()}) == 1
    before = out.parent / "before"
    shutil.copytree(out, before)
    # one process: exactly the missing units, and the results of the uninterrupted job
    rc, stdout, stderr = _main(_args(env, out, "--no-sanity"))
    assert rc == 0, stderr
    n = len(finished)
    assert f"{n} of 10 units finished by an earlier job (kept), {10 - n} of 10 units to compute in this process" \
        in stdout
    _same_results(one_process, out, checks=False)
    (job,) = {meta["job"] for meta in finished.values()}
    runs = json.loads((out / "results.json").read_text())["runs"]
    kept = {(r["key"]["attack"], r["key"]["eps"], u) for r in runs for u, rec in r["units"].items()
            if rec["job"] == job}
    assert kept == set(finished)
    assert all(rec["world_size"] == 1 for r in runs for u, rec in r["units"].items() if rec["job"] != job)
    assert not (out / "shards").exists() and not (out / "errors").exists()
    _other_settings_or_checkpoint_reuse_nothing_of_theirs(env, before, finished, tmp_path, monkeypatch)


def _other_settings_or_checkpoint_reuse_nothing_of_theirs(env, out, finished, tmp_path, monkeypatch):
    """The killed job's shards, seen by a job with more PGD steps (its clean and IFGSM units are the same
    runs, its PGD units are not) and by a job with another checkpoint of the same name (nothing is the
    same). Each job stops as it starts its first unit: the plan is what is checked."""
    monkeypatch.setenv(units.FAIL_AFTER_VAR, "0:0")
    same = sum(1 for attack, _, _ in finished if attack != "pgd")
    rc, stdout, stderr = _main(_args(env, out, "--no-sanity", "--pgd-steps", "4"))
    assert rc == 1 and "injected failure after 0 units" in stderr
    assert (f"{same} of 10 units finished by an earlier job (kept), {10 - same} of 10 units to compute" if same
            else "10 of 10 units to compute") in stdout
    results = tmp_path / "results"
    shutil.copytree(env.results, results)
    ckpt = next(results.rglob(f"{EVAL_TRAINER}__*/fold_0/checkpoint_final.pth"))
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    first = next(iter(state["network_weights"]))
    state["network_weights"][first] = state["network_weights"][first] + 1e-3
    torch.save(state, ckpt)
    monkeypatch.setenv("nnUNet_results", str(results))
    rc, stdout, stderr = _main(_args(env, out, "--no-sanity"))
    assert rc == 1 and "injected failure after 0 units" in stderr
    assert f"{EVAL_TRAINER}: 10 of 10 units to compute in this process" in stdout
    assert len(_shard_records(out)) == len(finished)  # nothing of theirs was touched
