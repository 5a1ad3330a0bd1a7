"""One prepared GPU check (issue 25): the project's whole CUDA path measured by one command in about
8 minutes, every part under its own time limit, one JSON and one markdown report under ``--out``
rewritten after every step (a part that runs out of time is stopped; what finished stays reported).

    bash benchmarks/gpu_setup.sh fetch                  # here, once (PyPI): the missing wheels -> .whl/
    bash benchmarks/gpu_setup.sh check --out "$OUT"     # on the bare GPU machine: install, then this script
    .venv/bin/python benchmarks/gpu_check.py --device cpu --quick --out /tmp/gpu_check   # here, end to end

Parts, in this order (limit: the most a part may take; reserve: what is kept for it while earlier
parts run; ``--budget`` bounds the whole run):

  setup          versions, the GPU, the install time (from gpu_setup.sh), a generated 2d dataset
                 planned and preprocessed by the real ``nnUNetv2_plan_and_preprocess``
  train          the real ``nnUNetv2_train ... -device cuda`` (``nnUNet_extTrainer`` set as
                 ``eval "$(nnunet-ima-env)"`` does), compile off: nnUNetTrainerSTD, then SAT and IMA
                 from its weights (``NNUNET_IMA_INIT_WEIGHTS``, the papers' and the demo's path), both
                 at once. Per run: completes, losses finite, the epoch logs' attacked / crossed /
                 fell-back counts and whether they add up, the margins in the checkpoint
  bench          ``bench_trainers.py`` at a real-size 2d plan: K=20, N=10, and the demo's K=5 (same
                 batches and weights): s/iter, IMA / floor, IMA / nnUNetTrainer, peak memory
  attack         ``nnunet-ima-attack`` on the trained models: slices/s batched vs one slice at a time,
                 peak memory (``torch.cuda.max_memory_allocated``)
  train_compile  as train with ``nnUNet_compile=true`` (nnU-Net's default on CUDA)
  bench_compile  as bench with ``--compile on``
  case_scope     ``nnunet-ima-attack --scope case`` (issue 22) on the last trained model: time and peak
                 memory; then ``bench_case_attack.py`` on the dataset's 2d plan: peak memory above the
                 case's arrays and s/step against the bare window cost, cases of 1x, 2x, 4x

``--device cpu --quick`` runs every part that exists on a CPU, with tiny sizes (nnU-Net never
compiles on the CPU, so the compile parts say so and skip). ``--device cuda`` on a machine without
a GPU stops with one line (exit code 2).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH_TRAINERS = REPO / "benchmarks" / "bench_trainers.py"
BENCH_CASE = REPO / "benchmarks" / "bench_case_attack.py"
DATASET_ID, DATASET_NAME = 997, "GpuCheck"
LABELS = {"background": 0, "outer": 1, "core": 2}
TRAINERS = ("nnUNetTrainerSTD", "nnUNetTrainerSAT", "nnUNetTrainerIMA")
ADVERSARIAL = ("nnUNetTrainerSAT", "nnUNetTrainerIMA")
PACKAGES = ("torch", "numpy", "nnunetv2", "dynamic_network_architectures", "batchgenerators", "batchgeneratorsv2",
            "acvl_utils", "blosc2", "SimpleITK", "nibabel", "connected-components-3d", "nnunet-ima")
NO_COMPILE_ON_CPU = "nnU-Net never compiles on the CPU (nnUNetTrainer._do_i_compile), so there is nothing to compare"


@dataclass(frozen=True)
class Sizes:
    """What each part runs. FULL is meant for one GPU within ~8 minutes; QUICK for a CPU smoke run."""

    cases: int
    shape: tuple                 # generated case shape (z, y, x) of the training dataset
    std_schedule: tuple          # nnUNetTrainerSTD: epochs, iterations per epoch
    adv_schedule: tuple          # SAT / IMA: epochs, iterations per epoch
    val_iters: int
    k: int                       # SAT / IMA PGD steps and IMA's binary-search steps in training (demo: 5, 5)
    n: int
    attack_samples: str          # IMA's attack_samples in training ("all" makes every sample count in QUICK)
    bench: tuple                 # bench_trainers.py arguments (besides device, compile, root, json)
    bench_on_training_data: bool  # QUICK: bench the training dataset's plan instead of generating one
    attack_steps: int            # PGD steps of nnunet-ima-attack
    attack_batch: int
    attack_max_samples: int | None
    attack_sanity: bool          # nnunet-ima-attack's sanity checks in the batched run (eps 0 = clean on CUDA...)
    budget: float                # default --budget, seconds
    limits: dict = field(default_factory=dict)  # part -> (limit s, reserve s)


FULL = Sizes(cases=8, shape=(16, 64, 64), std_schedule=(4, 25), adv_schedule=(3, 10), val_iters=2, k=5, n=5,
             attack_samples="correct",
             bench=("--k", "20", "--n", "10", "--k-sweep", "5", "20", "--rounds", "1", "--iters", "3",
                    "--shape", "48", "256", "256", "--cases", "12"),
             bench_on_training_data=False, attack_steps=20, attack_batch=32, attack_max_samples=None,
             attack_sanity=True, budget=480,
             limits={"setup": (90, 60), "train": (120, 60), "bench": (100, 60), "attack": (75, 45),
                     "train_compile": (150, 0), "bench_compile": (150, 0), "case_scope": (90, 0)})
QUICK = Sizes(cases=6, shape=(8, 32, 32), std_schedule=(1, 3), adv_schedule=(1, 2), val_iters=1, k=2, n=2,
              attack_samples="all",
              bench=("--k", "2", "--n", "2", "--k-sweep", "1", "2", "--rounds", "1", "--iters", "1"),
              bench_on_training_data=True, attack_steps=2, attack_batch=8, attack_max_samples=8, attack_sanity=False,
              budget=1500,  # generous: a CPU smoke run on a shared 2-core machine; a GPU needs a fraction of it
              limits={"setup": (300, 0), "train": (400, 0), "bench": (200, 0), "attack": (200, 0),
                      "train_compile": (400, 0), "bench_compile": (200, 0), "case_scope": (200, 0)})


# ------------------------------------------------------------------------------------------ report
class Report:
    """gpu_check.json + gpu_check.md + gpu_check.log under ``out``, rewritten after every update."""

    def __init__(self, out: Path, meta: dict):
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        self.data = {"meta": meta, "parts": {}}
        self.log_path = out / "gpu_check.log"
        self.log_path.write_text("")

    def say(self, message: str) -> None:
        line = f"[gpu_check {datetime.now():%H:%M:%S}] {message}"
        print(line, flush=True)
        with open(self.log_path, "a") as f:
            f.write(line + "\n")

    def append_log(self, title: str, text: str) -> None:
        with open(self.log_path, "a") as f:
            f.write(f"----- {title} -----\n{text}\n")

    def part(self, name: str) -> dict:
        return self.data["parts"].setdefault(name, {})

    def save(self) -> None:
        self.data["meta"]["elapsed_s"] = round(time.monotonic() - self.data["meta"]["_t0"], 1)
        plain = {k: v for k, v in self.data["meta"].items() if not k.startswith("_")}
        text = json.dumps({**self.data, "meta": plain}, indent=1, default=str)
        _atomic_text(self.out / "gpu_check.json", text)
        _atomic_text(self.out / "gpu_check.md", markdown(self.data))


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------ processes
@dataclass
class Job:
    """One command of a part; ``after``: jobs that must have succeeded before it starts."""

    name: str
    cmd: list
    env: dict
    log: Path
    after: tuple = ()
    proc: subprocess.Popen | None = None
    t0: float = 0.0
    result: dict = field(default_factory=dict)


_LIVE: list[Job] = []  # jobs running now: stopped when this process is told to end (SIGTERM, Ctrl-C)


def _start(job: Job) -> None:
    job.log.parent.mkdir(parents=True, exist_ok=True)
    with open(job.log, "w") as f:  # the child keeps its own copy of the descriptor
        job.proc = subprocess.Popen([str(c) for c in job.cmd], env=job.env, cwd=REPO, stdout=f,
                                    stderr=subprocess.STDOUT, start_new_session=True)
    job.t0 = time.monotonic()
    _LIVE.append(job)


def _end_live_jobs(signum=None, frame=None) -> None:
    """Stop every running job (their own process groups: nothing is left running on the machine)."""
    while _LIVE:
        _stop(_LIVE.pop().proc)
    if signum is not None:
        raise SystemExit(128 + signum)


def _stop(proc: subprocess.Popen) -> None:
    """End the job's whole process group: SIGTERM, up to 10 s for the command to end, then SIGKILL for
    whatever is left of the group (nnU-Net's augmentation workers outlive a parent that is killed)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            pass


def run_jobs(jobs: list[Job], deadline: float, on_done) -> None:
    """Run ``jobs``: each starts as soon as the jobs it comes after have succeeded (all that can run,
    run at once); at ``deadline`` (time.monotonic()) every running job is stopped. ``on_done(job)`` is
    called as each one ends; ``job.result``: status (ok, failed, timeout, skipped), rc, seconds."""
    pending, running = list(jobs), []
    by_name = {j.name: j for j in jobs}
    while pending or running:
        if time.monotonic() > deadline:
            _time_out(running, pending, on_done)
            return
        for job in [j for j in pending if all(by_name[a].result for a in j.after)]:
            pending.remove(job)
            bad = [a for a in job.after if by_name[a].result["status"] != "ok"]
            if bad:
                job.result = {"status": "skipped", "reason": f"needs {', '.join(bad)}, which did not succeed"}
                on_done(job)
                continue
            _start(job)
            running.append(job)
        for job in [j for j in running if j.proc.poll() is not None]:
            running.remove(job)
            _LIVE.remove(job)
            rc = job.proc.returncode
            job.result = {"status": "ok" if rc == 0 else "failed", "rc": rc, "seconds": time.monotonic() - job.t0}
            on_done(job)
        time.sleep(0.2)


def _time_out(running: list[Job], pending: list[Job], on_done) -> None:
    for job in running:
        _stop(job.proc)
        _LIVE.remove(job)
        job.result = {"status": "timeout", "rc": None, "seconds": time.monotonic() - job.t0,
                      "reason": "stopped at the part's time limit"}
        on_done(job)
    for job in pending:
        job.result = {"status": "skipped", "reason": "the part's time limit came first"}
        on_done(job)


def log_tail(path: Path, lines: int = 12) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# ------------------------------------------------------------------------------------------ training logs
_NUM = r"([-+]?(?:\d+\.?\d*(?:[eE][-+]?\d+)?|nan|inf))"
# one registry: name -> (pattern on a log line, what the groups become)
LOG_FIELDS = {
    "train_loss": (re.compile(rf": train_loss {_NUM}"), lambda m: float(m[1])),
    "val_loss": (re.compile(rf": val_loss {_NUM}"), lambda m: float(m[1])),
    "epoch_s": (re.compile(rf": Epoch time: {_NUM} s"), lambda m: float(m[1])),
    "ima": (re.compile(r": IMA: (\d+)/(\d+) samples .*?, (\d+) crossed \(.*?\), (\d+) fell back"),
            lambda m: {"attacked": int(m[1]), "samples": int(m[2]), "crossed": int(m[3]), "fell_back": int(m[4])}),
    "margins": (re.compile(rf": IMA margins \(n=(\d+)\): mean {_NUM}.*? updates (\d+):"),
                lambda m: {"n": int(m[1]), "mean": float(m[2]), "updates": int(m[3])}),
    "sat": (re.compile(rf": SAT: (\d+)/(\d+) samples attacked \(PGD, eps {_NUM}\), (\d+) fell back"),
            lambda m: {"attacked": int(m[1]), "samples": int(m[2]), "eps": float(m[3]), "fell_back": int(m[4])}),
    "warning": (re.compile(r": ((?:IMA|SAT) WARNING: .*)"), lambda m: m[1]),
}
EPOCH = re.compile(r": Epoch (\d+)\s*$")


def parse_training_log(text: str) -> list[dict]:
    """Per epoch of an nnU-Net training log: the LOG_FIELDS found in it."""
    epochs: list[dict] = []
    for line in text.splitlines():
        m = EPOCH.search(line)
        if m:
            epochs.append({"epoch": int(m[1])})
            continue
        for name, (pattern, value) in LOG_FIELDS.items():
            found = pattern.search(line)
            if found and epochs:
                epochs[-1][name] = value(found)
    return epochs


def count_checks(epoch: dict, batch: int, iters: int, attack_samples: str) -> list[dict]:
    """The epoch's counts against each other and the schedule: (name, ok) pairs."""
    out, samples = [], batch * iters
    for key in ("ima", "sat"):
        c = epoch.get(key)
        if not c:
            continue
        every = key == "sat" or attack_samples == "all"  # every sample is attacked (or falls back)
        out.append((f"{key}: samples = iterations x batch ({iters} x {batch})", c["samples"] == samples))
        out.append((f"{key}: attacked + fell back {'=' if every else '<='} samples",
                     c["attacked"] + c["fell_back"] == c["samples"] if every
                     else c["attacked"] + c["fell_back"] <= c["samples"]))
    if "ima" in epoch:
        c = epoch["ima"]
        out.append(("ima: crossed + not crossed = attacked (not crossed >= 0)", 0 <= c["crossed"] <= c["attacked"]))
    if "margins" in epoch and "ima" in epoch:
        c, m = epoch["ima"], epoch["margins"]
        out.append(("ima: margin updates <= samples - fell back", 0 < m["updates"] <= c["samples"] - c["fell_back"]))
    return [{"check": name, "ok": bool(ok)} for name, ok in out]


def margins_in_checkpoint(path: Path) -> dict:
    """What IMA's checkpoint holds: the number of margins, all finite and within [0, eps_max]."""
    import torch

    from nnunet_ima import MarginStore
    from nnunet_ima_trainers.checkpoints import read_checkpoint

    store = MarginStore.from_state_dict(read_checkpoint(str(path), "checkpoint")["ima_margins"])
    m = store.margins
    return {"n": len(store), "eps_max": store.eps_max, "min": float(m.min()), "max": float(m.max()),
            "mean": float(m.mean()), "finite": bool(torch.isfinite(m).all()),
            "in_range": bool(((m >= 0) & (m <= store.eps_max + 1e-9)).all())}


def margin_checks(fold: Path, last_epoch: dict) -> tuple[dict, list]:
    """IMA's saved margins and their checks against the last epoch's log line."""
    saved = margins_in_checkpoint(fold / "checkpoint_final.pth")
    logged = last_epoch.get("margins", {})
    mean = logged.get("mean", math.inf)
    return saved, [{"check": "margins saved: finite, in [0, eps_max]", "ok": saved["finite"] and saved["in_range"]},
                   {"check": "margins saved: as many as the last epoch logged", "ok": saved["n"] == logged.get("n")},
                   {"check": "margins saved: the mean the last epoch logged (4 digits)",
                    "ok": abs(saved["mean"] - mean) <= 5e-4 * max(1.0, abs(mean))},
                   {"check": "margins.png written", "ok": (fold / "margins.png").is_file()}]


def summarize_run(fold: Path, trainer: str, schedule: tuple, batch: int, attack_samples: str) -> dict:
    """Everything a training run left in its fold folder, with the checks that must hold."""
    logs = sorted(fold.glob("training_log_*.txt"))
    epochs = parse_training_log(logs[-1].read_text(errors="replace")) if logs else []
    done = [e for e in epochs if "epoch_s" in e]
    out = {"epochs_done": len(done), "epochs_planned": schedule[0], "iterations": schedule[1], "batch": batch,
           "epoch_s": [e["epoch_s"] for e in done], "train_loss": [e.get("train_loss") for e in done],
           "counts": [{k: e[k] for k in ("ima", "sat", "margins") if k in e} for e in done],
           "warnings": [e["warning"] for e in epochs if "warning" in e]}
    checks = [{"check": "all epochs completed", "ok": len(done) == schedule[0]},
              {"check": "train losses finite", "ok": bool(done) and all(
                  isinstance(v, float) and math.isfinite(v) for v in out["train_loss"])},
              {"check": "checkpoint_final.pth written", "ok": (fold / "checkpoint_final.pth").is_file()}]
    for e in done:
        checks += [dict(c, check=f"epoch {e['epoch']}: {c['check']}")
                   for c in count_checks(e, batch, schedule[1], attack_samples)]
    summary = fold / "validation" / "summary.json"
    if summary.is_file():
        out["val_dice"] = json.loads(summary.read_text())["foreground_mean"]["Dice"]
    if trainer == "nnUNetTrainerIMA" and (fold / "checkpoint_final.pth").is_file():
        out["margins"], more = margin_checks(fold, done[-1] if done else {})
        checks += more
    out["checks"] = checks
    return out


# ------------------------------------------------------------------------------------------ parts
class Skip(Exception):
    """The part cannot run here; the message says why."""


class PartError(Exception):
    """The part ran and something failed (recorded in its report entry); the message says what."""

    status = "failed"


class PartTimeout(PartError):
    status = "timeout"


@dataclass
class Ctx:
    """What the parts share: the arguments, sizes, work folder, report, the children's environment, the
    running part's deadline (time.monotonic()), the dataset and the finished trainings' fold folders."""

    args: argparse.Namespace
    sizes: Sizes
    work: Path
    report: Report
    env: dict
    deadline: float = 0.0
    dataset: dict = field(default_factory=dict)
    folds: dict = field(default_factory=dict)  # (trainer, compiled) -> fold folder of a successful run


def base_env(work: Path, device: str) -> dict:
    """The children's environment: nnU-Net's folders under ``work``, the trainers findable (what
    ``eval "$(nnunet-ima-env)"`` sets), no NNUNET_IMA_* of the caller's, light worker pools."""
    from nnunet_ima_demo.nnunet_data import nnunet_env
    from nnunet_ima_trainers import ext_trainer_path

    env = {k: v for k, v in nnunet_env(work).items() if not k.startswith("NNUNET_IMA_")}
    gpu = device == "cuda"
    env.update(nnUNet_extTrainer=ext_trainer_path(os.environ.get("nnUNet_extTrainer")), nnUNet_compile="false",
               nnUNet_def_n_proc="2" if gpu else "1", nnUNet_n_proc_DA="4" if gpu else "0", PYTHONUNBUFFERED="1",
               MPLBACKEND="Agg", OMP_WAIT_POLICY="PASSIVE")
    return env


def run_one(ctx: Ctx, job: Job) -> Job:
    run_jobs([job], ctx.deadline, lambda j: None)
    ctx.report.append_log(job.name, log_tail(job.log, 40))
    if job.result["status"] == "timeout":
        raise PartTimeout(f"{job.name} stopped at the part's time limit after {job.result['seconds']:.0f} s")
    return job


def _version(dist: str) -> str | None:
    import importlib.metadata as md

    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def environment(device: str) -> dict:
    """Python, torch, CUDA, the GPU, the versions of the packages the check installs, the install time."""
    import torch

    env = {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
           "torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
           "packages": {p: _version(p) for p in PACKAGES}}
    if os.environ.get("GPU_CHECK_INSTALL_S"):
        env["install_s"] = float(os.environ["GPU_CHECK_INSTALL_S"])
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, capability=f"{props.major}.{props.minor}",
                   gpu_memory_gib=round(props.total_memory / 2**30, 1), driver=_nvidia_smi("driver_version"))
    return env


