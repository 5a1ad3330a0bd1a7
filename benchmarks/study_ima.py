"""IMA on the demo data, seeded and paired: which setting makes the effect reliable (issue 20). Not a test.

Seed s is one whole demo run ``nnunet-ima demo --seed s``: a standard model (``nnUNetTrainerSTD``, the
demo's 30 x 12 schedule, ``NNUNET_IMA_SEED=s``) and, for every setting, SAT and IMA fine-tuned from it
through the real trainers (``nnunet-ima-train``, settings through ``NNUNET_IMA_*``, started from that
STD checkpoint with ``NNUNET_IMA_INIT_WEIGHTS``, the demo's 10 x 12 schedule, K=5 N=5 delta=1 eps_max=10,
SAT eps 5, nnU-Net's initial lr 0.01, unless the setting changes them), both with ``NNUNET_IMA_SEED=s``:
SAT and IMA of one seed see identical batches and augmentations, so their difference measures the
method, not the draw; and every setting of seed s starts from the same STD (settings are paired too).
A setting that changes one trainer only (SAT's eps; IMA's K or delta) reuses the other trainer's model
of the same seed (a model is trained once, whatever setting asks for it).

Each model is attacked with ``nnunet-ima-attack`` as the demo does (clean, L2 PGD-100 and IFGSM-10 at
the demo's middle eps 5, the per-sample worst case; no sanity checks) on the demo's 16 test slices.
Per seed the demo's own verdict code (:mod:`nnunet_ima_demo.verdict`) gives every difference IMA − STD
and IMA − SAT with its 95 % paired-bootstrap interval over the slices, and whether the paper's effect
held (IMA above STD under PGD at eps 5, clean ADI at most ``CLEAN_TOLERANCE`` = 1 point below STD's)
and was shown (that interval above 0). Per setting: in how many seeds it held / was shown / IMA was above
SAT, and the mean difference over the seeds with the paired-bootstrap interval of the seed-averaged
per-slice difference, and its range over the seeds.

Runs: ``<workdir>/runs/<model>/`` (its own ``nnUNet_results`` root, ``eval/``, ``record.json``); logs
in ``<workdir>/logs/``. A model is done when its checkpoint_final and its evaluation exist, so the
script resumes where it stopped (a half-trained model starts again). Trainings run with
``--threads`` torch threads each (nnU-Net's own choice, every core, is overridden), ``--jobs`` at a
time, augmentation in the training process (``nnUNet_n_proc_DA=0``: a seeded run's batches do not
depend on it); so these models are not bitwise the demo's (2 threads) of the same seed.

    .venv/bin/python benchmarks/study_ima.py --workdir /work/runs/study20 --seeds 10          # run / resume
    .venv/bin/python benchmarks/study_ima.py --workdir /work/runs/study20 --settings demo lr1e-3 --dry-run
    .venv/bin/python benchmarks/study_ima.py --workdir /work/runs/study20 --seeds 10 --report  # tables only

Writes ``<workdir>/study.json`` (every number) and ``<workdir>/study.md`` (the tables).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from nnunet_ima_demo.mni import DATASET_NAME
from nnunet_ima_demo.nnunet_data import dataset_folder_name, nnunet_command
from nnunet_ima_demo.verdict import CLEAN_TOLERANCE, TRAINERS, differences, judge, paired_bootstrap
from nnunet_ima_eval.report import read_sample_dice

DATASET_ID = 990
PLANS = "nnUNetPlansDemo"
STD, SAT, IMA = TRAINERS
EPS = (5.0,)  # the demo's middle noise level (of its 2, 5, 10), the one its verdict judges
SCHEDULE = {"ITERS": 12, "VAL_ITERS": 2, "K": 5, "N": 5, "DELTA": 1.0, "EPS_MAX": 10.0, "SAT_EPS": 5.0}
EPOCHS_STD, EPOCHS_ADV = 30, 10
READS = {SAT: ("K", "SAT_EPS", "INITIAL_LR", "EPOCHS"), IMA: ("K", "N", "DELTA", "EPS_MAX", "INITIAL_LR", "EPOCHS")}
NEAR_ZERO = 0.5  # a margin below this (half of delta) counts as "near 0"


@dataclass(frozen=True)
class Setting:
    """What a setting changes for SAT and for IMA (NNUNET_IMA_* keys without the prefix)."""

    doc: str
    sat: dict = field(default_factory=dict)
    ima: dict = field(default_factory=dict)


# in order of priority (the fine-tuning's learning rate and SAT's eps first); a run stops early only after
# whole settings
SETTINGS = {
    "demo": Setting("the demo's defaults: lr 0.01 (nnU-Net's restart of the poly schedule), SAT eps 5"),
    "lr1e-3": Setting("fine-tuning lr 0.001", {"INITIAL_LR": 0.001}, {"INITIAL_LR": 0.001}),
    "sat2": Setting("SAT eps 2 (lr 0.01)", {"SAT_EPS": 2.0}, {}),
    "lr1e-3_sat2": Setting("lr 0.001, SAT eps 2", {"INITIAL_LR": 0.001, "SAT_EPS": 2.0}, {"INITIAL_LR": 0.001}),
    "lr3e-3": Setting("fine-tuning lr 0.003", {"INITIAL_LR": 0.003}, {"INITIAL_LR": 0.003}),
    "lr1e-3_K2": Setting("lr 0.001, IMA K=2 (SAT K=5)", {"INITIAL_LR": 0.001}, {"INITIAL_LR": 0.001, "K": 2}),
    "lr1e-3_D2.5": Setting("lr 0.001, IMA delta 2.5 (eps_max/4)", {"INITIAL_LR": 0.001},
                           {"INITIAL_LR": 0.001, "DELTA": 2.5}),
}


def _say(msg: str) -> None:
    print(f"[study {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------- models
@dataclass(frozen=True)
class Model:
    """One training run: trainer, the NNUNET_IMA_* values it differs in from SCHEDULE, seed (SAT and IMA
    start from the STD model of their seed)."""

    trainer: str
    overrides: tuple = ()
    seed: int = 0

    @property
    def name(self) -> str:
        short = {STD: "STD", SAT: "SAT", IMA: "IMA"}[self.trainer]
        return short + "".join(f"_{k.lower()}{v:g}" for k, v in self.overrides) + f"_s{self.seed}"

    def root(self, workdir: Path) -> Path:
        return workdir / "runs" / self.name


def model(trainer: str, changes: dict, seed: int) -> Model:
    """The model a setting asks for: only the keys ``trainer`` reads, values that differ from SCHEDULE."""
    kept = {k: v for k, v in changes.items() if k in READS[trainer] and SCHEDULE.get(k) != v}
    return Model(trainer, tuple(sorted(kept.items())), seed)


def std_model(seed: int) -> Model:
    return Model(STD, (), seed)


def setting_models(name: str, seed: int) -> tuple[Model, Model]:
    s = SETTINGS[name]
    return model(SAT, s.sat, seed), model(IMA, s.ima, seed)


def plan_models(settings: list[str], seeds: list[int]) -> list[Model]:
    """Every model, setting by setting, seed by seed, each once; the next seed's STD is listed before
    this seed's SAT and IMA, so that it trains while they do."""
    out: list[Model] = [std_model(seeds[0])]
    for name in settings:
        for i, seed in enumerate(seeds):
            ahead = [std_model(seeds[i + 1])] if i + 1 < len(seeds) and std_model(seeds[i + 1]) not in out else []
            out += [m for m in [*ahead, *setting_models(name, seed)] if m not in out]
    return out