def _nvidia_smi(query: str) -> str | None:
    try:
        run = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=15)
        return run.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


IMPORTS = ("SimpleITK", "blosc2", "nibabel", "cc3d", "nnunetv2.run.run_training",
           "nnunetv2.experiment_planning.plan_and_preprocess_entrypoints", "nnunetv2.inference.predict_from_raw_data",
           "nnunet_ima_trainers.adversarial", "nnunet_ima_eval.pipeline")


def import_check() -> float:
    """Import what every later part needs (a missing wheel shows here, once); returns the seconds."""
    import importlib

    t0 = time.perf_counter()
    for name in IMPORTS:
        try:
            importlib.import_module(name)
        except Exception as e:  # ImportError, or a compiled module built for another Python
            raise PartError(f"import {name} failed: {type(e).__name__}: {e}") from None
    return time.perf_counter() - t0


def command(name: str) -> list[str]:
    """An nnU-Net console script, as the project finds it (beside this Python, else on PATH)."""
    from nnunet_ima_demo.nnunet_data import nnunet_command

    cmd = nnunet_command(name)
    if not Path(cmd[0]).is_file() and shutil.which(cmd[0]) is None:
        raise PartError(f"{name} not found beside {sys.executable} nor on PATH (pip --target installs put it in "
                        "<target>/bin: add that folder to PATH)")
    return cmd