# ---------------------------------------------------------------------------------------- nnU-Net I/O
def base_env(workdir: Path, threads: int) -> dict:
    """Environment without any inherited NNUNET_IMA_* (an unknown one is an error in the trainers)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NNUNET_IMA_")}
    env.update(nnUNet_raw=str(workdir / "nnUNet_raw"), nnUNet_preprocessed=str(workdir / "nnUNet_preprocessed"),
               nnUNet_compile="false", nnUNet_def_n_proc="1", OMP_NUM_THREADS=str(threads),
               MKL_NUM_THREADS=str(threads))
    return env


def prepare_data(workdir: Path) -> Path:
    """Build the demo dataset and plans exactly as ``nnunet-ima demo`` does; returns the raw folder."""
    from nnunet_ima_demo.runner import build_dataset, plan, write_demo_plans

    env = base_env(workdir, 2)
    for var in ("nnUNet_raw", "nnUNet_preprocessed"):
        Path(env[var]).mkdir(parents=True, exist_ok=True)
    raw = build_dataset(env, DATASET_ID, 3.0, 4)
    (workdir / "logs").mkdir(exist_ok=True)
    plan(env, DATASET_ID, raw, workdir / "logs")  # skipped when nnU-Net's plans exist
    if not (Path(env["nnUNet_preprocessed"]) / raw.name / f"{PLANS}.json").exists():
        write_demo_plans(env, DATASET_ID, [8, 16, 32, 64, 128], 8)
    return raw


def fold_dir(m: Model, workdir: Path) -> Path:
    name = dataset_folder_name(DATASET_ID, DATASET_NAME)
    return m.root(workdir) / "nnUNet_results" / name / f"{m.trainer}__{PLANS}__2d" / "fold_0"


def train_env(m: Model, workdir: Path, threads: int) -> dict:
    env = base_env(workdir, threads)
    env.update(nnUNet_results=str(m.root(workdir) / "nnUNet_results"), nnUNet_n_proc_DA="0")
    sched = {**SCHEDULE, "EPOCHS": EPOCHS_STD if m.trainer == STD else EPOCHS_ADV, "SEED": m.seed,
             **dict(m.overrides)}
    if m.trainer != STD:
        sched["INIT_WEIGHTS"] = str(fold_dir(std_model(m.seed), workdir) / "checkpoint_final.pth")
    env.update({f"NNUNET_IMA_{k}": f"{v:g}" if isinstance(v, float) else str(v) for k, v in sched.items()})
    return env


# nnunet-ima-train with torch's intra-op threads pinned (nnU-Net sets every core on CPU)
_LAUNCH = ("import sys, torch; n = int(sys.argv.pop(1)); torch.set_num_threads(n); "
           "torch.set_num_threads = lambda *a: None; sys.argv[0] = 'nnunet-ima-train'; "
           "from nnunet_ima_trainers.cli import train_entry; train_entry()")


def train_command(m: Model, threads: int) -> list[str]:
    return [sys.executable, "-c", _LAUNCH, str(threads), str(DATASET_ID), "2d", "0", "-tr", m.trainer, "-p", PLANS,
            "-device", "cpu"]


def _cpu_of(proc_times) -> float:
    return proc_times.children_user + proc_times.children_system


def train(m: Model, workdir: Path, threads: int) -> bool:
    """Train one model from scratch (an unfinished folder is cleared); True when it finished."""
    folder = fold_dir(m, workdir)
    if folder.exists():
        for f in folder.iterdir():  # a partial run: start again from the STD model
            if f.is_file():
                f.unlink()
    log = workdir / "logs" / f"train_{m.name}.log"
    _say(f"training {m.name}; log {log}")
    t0 = time.time()
    with open(log, "w") as fh:
        proc = subprocess.Popen(train_command(m, threads), env=train_env(m, workdir, threads), stdout=fh,
                                stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    ok = proc.returncode == 0 and (folder / "checkpoint_final.pth").exists()
    if ok:  # CPU seconds of the training process (start-up and final validation included)
        (m.root(workdir) / "train_time.json").write_text(json.dumps(
            {"cpu_s": usage.ru_utime + usage.ru_stime, "wall_s": time.time() - t0, "threads": threads}))
    _say(f"{m.name}: {'trained' if ok else f'FAILED (exit {proc.returncode}), see {log}'} in "
         f"{(time.time() - t0) / 60:.1f} min")
    return ok


# ---------------------------------------------------------------------------------------- evaluation
def attack_command(m: Model, workdir: Path, raw: Path) -> list[str]:
    return nnunet_command("nnunet-ima-attack") + [
        "-d", str(DATASET_ID), "-c", "2d", "-f", "0", "-p", PLANS, "-tr", m.trainer,
        "-i", str(raw / "imagesTs"), "-l", str(raw / "labelsTs"), "--eps", *[f"{e:g}" for e in EPS],
        "--attacks", "pgd", "ifgsm", "worst", "--pgd-steps", "100", "--ifgsm-steps", "10",
        "-o", str(m.root(workdir) / "eval"), "--device", "cpu", "--quiet", "--no-sanity"]


def samples_of(m: Model, workdir: Path) -> dict:
    """{(trainer, attack, eps): (cases, dice)} of the model's evaluation ({} when incomplete)."""
    got = read_sample_dice(m.root(workdir) / "eval")
    needed = [(m.trainer, "clean", 0.0)] + [(m.trainer, a, e) for a in ("pgd", "worst") for e in EPS]
    return got if all(k in got for k in needed) else {}