def plan_facts(folder: Path) -> dict:
    """Dataset id and name, and the 2d configuration nnU-Net planned for it."""
    m = re.fullmatch(r"Dataset(\d+)_(.+)", folder.name)
    plans = json.loads((folder / "nnUNetPlans.json").read_text())["configurations"]["2d"]
    arch = plans["architecture"]["arch_kwargs"]
    return {"id": int(m[1]), "name": folder.name, "folder": str(folder), "patch": plans["patch_size"],
            "batch": plans["batch_size"], "stages": arch["n_stages"], "features": arch["features_per_stage"]}


def make_dataset(ctx: Ctx) -> dict:
    """Generated shapes (tests/data_gen.py) written as NIfTI, planned by nnUNetv2_plan_and_preprocess."""
    sys.path.insert(0, str(REPO / "tests"))  # test-only data generators
    from data_gen import synthetic_shapes

    from nnunet_ima_demo.nnunet_data import write_raw_dataset

    s, t0 = ctx.sizes, time.perf_counter()
    write_raw_dataset(ctx.env["nnUNet_raw"], DATASET_ID, DATASET_NAME, synthetic_shapes(s.cases, shape=s.shape),
                      LABELS, description="generated by benchmarks/gpu_check.py")
    written = time.perf_counter() - t0
    env = {k: v for k, v in ctx.env.items() if k != "nnUNet_n_proc_DA"}  # 0 crashes the planner
    procs = str(min(8, os.cpu_count() or 1))  # nnU-Net's default 8 fingerprint workers crowd a 2-core machine
    cmd = command("nnUNetv2_plan_and_preprocess") + ["-d", str(DATASET_ID), "-c", "2d", "-np", procs, "-npfp", procs,
                                                     "--verify_dataset_integrity"]
    job = run_one(ctx, Job("nnUNetv2_plan_and_preprocess", cmd, env, ctx.work / "logs" / "plan.log"))
    if job.result["status"] != "ok":
        raise PartError(f"nnUNetv2_plan_and_preprocess failed (exit {job.result['rc']}): {log_tail(job.log, 3)}")
    folder = Path(ctx.env["nnUNet_preprocessed"]) / f"Dataset{DATASET_ID:03d}_{DATASET_NAME}"
    return {**plan_facts(folder), "cases": s.cases, "shape": list(s.shape), "write_s": written,
            "plan_s": job.result["seconds"]}