def evaluate(m: Model, workdir: Path, raw: Path, threads: int) -> bool:
    if samples_of(m, workdir):
        return True
    env = base_env(workdir, threads)
    env["nnUNet_results"] = str(m.root(workdir) / "nnUNet_results")
    log = workdir / "logs" / f"eval_{m.name}.log"
    t0 = time.time()
    with open(log, "w") as fh:
        rc = subprocess.call(attack_command(m, workdir, raw), env=env, stdout=fh, stderr=subprocess.STDOUT)
    _say(f"{m.name}: {'evaluated' if rc == 0 else f'evaluation FAILED (exit {rc}), see {log}'} in "
         f"{(time.time() - t0) / 60:.1f} min")
    return rc == 0 and bool(samples_of(m, workdir))


_LOCKS: dict[int, threading.Lock] = {}  # one per seed: its STD is trained once, before its SAT and IMA


def run_model(m: Model, workdir: Path, raw: Path, args) -> bool:
    """Train (unless done, or past ``--stop-at``) and evaluate one model, its seed's STD first; True
    when both are done."""
    with _LOCKS.setdefault(m.seed, threading.Lock()):
        if m.trainer != STD and not _run(std_model(m.seed), workdir, raw, args):
            return False
        if m.trainer == STD:
            return _run(m, workdir, raw, args)
    return _run(m, workdir, raw, args)