def part_setup(ctx: Ctx, rec: dict) -> None:
    rec["environment"] = environment(ctx.args.device)
    rec["imports_s"] = import_check()
    rec["commands"] = {n: command(n)[0] for n in ("nnUNetv2_plan_and_preprocess", "nnUNetv2_train")}
    ctx.report.save()
    if ctx.args.preprocessed:
        folder = Path(ctx.args.preprocessed).resolve()
        ctx.env["nnUNet_preprocessed"] = str(folder.parent)
        rec["dataset"] = {**plan_facts(folder), "reused": True}
    else:
        rec["dataset"] = make_dataset(ctx)
    ctx.dataset = rec["dataset"]


# ------------------------------------------------------------------------------------------ training
def fold_dir(results: Path, dataset: dict, trainer: str) -> Path:
    return results / dataset["name"] / f"{trainer}__nnUNetPlans__2d" / "fold_0"


def schedule_of(ctx: Ctx, trainer: str) -> tuple:
    return ctx.sizes.std_schedule if trainer == "nnUNetTrainerSTD" else ctx.sizes.adv_schedule


def init_weights(ctx: Ctx, compiled: bool, results: Path) -> tuple:
    """(checkpoint SAT/IMA start from, jobs to wait for): the standard model of this run; with compile on,
    the compile-off one when it exists (same network: all three compile at once instead of in turn)."""
    std = "nnUNetTrainerSTD"
    if std not in ctx.args.trainers:
        return None, ()
    if compiled and (std, False) in ctx.folds:
        return ctx.folds[(std, False)] / "checkpoint_final.pth", ()
    return fold_dir(results, ctx.dataset, std) / "checkpoint_final.pth", (std,)


def training_job(ctx: Ctx, trainer: str, compiled: bool, results: Path) -> Job:
    """The real ``nnUNetv2_train DATASET 2d 0 -tr TRAINER -device DEVICE`` with the check's schedule."""
    s, (epochs, iters) = ctx.sizes, schedule_of(ctx, trainer)
    env = dict(ctx.env, nnUNet_results=str(results), nnUNet_compile="true" if compiled else "false",
               NNUNET_IMA_EPOCHS=str(epochs), NNUNET_IMA_ITERS=str(iters), NNUNET_IMA_VAL_ITERS=str(s.val_iters))
    after = ()
    if trainer in ADVERSARIAL:
        env.update(NNUNET_IMA_K=str(s.k), NNUNET_IMA_N=str(s.n), NNUNET_IMA_ATTACK_SAMPLES=s.attack_samples)
        init, after = init_weights(ctx, compiled, results)
        if init is not None:
            env["NNUNET_IMA_INIT_WEIGHTS"] = str(init)
    cmd = command("nnUNetv2_train") + [str(ctx.dataset["id"]), "2d", "0", "-tr", trainer, "-device", ctx.args.device]
    return Job(trainer, cmd, env, ctx.work / "logs" / f"train{'_compile' if compiled else ''}_{trainer}.log", after)


def run_line(name: str, r: dict) -> str:
    """One line per finished training run for the console."""
    parts = [f"{r['status']} in {r.get('seconds', 0):.1f} s"]
    if "epochs_done" in r:
        mean = sum(r["epoch_s"]) / len(r["epoch_s"]) if r["epoch_s"] else float("nan")
        parts.append(f"{r['epochs_done']}/{r['epochs_planned']} epochs, {mean:.2f} s/epoch")
    last = r.get("counts", [{}])[-1] if r.get("counts") else {}
    for key in ("ima", "sat"):
        if key in last:
            c = last[key]
            crossed = f", {c['crossed']} crossed" if "crossed" in c else ""
            parts.append(f"last epoch {c['attacked']}/{c['samples']} attacked{crossed}, {c['fell_back']} fell back")
    if "margins" in r:
        parts.append(f"{r['margins']['n']} margins saved")
    bad = [c["check"] for c in r.get("checks", []) if not c["ok"]]
    return f"{name}: " + ", ".join(parts) + (f"; FAILED checks: {'; '.join(bad)}" if bad else "")


def record_run(ctx: Ctx, job: Job, compiled: bool, results: Path) -> dict:
    """The run's record: exit status, what its fold folder holds and the checks; failed checks fail it."""
    r = {**job.result, "command": " ".join(str(c) for c in job.cmd[-8:])}
    fold = fold_dir(results, ctx.dataset, job.name)
    if job.proc is not None and fold.is_dir():
        try:
            r.update(summarize_run(fold, job.name, schedule_of(ctx, job.name), ctx.dataset["batch"],
                                   ctx.sizes.attack_samples))
        except Exception as e:  # a half-written run: keep the exit status, say what could not be read
            r["parse_error"] = f"{type(e).__name__}: {e}"
    failed = [c["check"] for c in r.get("checks", []) if not c["ok"]]
    if r["status"] == "ok" and (failed or "parse_error" in r):
        r.update(status="failed", reason="; ".join(failed) or r["parse_error"])
        job.result["status"] = "failed"  # the runs that start from this one are skipped
    if r["status"] == "ok":
        ctx.folds[(job.name, compiled)] = fold
    elif job.proc is not None:
        r["log_tail"] = log_tail(job.log)
    ctx.report.append_log(f"{'compile on' if compiled else 'compile off'} {job.name}", log_tail(job.log, 40))
    ctx.report.say(f"train{' (compile on)' if compiled else ''} {run_line(job.name, r)}")
    return r


def part_train(ctx: Ctx, rec: dict, compiled: bool) -> None:
    """STD, then SAT and IMA from its weights, at once on one device; each run checked on its own."""
    if compiled and ctx.args.device == "cpu":
        raise Skip(NO_COMPILE_ON_CPU)
    results = ctx.work / ("results_compile" if compiled else "results")
    jobs = [training_job(ctx, t, compiled, results) for t in ctx.args.trainers]
    rec.update(compile=compiled, runs={}, schedule={
        j.name: {"epochs": j.env["NNUNET_IMA_EPOCHS"], "iterations": j.env["NNUNET_IMA_ITERS"], "after": list(j.after),
                 "init_weights": j.env.get("NNUNET_IMA_INIT_WEIGHTS")} for j in jobs})
    rec["note"] = ("runs that do not wait for another run share the device: their seconds are not those of a run "
                   "alone (bench has those)")

    def done(job):
        rec["runs"][job.name] = record_run(ctx, job, compiled, results)
        ctx.report.save()

    run_jobs(jobs, ctx.deadline, done)
    bad = {n: r["status"] for n, r in rec["runs"].items() if r["status"] != "ok"}
    if bad:
        err = PartTimeout if "timeout" in bad.values() else PartError
        raise err(", ".join(f"{n} {s}" for n, s in bad.items()))


# ------------------------------------------------------------------------------------------ benchmark
def bench_numbers(numbers: dict) -> dict:
    """The figures the issue asks for, out of bench_trainers.py's JSON."""
    per = numbers["per_iteration"]
    std = per["nnUNetTrainer"]
    out = {"s_per_iter": {k: v["wall_s"] for k, v in per.items()},
           "over_nnunet": {k: v["wall_s"] / std["wall_s"] for k, v in per.items()},
           "peak_increase_mib": {k: v["peak_bytes"] / 2**20 for k, v in per.items()},
           "peak_mib": {k: v["peak_total_bytes"] / 2**20 for k, v in per.items()},
           "ima_over_floor": numbers["ima_over_floor_wall"], "ima_memory_ratio": numbers["ima_memory_ratio"],
           "k_sweep": {k: {"s_per_iter": v["wall_s"], "ima_over_floor": v["ima_over_floor_wall"],
                           "ima_over_nnunet": v["ima_over_nnunet_wall"]}
                       for k, v in numbers.get("k_sweep", {}).items()}}
    out.update({k: numbers[k] for k in ("k", "n", "patch", "batch", "parameters_m", "gpu", "compile", "iters")
                if k in numbers})
    return out


def part_bench(ctx: Ctx, rec: dict, compiled: bool) -> None:
    """``bench_trainers.py`` (its own generated real-size dataset, shared by both compile settings)."""
    if compiled and ctx.args.device == "cpu":
        raise Skip(NO_COMPILE_ON_CPU + "; bench_trainers.py refuses --compile on without CUDA")
    s, flag = ctx.sizes, "on" if compiled else "off"
    out_json = ctx.work / f"bench_compile_{flag}.json"
    cmd = [sys.executable, BENCH_TRAINERS, "--device", ctx.args.device, "--compile", flag, "--json", out_json,
           "--root", ctx.work / "bench", *s.bench]
    if s.bench_on_training_data:
        cmd += ["--preprocessed", ctx.dataset["folder"]]
    rec["command"] = " ".join(str(c) for c in cmd[1:])
    job = run_one(ctx, Job(f"bench_trainers (compile {flag})", cmd, dict(ctx.env), ctx.work / "logs" /
                           f"bench_{flag}.log"))
    rec["seconds_run"] = job.result["seconds"]
    if job.result["status"] != "ok":
        rec["log_tail"] = log_tail(job.log)
        raise PartError(f"bench_trainers.py failed (exit {job.result['rc']})")
    rec.update(bench_numbers(json.loads(out_json.read_text())))
    k20 = rec["s_per_iter"]
    ctx.report.say(f"bench (compile {flag}): s/iter nnUNetTrainer {k20['nnUNetTrainer']:.3f}, SAT "
                   f"{k20['nnUNetTrainerSAT']:.3f}, IMA {k20['nnUNetTrainerIMA']:.3f} (K={rec['k']}, N={rec['n']}); "
                   f"IMA / floor {rec['ima_over_floor']:.2f}; IMA peak memory increase x{rec['ima_memory_ratio']:.2f}")


# ------------------------------------------------------------------------------------------ attacks
# nnunet-ima-attack's main() in a process that reports the peak CUDA memory afterwards (the console
# script is `sys.exit(main())`; argv[1]: where the probe writes its JSON, argv[2:]: the command's arguments)
PROBE = (
    "import json, sys, time, torch\n"
    "from nnunet_ima_eval.cli import main\n"
    "t0 = time.perf_counter()\n"
    "rc = main(sys.argv[2:])\n"
    "peak = torch.cuda.max_memory_allocated() if torch.cuda.is_initialized() else None\n"
    "open(sys.argv[1], 'w').write(json.dumps({'rc': rc, 'seconds': time.perf_counter() - t0, 'peak_bytes': peak}))\n"
    "sys.exit(rc)\n")