def _run(m: Model, workdir: Path, raw: Path, args) -> bool:
    if not (fold_dir(m, workdir) / "checkpoint_final.pth").exists():
        if past(args.stop_at) or not train(m, workdir, args.threads):
            return False
    return evaluate(m, workdir, raw, args.threads)


def past(stop_at: str | None) -> bool:
    return bool(stop_at) and time.strftime("%H:%M") >= stop_at


# ---------------------------------------------------------------------------------------- training logs
_EPOCH_TIME = re.compile(r"Epoch time: ([0-9.]+) s")
_PSEUDO_DICE = re.compile(r"Pseudo dice \[(.*?)\]")
_IMA_LINE = re.compile(r"IMA: (\d+)/(\d+) samples.*?(\d+) crossed")
_DIGEST = re.compile(r"saved checkpoint_final\.pth: training state digest (\w+)")


def log_facts(folder: Path) -> dict:
    """From the training log: validation pseudo Dice (mean over classes) after the first and the last
    epoch, the last epoch's IMA crossings, the final checkpoint's training-state digest."""
    logs = sorted(folder.glob("training_log_*.txt"))
    text = logs[-1].read_text(errors="replace") if logs else ""
    dice = [float(np.mean([float(v) for v in re.findall(r"\d+\.\d+(?:e-?\d+)?", d)])) for d in _PSEUDO_DICE.findall(text)]
    out = {"val_dice_first": dice[0] if dice else None, "val_dice_last": dice[-1] if dice else None,
           "digest": (_DIGEST.findall(text) or [None])[-1]}
    hits = _IMA_LINE.findall(text)
    if hits:
        attacked, samples, crossed = (int(v) for v in hits[-1])
        out.update(attacked=attacked, samples=samples, crossed_share=crossed / attacked if attacked else None)
    return out


def margin_summary(ckpt: Path) -> dict:
    """Share of margins at eps_max and near 0 (< NEAR_ZERO), their median, from ``ima_margins``."""
    from nnunet_ima_trainers.checkpoints import read_checkpoint

    state = read_checkpoint(str(ckpt), "checkpoint").get("ima_margins")
    if not state or not state["margins"].numel():
        return {}
    m = state["margins"].double()
    return {"at_eps_max": float((m >= state["eps_max"] - 1e-9).double().mean()),
            "near_zero": float((m < NEAR_ZERO).double().mean()), "margin_median": float(m.median())}