def attack_job(ctx: Ctx, name: str, trainers: list, batch: int, extra: tuple = ()) -> Job:
    """nnunet-ima-attack on the compile-off models: PGD at eps 2 on fold 0's validation slices."""
    s = ctx.sizes
    args = ["-d", ctx.dataset["id"], "-c", "2d", "-f", "0", "-tr", *trainers, "--eps", "2", "--attacks", "pgd",
            "--pgd-steps", s.attack_steps, "--batch-size", batch, "--device", ctx.args.device,
            "-o", ctx.work / name, "--quiet", *extra]
    if s.attack_max_samples:
        args += ["--max-samples", s.attack_max_samples]
    env = dict(ctx.env, nnUNet_results=str(ctx.work / "results"), nnUNet_compile="false")
    return Job(name, [sys.executable, "-c", PROBE, ctx.work / f"{name}.probe.json", *args], env,
               ctx.work / "logs" / f"{name}.log")


def attack_record(ctx: Ctx, job: Job, scope: str | None = None) -> dict:
    """Exit status, wall time, peak memory, and per model the attacked slices per second (n_samples /
    the seconds nnunet-ima-attack records for the PGD run in results.csv) and the ADI."""
    r = dict(job.result)
    probe = Path(str(job.cmd[3]))
    if probe.is_file():
        p = json.loads(probe.read_text())
        r.update(wall_s=p["seconds"], peak_mib=None if p["peak_bytes"] is None else p["peak_bytes"] / 2**20)
    table = ctx.work / job.name / "results.csv"
    if r["status"] != "ok" or not table.is_file():
        r["log_tail"] = log_tail(job.log)
        return r
    with open(table) as f:
        rows = [row for row in csv.DictReader(f) if row["class"] == "mean" and row["attack"] == "pgd"
                and (scope is None or row.get("scope", scope) == scope)]
    r["models"] = {row["model"]: {"n_samples": int(row["n_samples"]), "seconds": float(row["seconds"]),
                                  "slices_per_s": int(row["n_samples"]) / float(row["seconds"]),
                                  "adi": float(row["adi"])} for row in rows}
    results = ctx.work / job.name / "results.json"
    if results.is_file():
        checks = json.loads(results.read_text()).get("checks", [])
        r["sanity"] = {"ok": sum(c["status"] == "ok" for c in checks), "warning": [c["message"] for c in checks
                                                                                 if c["status"] != "ok"]}
    return r


def trained_models(ctx: Ctx) -> list:
    models = [t for t in ctx.args.trainers if (t, False) in ctx.folds]
    if not models:
        raise Skip("no model was trained with compile off (part train did not run or failed)")
    return models


def part_attack(ctx: Ctx, rec: dict) -> None:
    """The same slices attacked twice by the real command: batched, then one slice per batch."""
    models = trained_models(ctx)
    rec.update(models=models, attack=f"PGD-{ctx.sizes.attack_steps}, L2 eps 2")
    sanity = () if ctx.sizes.attack_sanity else ("--no-sanity",)
    for label, batch, extra in (("batched", ctx.sizes.attack_batch, sanity), ("one_at_a_time", 1, ("--no-sanity",))):
        job = run_one(ctx, attack_job(ctx, f"attack_{label}", models, batch, extra))
        rec[label] = {"batch_size": batch, **attack_record(ctx, job)}
        ctx.report.save()
        if job.result["status"] != "ok":
            raise PartError(f"nnunet-ima-attack --batch-size {batch} failed (exit {job.result['rc']})")
    one, many = rec["one_at_a_time"]["models"], rec["batched"]["models"]
    rec["speedup"] = {m: many[m]["slices_per_s"] / one[m]["slices_per_s"] for m in many if m in one}
    for m, x in rec["speedup"].items():
        ctx.report.say(f"attack {m}: {many[m]['slices_per_s']:.1f} slices/s batched ({ctx.sizes.attack_batch}), "
                       f"{one[m]['slices_per_s']:.1f} one at a time: x{x:.2f}")


def part_case_scope(ctx: Ctx, rec: dict) -> None:
    """Issue 22: the case-scope attack's time and peak memory through the real command (PGD at eps 2 as in
    part attack, whole fold-0 validation cases through nnU-Net's sliding window with mirroring), then
    ``bench_case_attack.py`` on the dataset's 2d plan (its targets: peak memory above the case's arrays at
    4x within 1.3x of 1x; s/step within 1.3x of windows x mirrors x (2 forwards + 1 backward))."""
    model = trained_models(ctx)[-1]
    job = run_one(ctx, attack_job(ctx, "attack_case_scope", [model], ctx.sizes.attack_batch,
                                  ("--scope", "case", "--no-sanity")))
    rec.update(model=model, **attack_record(ctx, job, scope="case"))
    if job.result["status"] != "ok":
        raise PartError(f"nnunet-ima-attack --scope case failed (exit {job.result['rc']})")
    ctx.report.save()
    out_json = ctx.work / "bench_case_attack.json"
    cmd = [sys.executable, BENCH_CASE, "--device", ctx.args.device, "--plans", Path(ctx.dataset["folder"]) /
           "nnUNetPlans.json", "--configurations", "2d", "--repeats", "1", "--json", out_json]
    rec["bench_command"] = " ".join(str(c) for c in cmd[1:])
    bench = run_one(ctx, Job("bench_case_attack", cmd, dict(ctx.env), ctx.work / "logs" / "bench_case.log"))
    if bench.result["status"] != "ok":
        rec["bench_log_tail"] = log_tail(bench.log)
        raise PartError(f"bench_case_attack.py failed (exit {bench.result['rc']})")
    rec["bench"] = [{k: r[k] for k in ("configuration", "scale", "shape", "windows", "mirrors", "case_bytes",
                                       "peak_above_bytes", "step_s", "bare_s")} for r in json.loads(out_json.read_text())]
    one = rec["bench"][0]
    for r in rec["bench"]:
        ctx.report.say(f"case scope {r['configuration']} x{r['scale']}: peak above the case's arrays "
                       f"{r['peak_above_bytes'] / 2**20:.1f} MiB (x{r['peak_above_bytes'] / one['peak_above_bytes']:.2f} "
                       f"of 1x), {r['step_s']:.3f} s/step = x{r['step_s'] / r['bare_s']:.2f} of the bare passes")