def describe(m: Model, workdir: Path) -> dict:
    """Every number of one finished model: ADI per (attack, eps), training facts and time, margins."""
    samples = samples_of(m, workdir)
    rec = {"name": m.name, "trainer": m.trainer, "seed": m.seed, "overrides": dict(m.overrides),
           "adi": {f"{a} {e:g}": float(np.nanmean(d)) for (_, a, e), (_, d) in samples.items()}}
    rec.update(log_facts(fold_dir(m, workdir)))
    timing = m.root(workdir) / "train_time.json"
    if timing.exists():
        rec.update(json.loads(timing.read_text()))
    if m.trainer == IMA:
        rec.update(margin_summary(fold_dir(m, workdir) / "checkpoint_final.pth"))
    return rec


# ---------------------------------------------------------------------------------------- report
def seed_results(name: str, seeds: list[int], workdir: Path) -> list[dict]:
    """Per seed of a setting: the differences and the demo's judgement (seeds not finished left out)."""
    out = []
    for seed in seeds:
        sat, ima = setting_models(name, seed)
        std, s, i = (samples_of(x, workdir) for x in (std_model(seed), sat, ima))
        if not (std and s and i):
            continue
        samples = {**std, **s, **i}
        diffs = differences(samples, [0.0, *EPS])
        out.append({"seed": seed, "diffs": diffs, "judgement": judge(diffs, list(EPS)), "samples": samples})
    return out


def pooled(runs: list[dict], other: str, attack: str, eps: float):
    """The seed-averaged per-slice difference IMA − other: mean, paired-bootstrap interval, range over seeds."""
    ima = np.mean([r["samples"][(IMA, attack, eps)][1] for r in runs], 0)
    oth = np.mean([r["samples"][(other, attack, eps)][1] for r in runs], 0)
    d = paired_bootstrap(ima, oth)
    per_seed = [r["diffs"][(other, attack, eps)].mean for r in runs]
    return {"mean": d.mean, "lo": d.lo, "hi": d.hi, "min": min(per_seed), "max": max(per_seed)}


def summarize_setting(name: str, runs: list[dict]) -> dict:
    mid = max(EPS)
    cells = {f"{short} {a} {e:g}": pooled(runs, other, a, e) for short, other in (("STD", STD), ("SAT", SAT))
             for a, e in [("clean", 0.0), ("pgd", mid), ("worst", mid)]} if runs else {}
    return {"setting": name, "doc": SETTINGS[name].doc, "n": len(runs),
            "held": sum(r["judgement"].holds for r in runs), "shown": sum(r["judgement"].shown for r in runs),
            "above_sat": sum(r["judgement"].above_sat for r in runs), "cells": cells,
            "seeds_held": [r["seed"] for r in runs if r["judgement"].holds]}


def _cell(c: dict | None) -> str:
    if not c:
        return "—"
    return (f"{100 * c['mean']:+.1f} [{100 * c['lo']:+.1f}, {100 * c['hi']:+.1f}] "
            f"({100 * c['min']:+.1f} to {100 * c['max']:+.1f})")


def summary_md(summaries: list[dict]) -> str:
    keys = [("STD clean 0", "clean − STD"), ("STD pgd 5", "PGD 5 − STD"), ("STD worst 5", "W. 5 − STD"),
            ("SAT clean 0", "clean − SAT"), ("SAT pgd 5", "PGD 5 − SAT")]
    head = ("| setting | seeds | held | shown | IMA > SAT | " + " | ".join(t for _, t in keys) + " |\n|" +
            "---|" * (5 + len(keys)))
    lines = [head]
    for s in summaries:
        lines.append(f"| {s['setting']} ({s['doc']}) | {s['n']} | {s['held']}/{s['n']} | {s['shown']}/{s['n']} | "
                     f"{s['above_sat']}/{s['n']} | " + " | ".join(_cell(s["cells"].get(k)) for k, _ in keys) + " |")
    return "\n".join(lines)


def runs_md(records: list[dict]) -> str:
    lines = ["| model | clean | PGD 2 | PGD 5 | W. 5 | val Dice first → last epoch | train min | CPU s/iter "
             "| at eps_max % | near 0 % | crossed % |", "|" + "---|" * 11]

    def pct(v):
        return "—" if v is None else f"{100 * v:.1f}"

    for r in records:
        a = r["adi"]
        iters = (EPOCHS_STD if r["trainer"] == STD else r["overrides"].get("EPOCHS", EPOCHS_ADV)) * SCHEDULE["ITERS"]
        cpu = f"{r['cpu_s'] / iters:.2f}" if r.get("cpu_s") else "—"
        wall = f"{r['wall_s'] / 60:.1f}" if r.get("wall_s") else "—"
        lines.append(f"| {r['name']} | {pct(a.get('clean 0'))} | {pct(a.get('pgd 2'))} | {pct(a.get('pgd 5'))} | "
                     f"{pct(a.get('worst 5'))} | {pct(r.get('val_dice_first'))} → {pct(r.get('val_dice_last'))} | "
                     f"{wall} | {cpu} | {pct(r.get('at_eps_max'))} | {pct(r.get('near_zero'))} | "
                     f"{pct(r.get('crossed_share'))} |")
    return "\n".join(lines)


def report(workdir: Path, args, models: list[Model]) -> None:
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    summaries = [summarize_setting(n, seed_results(n, seeds, workdir)) for n in args.settings]
    records = [describe(m, workdir) for m in models if samples_of(m, workdir)]
    data = {"date": time.strftime("%Y-%m-%d %H:%M"), "eps": EPS, "schedule": SCHEDULE, "clean_tolerance":
            CLEAN_TOLERANCE, "epochs": {"std": EPOCHS_STD, "adv": EPOCHS_ADV}, "summaries": summaries,
            "models": records}
    (workdir / "study.json").write_text(json.dumps(data, indent=1, default=str))
    md = [f"# IMA study on the demo data, seeded and paired ({data['date']}, CPU)", "",
          f"Per setting: seeds in which the paper's effect held (IMA above STD under PGD at eps 5, clean "
          f"ADI at most {100 * CLEAN_TOLERANCE:g} point below STD's), was shown (that 95% interval above 0), "
          "IMA above SAT under PGD at eps 5. Differences in ADI points: mean over the seeds "
          "[95% paired-bootstrap interval of the seed-averaged per-slice difference] (min to max over the seeds).",
          "", summary_md(summaries), "", "## Every model", "", runs_md(records)]
    (workdir / "study.md").write_text("\n".join(md) + "\n")
    print("\n".join(md), flush=True)


# ---------------------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", type=Path, default=Path.home() / "nnunet_ima_study",
                   help="folder for data, runs, results, outside the repository (default ~/nnunet_ima_study)")
    p.add_argument("--seeds", type=int, default=10, help="seeds of SAT and IMA per setting (default 10)")
    p.add_argument("--first-seed", type=int, default=0, help="the first seed (default 0)")
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS),
                   help="settings, in order of priority (default: all, in the order listed)")
    p.add_argument("--jobs", type=int, default=2, help="models trained / evaluated at a time (default 2)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per job (default 1)")
    p.add_argument("--stop-at", help="HH:MM: start no new training after this local time")
    p.add_argument("--dry-run", action="store_true", help="list the models, their state and commands; run nothing")
    p.add_argument("--report", action="store_true", help="no training or evaluation: the tables of what is done")
    args = p.parse_args(argv)
    if args.seeds < 1 or args.jobs < 1 or args.threads < 1 or args.first_seed < 0:
        p.error("--seeds, --jobs and --threads must be >= 1, --first-seed >= 0")
    return args


def dry_run(models: list[Model], workdir: Path, threads: int) -> None:
    for m in models:
        done = "done" if samples_of(m, workdir) else (
            "trained" if (fold_dir(m, workdir) / "checkpoint_final.pth").exists() else "todo")
        env = train_env(m, workdir, threads)
        vars_ = " ".join(f"{k}={v}" for k, v in sorted(env.items()) if k.startswith("NNUNET_IMA_"))
        print(f"{m.name:<40} {done}\n    {vars_}")


def main(argv=None) -> int:
    args = parse_args(argv)
    workdir = args.workdir.resolve()
    models = plan_models(args.settings, list(range(args.first_seed, args.first_seed + args.seeds)))
    if args.dry_run:
        dry_run(models, workdir, args.threads)
        return 0
    raw = prepare_data(workdir)
    t0 = time.time()
    if not args.report:
        with ThreadPoolExecutor(args.jobs) as pool:  # in order: settings finish one after another
            done = list(pool.map(lambda m: run_model(m, workdir, raw, args), models))
        _say(f"{sum(done)} of {len(models)} models done; {(time.time() - t0) / 3600:.2f} h")
    report(workdir, args, models)
    return 0


if __name__ == "__main__":
    sys.exit(main())