# ------------------------------------------------------------------------------------------ markdown
def _f(x, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def md_setup(rec: dict) -> list[str]:
    env, d = rec.get("environment", {}), rec.get("dataset", {})
    out = [f"install (gpu_setup.sh) {_f(env.get('install_s'), '.1f')} s; imports {_f(rec.get('imports_s'), '.1f')} s"]
    if d:
        made = "reused" if d.get("reused") else (f"{d['cases']} cases {tuple(d['shape'])} written in "
                                                 f"{d['write_s']:.2f} s, planned + preprocessed in {d['plan_s']:.1f} s")
        out.append(f"dataset {d['name']}: {made}; 2d plan patch {d['patch']}, batch {d['batch']}, {d['stages']} stages")
    return out


def md_train(rec: dict) -> list[str]:
    out = ["| trainer | status | wall s | epochs | s/epoch | last train loss | val Dice | last epoch: attacked / "
           "samples, crossed, fell back | margins saved (n, range) |", "|---|---|---|---|---|---|---|---|---|"]
    for name, r in rec.get("runs", {}).items():
        e = r.get("epoch_s") or []
        last = (r.get("counts") or [{}])[-1]
        c = last.get("ima") or last.get("sat")
        counts = "-" if not c else f"{c['attacked']} / {c['samples']}, {c.get('crossed', '-')}, {c['fell_back']}"
        m = r.get("margins")
        margins = "-" if not m else f"{m['n']}, [{m['min']:.3g}, {m['max']:.3g}] of eps_max {m['eps_max']:.3g}"
        loss = (r.get("train_loss") or [None])[-1]
        out.append(f"| {name} | {r['status']} | {_f(r.get('seconds'), '.1f')} | {r.get('epochs_done', '-')}/"
                   f"{r.get('epochs_planned', '-')} | {_f(sum(e) / len(e) if e else None, '.2f')} | {_f(loss, '.4f')} "
                   f"| {_f(r.get('val_dice'), '.3f')} | {counts} | {margins} |")
    bad = [f"{n}: {c['check']}" for n, r in rec.get("runs", {}).items() for c in r.get("checks", []) if not c["ok"]]
    after = {n: v["after"] for n, v in rec.get("schedule", {}).items() if v["after"]}
    return out + ["", (f"failed checks: {'; '.join(bad)}" if bad else "every count and file check passed")
                  + f"; {', '.join(f'{n} after {a[0]}' for n, a in after.items()) or 'all runs at once'}: "
                  + rec.get("note", "")]


def md_bench(rec: dict) -> list[str]:
    if "s_per_iter" not in rec:
        return []
    out = [f"patch {rec.get('patch')}, batch {rec.get('batch')}, {_f(rec.get('parameters_m'), '.1f')} M parameters, "
           f"K={rec.get('k')}, N={rec.get('n')}, mean of {rec.get('iters')} iterations", "",
           "| trainer | s/iter | x nnUNetTrainer | peak increase MiB | peak MiB |", "|---|---|---|---|---|"]
    for name, v in rec["s_per_iter"].items():
        out.append(f"| {name} | {v:.4f} | {rec['over_nnunet'][name]:.2f} | {rec['peak_increase_mib'][name]:.1f} | "
                   f"{rec['peak_mib'][name]:.0f} |")
    out += ["", f"IMA / floor {rec['ima_over_floor']:.3f}; IMA peak increase / nnUNetTrainer's "
                f"{rec['ima_memory_ratio']:.2f}", ""]
    if rec.get("k_sweep"):
        out += ["| K (N as above) | IMA s/iter | IMA / floor | IMA / nnUNetTrainer |", "|---|---|---|---|"]
        out += [f"| {k} | {v['s_per_iter']:.4f} | {v['ima_over_floor']:.3f} | {v['ima_over_nnunet']:.2f} |"
                for k, v in rec["k_sweep"].items()]
    return out


def md_attack(rec: dict) -> list[str]:
    many, one = (rec.get(k, {}).get("models", {}) for k in ("batched", "one_at_a_time"))
    if not many:
        return []
    out = [f"{rec.get('attack')}; batched: --batch-size {rec['batched']['batch_size']}, peak "
           f"{_f(rec['batched'].get('peak_mib'), '.0f')} MiB; one at a time: peak "
           f"{_f(rec.get('one_at_a_time', {}).get('peak_mib'), '.0f')} MiB", "",
           "| model | slices | batched slices/s | one at a time slices/s | speed-up | ADI |",
           "|---|---|---|---|---|---|"]
    for m, v in many.items():
        single = one.get(m, {}).get("slices_per_s")
        out.append(f"| {m} | {v['n_samples']} | {v['slices_per_s']:.1f} | {_f(single, '.1f')} | "
                   f"{_f(rec.get('speedup', {}).get(m), '.2f')} | {v['adi']:.3f} |")
    sanity = rec["batched"].get("sanity")
    if sanity:
        out += ["", f"sanity checks: {sanity['ok']} ok, {len(sanity['warning'])} warnings"
                + "".join(f"\n- {w}" for w in sanity["warning"])]
    return out


def md_case_scope(rec: dict) -> list[str]:
    if "wall_s" not in rec:
        return []
    out = [f"{rec.get('model')}: {rec['wall_s']:.1f} s, peak {_f(rec.get('peak_mib'), '.0f')} MiB; "
           + ", ".join(f"{m}: {v['slices_per_s']:.3f} cases/s" for m, v in rec.get("models", {}).items())]
    if rec.get("bench"):
        one = rec["bench"][0]
        out += ["", "| model | case | shape | windows x mirrors | peak above case arrays MiB | vs 1x | s/step | "
                    "step / bare |", "|---|---|---|---|---|---|---|---|"]
        out += [f"| {r['configuration']} | {r['scale']}x | {'x'.join(map(str, r['shape']))} | {r['windows']} x "
                f"{r['mirrors']} | {r['peak_above_bytes'] / 2**20:.1f} | "
                f"{r['peak_above_bytes'] / one['peak_above_bytes']:.2f} | {r['step_s']:.3f} | "
                f"{r['step_s'] / r['bare_s']:.2f} |" for r in rec["bench"]]
    return out


SECTIONS = {"setup": md_setup, "train": md_train, "bench": md_bench, "attack": md_attack,
            "train_compile": md_train, "bench_compile": md_bench, "case_scope": md_case_scope}


def markdown(data: dict) -> str:
    meta, parts = data["meta"], data["parts"]
    env = parts.get("setup", {}).get("environment", {})
    title = env.get("gpu") or f"{meta['device']} (no GPU: none of these figures is a GPU figure)"
    lines = [f"# GPU check (benchmarks/gpu_check.py): {title}", "",
             f"Started {meta['started']}, {meta.get('elapsed_s')} s of a {meta['budget']} s budget; "
             f"`{meta['command']}`",
             "", f"torch {env.get('torch')} (CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')}), Python "
                 f"{env.get('python')}, {env.get('cpus')} CPUs, driver {env.get('driver', '-')}; packages: "
                 + ", ".join(f"{k} {v}" for k, v in env.get("packages", {}).items()), "",
             "| part | status | seconds | allowed s | note |", "|---|---|---|---|---|"]
    for name, rec in parts.items():
        note = rec.get("reason", "")
        lines.append(f"| {name} | {rec.get('status', 'running')} | {_f(rec.get('seconds'), '.1f')} | "
                     f"{_f(rec.get('allowed_s'), '.0f')} | {note} |")
    for name, rec in parts.items():
        body = SECTIONS[name](rec) if rec.get("status") != "skipped" else []
        if body:
            lines += ["", f"## {name}", "", *body]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------ driver
PARTS = {"setup": part_setup,
         "train": lambda ctx, rec: part_train(ctx, rec, compiled=False),
         "bench": lambda ctx, rec: part_bench(ctx, rec, compiled=False),
         "attack": part_attack,
         "train_compile": lambda ctx, rec: part_train(ctx, rec, compiled=True),
         "bench_compile": lambda ctx, rec: part_bench(ctx, rec, compiled=True),
         "case_scope": part_case_scope}


def run_part(ctx: Ctx, name: str, allowed: float) -> dict:
    """Run one part within ``allowed`` seconds; its report entry gets status, reason and seconds."""
    rec = ctx.report.part(name)
    rec.update(status="running", allowed_s=round(allowed, 1))
    ctx.report.save()
    ctx.deadline, t0 = time.monotonic() + allowed, time.monotonic()
    try:
        PARTS[name](ctx, rec)
        rec["status"] = "measured"
    except Skip as e:
        rec.update(status="skipped", reason=str(e))
    except PartError as e:
        rec.update(status=e.status, reason=str(e))
    except Exception as e:  # a bug or an unexpected environment: recorded, the other parts still run
        rec.update(status="failed", reason=f"{type(e).__name__}: {e}")
        import traceback

        ctx.report.append_log(f"{name} traceback", traceback.format_exc())
    rec["seconds"] = round(time.monotonic() - t0, 1)
    ctx.report.save()
    ctx.report.say(f"{name}: {rec['status']} in {rec['seconds']} s" + (f" ({rec['reason']})" if "reason" in rec
                                                                       else ""))
    return rec


def run_parts(ctx: Ctx) -> None:
    """setup, then the chosen parts in PARTS' order, each within min(its limit, what the budget has left
    once the reserves of the parts after it are kept)."""
    names = ["setup", *(n for n in PARTS if n in ctx.args.parts)]
    end = time.monotonic() + ctx.args.budget
    for i, name in enumerate(names):
        limit = ctx.sizes.limits[name][0]
        kept = sum(ctx.sizes.limits[n][1] for n in names[i + 1:])
        allowed = min(limit, end - time.monotonic() - kept)
        if name != "setup" and ctx.report.part("setup")["status"] != "measured":
            ctx.report.part(name).update(status="skipped", reason="needs setup, which did not succeed")
        elif allowed < 10:
            ctx.report.part(name).update(status="skipped", reason=f"the budget is spent ({allowed:.0f} s left for it "
                                                                  f"after keeping {kept} s for the parts after it)")
        else:
            run_part(ctx, name, allowed)
        ctx.report.save()


def parse_args(argv=None) -> argparse.Namespace:
    from nnunet_ima.ui import OneLineParser

    p = OneLineParser(prog="gpu_check.py", description=__doc__.split("\n\n")[0],
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: a smoke run, with --quick")
    p.add_argument("-o", "--out", required=True, help="report folder: gpu_check.json, gpu_check.md, gpu_check.log")
    p.add_argument("--quick", action="store_true", help="tiny sizes (a CPU smoke run, or a one-minute GPU run)")
    p.add_argument("--budget", type=float, default=None, help="seconds for the whole check (default: 480; 1500 "
                                                              "with --quick)")
    p.add_argument("--workdir", default=None, help="work folder (datasets, models, logs; default: a new "
                                                   "temporary folder)")
    p.add_argument("--parts", nargs="+", choices=list(PARTS)[1:], default=list(PARTS)[1:],
                   help="parts to run after setup (which always runs)")
    p.add_argument("-tr", dest="trainers", nargs="+", choices=TRAINERS, default=list(TRAINERS),
                   help="trainers to train (SAT and IMA start from nnUNetTrainerSTD's weights when it is among them)")
    p.add_argument("--preprocessed", default=None, help="an existing nnUNet_preprocessed/DatasetXXX_Name folder "
                                                        "with 2d nnUNetPlans to train on, instead of generating one")
    args = p.parse_args(argv)
    check_args(p, args)
    return args


def check_args(p, args) -> None:
    """Every argument problem, in one line (exit code 2), before anything is built."""
    if args.budget is not None and not args.budget > 0:
        p.error(f"--budget {args.budget:g}: give a number of seconds > 0")
    if len(set(args.trainers)) != len(args.trainers):
        p.error("-tr: each trainer once")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        p.error(f"--out {args.out} is a file: give a folder")
    pre = args.preprocessed
    named = pre and re.fullmatch(r"Dataset\d+_.+", Path(pre).resolve().name)
    if pre and not (named and (Path(pre) / "nnUNetPlans.json").is_file()):
        p.error(f"--preprocessed {pre}: expected an nnUNet_preprocessed/DatasetXXX_Name folder with nnUNetPlans.json")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            p.error("--device cuda: PyTorch sees no CUDA GPU on this machine (here run --device cpu --quick)")


def main(argv=None) -> int:
    args = parse_args(argv)
    sizes = QUICK if args.quick else FULL
    args.budget = args.budget or sizes.budget
    work = Path(args.workdir or tempfile.mkdtemp(prefix="gpu_check_")).resolve()
    meta = {"_t0": time.monotonic(), "started": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
            "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
            "device": args.device, "quick": args.quick, "budget": args.budget, "workdir": str(work),
            "sizes": asdict(sizes)}
    report = Report(Path(args.out).resolve(), meta)
    report.say(f"work folder {work}; report in {report.out}; budget {args.budget:.0f} s")
    ctx = Ctx(args, sizes, work, report, base_env(work, args.device))
    signal.signal(signal.SIGTERM, _end_live_jobs)
    try:
        run_parts(ctx)
    except BaseException:  # SIGTERM, Ctrl-C: no job left running, the report says where it stopped
        _end_live_jobs()
        for rec in report.data["parts"].values():
            if rec.get("status") == "running":
                rec.update(status="interrupted", reason="gpu_check.py was stopped")
        report.save()
        raise
    parts = report.data["parts"]
    for status in ("measured", "skipped", "failed", "timeout"):
        names = [f"{n}" + (f" ({r['reason']})" if status != "measured" else "") for n, r in parts.items()
                 if r["status"] == status]
        if names:
            report.say(f"{status}: " + "; ".join(names))
    report.say(f"done in {report.data['meta']['elapsed_s']} s: {report.out / 'gpu_check.md'}")
    return int(any(r["status"] in ("failed", "timeout") for r in parts.values()))


if __name__ == "__main__":
    sys.exit(main())
