"""IMA's effect on nnU-Net on the demo data: which settings matter, measured (issue 13). Not a test.

From ONE standard model (``nnUNetTrainerSTD``, the demo's 30 x 12 schedule) it fine-tunes through the
real trainers (``nnunet-ima-train ... -tr nnUNetTrainerIMA / nnUNetTrainerSAT``, settings through
``NNUNET_IMA_*``, every run started from the STD checkpoint via ``NNUNET_IMA_INIT_WEIGHTS``, the
demo's 10 x 12 schedule, K=5 N=5 delta=1 eps_max=10 unless varied):

* IMA with each (``dice_reduction`` mean|max) x (``attack_samples`` correct|all): 4 settings;
* IMA with K in {2, 5, 10, 20} at N=5, at one (reduction, samples) setting (``--k-combo``; ``auto`` =
  the combo with the best PGD ADI at the middle eps among finished runs with clean ADI within 1 point
  of STD's);
* IMA with delta in {1, 2.5, 5} (eps_max/10, /4, /2) at K=5, N=5, at the same combo;
* SAT at eps 2 and at eps_max 10 (K=5), and at eps 2 with K=10;
* IMA (that combo) and SAT at eps 2 fine-tuned 30 epochs instead of 10 (is the short schedule the limit?);
* ``--replicates`` runs of each (r0, r1, ...). nnU-Net training is not seeded (sampling and
  augmentation are random), so replicates are independent runs, not seeds.

Data: the demo's (MNI152 slabs, Dataset990_MNIBrain, plans ``nnUNetPlansDemo``), built with the
demo's own builder into ``<workdir>/nnUNet_raw`` and ``nnUNet_preprocessed``. Each run has its own
``nnUNet_results`` root ``<workdir>/runs/<name>/nnUNet_results`` (nnU-Net's output folder depends only
on trainer and plans). A run is done when its ``checkpoint_final.pth`` exists; an unfinished run is
restarted from the STD model. Each finished model is attacked with ``nnunet-ima-attack`` on the
demo's 16 test slices (clean, L2 PGD-100 at eps 5, and the per-sample worst case when the
evaluation offers ``worst``). The script resumes where it stopped.

    .venv/bin/python benchmarks/study_ima.py --workdir /work/study            # run / resume everything
    .venv/bin/python benchmarks/study_ima.py --dry-run                        # list runs and commands
    .venv/bin/python benchmarks/study_ima.py --only 'IMA_max-*' STD --report  # table only, no training

Writes ``<workdir>/study.json`` (every number, per run) and ``<workdir>/study.md`` (the table and the
two target checks of issue 13).
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from nnunet_ima.demo.mni import DATASET_NAME
from nnunet_ima.demo.nnunet_data import dataset_folder_name, nnunet_command
from nnunet_ima_eval.report import read_table

DATASET_ID = 990
PLANS = "nnUNetPlansDemo"
STD, SAT, IMA = "nnUNetTrainerSTD", "nnUNetTrainerSAT", "nnUNetTrainerIMA"
SCHEDULE = {"ITERS": 12, "VAL_ITERS": 2, "K": 5, "N": 5, "DELTA": 1.0, "EPS_MAX": 10.0}
EPOCHS_STD, EPOCHS_ADV = 30, 10
COMBOS = [("mean", "correct"), ("mean", "all"), ("max", "correct"), ("max", "all")]
K_SWEEP = (2, 5, 10, 20)
# the expansion step at eps_max 10: the demo's 1 (eps_max/10), the trainers' default rule eps_max/4, and eps_max/2
# (the paper chose delta by a grid search on validation data: 5/20, 2/15, 10/40 on its three tasks)
DELTA_SWEEP = (1.0, 2.5, 5.0)
SAT_K = (10,)  # SAT at the small eps also with these K: IMA at K=10 is compared with a SAT of the same K
LONG_EPOCHS = (30,)  # IMA (the K sweep's combo, K=5) and SAT at the small eps fine-tuned 3x longer
SAT_EPS = (2.0, 10.0)
NEAR_ZERO = 0.5  # a margin below this (half of delta) counts as "near 0"


def _say(msg: str) -> None:
    print(f"[study {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------------------------------------- runs
@dataclass
class Run:
    """One training run: ``name`` (folder under runs/), trainer, extra NNUNET_IMA_* settings."""

    name: str
    trainer: str
    settings: dict = field(default_factory=dict)
    replicate: int | None = None
    group: str = ""  # the setting without the replicate suffix

    def root(self, workdir: Path) -> Path:
        return workdir / "runs" / self.name


def combo_name(reduction: str, samples: str, k: int | None = None, delta: float | None = None) -> str:
    return (f"IMA_{reduction}-{samples}" + (f"_K{k}" if k is not None and k != SCHEDULE["K"] else "") +
            (f"_D{delta:g}" if delta is not None and delta != SCHEDULE["DELTA"] else ""))


def replicate_runs(r: int) -> list[Run]:
    """The K=5 settings of replicate ``r`` in order of value: Algorithm 1 as we read it (mean, correct),
    the authors' code (max, all), SAT at eps_max, the two mixed settings, SAT at the small eps."""
    def ima(red, samp):
        g = combo_name(red, samp)
        return Run(f"{g}_r{r}", IMA, {"DICE_REDUCTION": red, "ATTACK_SAMPLES": samp}, r, g)

    def sat(eps):
        return Run(f"SAT_eps{eps:g}_r{r}", SAT, {"SAT_EPS": eps}, r, f"SAT_eps{eps:g}")

    return [ima("mean", "correct"), ima("max", "all"), sat(SAT_EPS[1]), ima("max", "correct"), ima("mean", "all"),
            sat(SAT_EPS[0])]


def plan_runs(replicates: int, k_combo: tuple[str, str]) -> list[Run]:
    """Every run of the study in order of value: STD; r0 of the combos and SATs; r1 ...; the K sweep;
    the delta sweep (both at the K sweep's combo); SAT at the small eps with the K of ``SAT_K``; IMA and
    SAT at the small eps with the longer fine-tuning of ``LONG_EPOCHS``."""
    runs = [Run("STD", STD, group="STD")]
    for r in range(replicates):
        runs += replicate_runs(r)
    red, samp = k_combo
    for r in range(replicates):
        for k in K_SWEEP:
            if k == SCHEDULE["K"]:
                continue  # K=5 is the combo run itself
            g = combo_name(red, samp, k)
            runs.append(Run(f"{g}_r{r}", IMA, {"DICE_REDUCTION": red, "ATTACK_SAMPLES": samp, "K": k}, r, g))
    for r in range(replicates):
        for d in DELTA_SWEEP:
            if d == SCHEDULE["DELTA"]:
                continue  # delta 1 is the combo run itself
            g = combo_name(red, samp, delta=d)
            runs.append(Run(f"{g}_r{r}", IMA, {"DICE_REDUCTION": red, "ATTACK_SAMPLES": samp, "DELTA": d}, r, g))
    for r in range(replicates):
        for k in SAT_K:
            g = f"SAT_eps{SAT_EPS[0]:g}_K{k}"
            runs.append(Run(f"{g}_r{r}", SAT, {"SAT_EPS": SAT_EPS[0], "K": k}, r, g))
    for r in range(replicates):
        for e in LONG_EPOCHS:
            g = f"{combo_name(red, samp)}_E{e}"
            runs.append(Run(f"{g}_r{r}", IMA, {"DICE_REDUCTION": red, "ATTACK_SAMPLES": samp, "EPOCHS": e}, r, g))
            g = f"SAT_eps{SAT_EPS[0]:g}_E{e}"
            runs.append(Run(f"{g}_r{r}", SAT, {"SAT_EPS": SAT_EPS[0], "EPOCHS": e}, r, g))
    return runs


def select(runs: list[Run], only: list[str] | None) -> list[Run]:
    if not only:
        return runs
    return [r for r in runs if any(fnmatch.fnmatch(r.name, p) or fnmatch.fnmatch(r.group, p) for p in only)]


# ---------------------------------------------------------------------------------------- nnU-Net I/O
def base_env(workdir: Path) -> dict:
    """Environment without any inherited NNUNET_IMA_* (an unknown one is an error in the trainers)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NNUNET_IMA_")}
    env.update(nnUNet_raw=str(workdir / "nnUNet_raw"), nnUNet_preprocessed=str(workdir / "nnUNet_preprocessed"),
               nnUNet_compile="false", nnUNet_def_n_proc="1")
    return env


def prepare_data(workdir: Path) -> Path:
    """Build the demo dataset and plans exactly as ``nnunet-ima demo`` does; returns the raw folder."""
    from nnunet_ima.demo.runner import build_dataset, plan, write_demo_plans

    env = base_env(workdir)
    for var in ("nnUNet_raw", "nnUNet_preprocessed"):
        Path(env[var]).mkdir(parents=True, exist_ok=True)
    raw = build_dataset(env, DATASET_ID, 3.0, 4)
    (workdir / "logs").mkdir(exist_ok=True)
    plan(env, DATASET_ID, raw, workdir / "logs")  # skipped when nnU-Net's plans exist
    if not (Path(env["nnUNet_preprocessed"]) / raw.name / f"{PLANS}.json").exists():
        write_demo_plans(env, DATASET_ID, [8, 16, 32, 64, 128], 8)
    return raw


def fold_dir(run: Run, workdir: Path) -> Path:
    name = dataset_folder_name(DATASET_ID, DATASET_NAME)
    return run.root(workdir) / "nnUNet_results" / name / f"{run.trainer}__{PLANS}__2d" / "fold_0"


def train_env(run: Run, workdir: Path, std_ckpt: Path) -> dict:
    env = base_env(workdir)
    env["nnUNet_results"] = str(run.root(workdir) / "nnUNet_results")
    sched = {**SCHEDULE, "EPOCHS": EPOCHS_STD if run.trainer == STD else EPOCHS_ADV, **run.settings}
    if run.trainer != STD:
        sched["INIT_WEIGHTS"] = str(std_ckpt)
    env.update({f"NNUNET_IMA_{k}": f"{v:g}" if isinstance(v, float) else str(v) for k, v in sched.items()})
    return env


def train_command(run: Run) -> list[str]:
    cmd = nnunet_command("nnunet-ima-train")
    return cmd + [str(DATASET_ID), "2d", "0", "-tr", run.trainer, "-p", PLANS, "-device", "cpu"]


def _children_cpu() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def train(run: Run, workdir: Path, std_ckpt: Path) -> bool:
    """Train one run from scratch (an unfinished folder is cleared); True when it finished."""
    folder = fold_dir(run, workdir)
    if folder.exists():
        for f in folder.iterdir():  # a partial run: start again from the STD model
            if f.is_file():
                f.unlink()
    log = workdir / "logs" / f"train_{run.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    _say(f"training {run.name} ({run.trainer} {run.settings}); log {log}")
    t0, cpu0 = time.time(), _children_cpu()
    with open(log, "w") as fh:
        rc = subprocess.call(train_command(run), env=train_env(run, workdir, std_ckpt), stdout=fh,
                             stderr=subprocess.STDOUT)
    ok = rc == 0 and (folder / "checkpoint_final.pth").exists()
    if ok:  # CPU seconds of the whole training process (start-up and final validation included)
        (run.root(workdir) / "train_cpu.json").write_text(json.dumps(
            {"cpu_s": _children_cpu() - cpu0, "wall_s": time.time() - t0}))
    _say(f"{run.name}: {'finished' if ok else f'FAILED (exit {rc}), see {log}'} in {(time.time() - t0) / 60:.1f} min")
    return ok


# ---------------------------------------------------------------------------------------- evaluation
def attack_command(run: Run, workdir: Path, raw: Path, eps: float, worst_of: list[str]) -> list[str]:
    attacks = ["pgd"] + [a for a in worst_of if a != "pgd"] + ["worst"]
    return nnunet_command("nnunet-ima-attack") + [
        "-d", str(DATASET_ID), "-c", "2d", "-f", "0", "-p", PLANS, "-tr", run.trainer,
        "-i", str(raw / "imagesTs"), "-l", str(raw / "labelsTs"), "--eps", f"{eps:g}",
        "--attacks", *attacks, "--pgd-steps", "100", "-o", str(run.root(workdir) / "eval"), "--device", "cpu",
        "--quiet", "--no-sanity"]


def adi_table(out: Path) -> dict:
    """{(attack, eps): mean-over-classes ADI} of one eval folder; clean under key ("clean", 0.0)."""
    table = {}
    for row in read_table(out):  # [] when the folder holds no results
        if row.get("class") != "mean" or row.get("adi") in (None, ""):
            continue
        eps, adi = float(row["eps"]), float(row["adi"])
        attack = "clean" if row["attack"] == "clean" or eps == 0.0 else row["attack"]
        table[(attack, 0.0 if attack == "clean" else eps)] = adi
    return table


def start_evaluation(run: Run, workdir: Path, raw: Path, args):
    """Start ``nnunet-ima-attack`` on a finished run in the background (it overlaps the next training);
    returns the process, or None when the eval folder already holds clean and PGD rows. The clean row
    is always computed; eps 0 is not passed (it would run a full PGD-100 at eps 0)."""
    table = adi_table(run.root(workdir) / "eval")
    if ("clean", 0.0) in table and ("pgd", args.eps) in table:
        return None
    env = base_env(workdir)
    env["nnUNet_results"] = str(run.root(workdir) / "nnUNet_results")
    log = workdir / "logs" / f"eval_{run.name}.log"
    _say(f"evaluating {run.name}; log {log}")
    with open(log, "w") as fh:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(attack_command(run, workdir, raw, args.eps, args.worst_of), env=env,
                                stdout=fh, stderr=subprocess.STDOUT)


def finish_evaluation(run: Run, proc, workdir: Path, eps: float) -> dict:
    """Wait for the run's evaluation (if any) and return its record."""
    if proc is not None and proc.wait():
        _say(f"{run.name}: evaluation FAILED (exit {proc.returncode}), see {workdir / 'logs' / f'eval_{run.name}.log'}")
    return describe(run, workdir, adi_table(run.root(workdir) / "eval"), eps)


# ---------------------------------------------------------------------------------------- training logs
_EPOCH_TIME = re.compile(r"Epoch time: ([0-9.]+) s")
_IMA_LINE = re.compile(r"IMA: (\d+)/(\d+) samples.*?(\d+) crossed")


def training_log(folder: Path) -> str:
    logs = sorted(folder.glob("training_log_*.txt"))
    return logs[-1].read_text(errors="replace") if logs else ""


def seconds_per_iter(text: str) -> float | None:
    """Shortest epoch time (first epoch left out: start-up) / iterations per epoch: on a shared machine
    load only ever adds time, so the least disturbed epoch is the best estimate of the cost. Includes
    the 2 validation iterations and the checkpoint of each epoch, as nnU-Net's epoch time does."""
    times = [float(t) for t in _EPOCH_TIME.findall(text)]
    times = times[1:] if len(times) > 1 else times
    return min(times) / SCHEDULE["ITERS"] if times else None


def cpu_per_iter(run: Run, workdir: Path) -> float | None:
    """CPU seconds of the training process / training iterations (None if not recorded)."""
    path = run.root(workdir) / "train_cpu.json"
    if not path.exists():
        return None
    epochs = run.settings.get("EPOCHS", EPOCHS_STD if run.trainer == STD else EPOCHS_ADV)
    return json.loads(path.read_text())["cpu_s"] / (epochs * SCHEDULE["ITERS"])


def last_ima_epoch(text: str) -> dict:
    """Attacked / samples / crossed of the last epoch's IMA line (empty for STD and SAT)."""
    hits = _IMA_LINE.findall(text)
    if not hits:
        return {}
    attacked, samples, crossed = (int(v) for v in hits[-1])
    return {"attacked": attacked, "samples": samples, "crossed": crossed,
            "crossed_share": crossed / attacked if attacked else None}


def margin_summary(ckpt: Path) -> dict:
    """Share of margins at eps_max and near 0 (< NEAR_ZERO) from the checkpoint's ``ima_margins``."""
    import torch

    state = torch.load(ckpt, map_location="cpu", weights_only=False).get("ima_margins")
    if not state or not state["margins"].numel():
        return {}
    m = state["margins"].double()
    return {"n_margins": int(m.numel()), "at_eps_max": float((m >= state["eps_max"] - 1e-9).double().mean()),
            "near_zero": float((m < NEAR_ZERO).double().mean()), "margin_median": float(m.median())}


def describe(run: Run, workdir: Path, table: dict, eps: float) -> dict:
    folder = fold_dir(run, workdir)
    text = training_log(folder)
    rec = {"name": run.name, "group": run.group, "replicate": run.replicate, "trainer": run.trainer,
           "settings": run.settings, "clean_adi": table.get(("clean", 0.0)), "pgd_adi": table.get(("pgd", eps)),
           "worst_adi": table.get(("worst", eps)), "s_per_iter": seconds_per_iter(text),
           "cpu_s_per_iter": cpu_per_iter(run, workdir)}
    rec.update(last_ima_epoch(text))
    if run.trainer == IMA:
        rec.update(margin_summary(folder / "checkpoint_final.pth"))
    return rec


# ---------------------------------------------------------------------------------------- report
def _pct(v) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"


def _num(v, fmt="{:.2f}") -> str:
    return "—" if v is None else fmt.format(v)


def table_md(records: list[dict], eps: float, not_done: list[str]) -> str:
    lines = [f"| run | clean ADI | PGD ADI eps {eps:g} | worst eps {eps:g} | s/iter | CPU s/iter | at eps_max % "
             f"| near 0 % | crossed % (last epoch) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['name']} | {_pct(r['clean_adi'])} | {_pct(r['pgd_adi'])} | {_pct(r['worst_adi'])} | "
                     f"{_num(r['s_per_iter'])} | {_num(r.get('cpu_s_per_iter'))} | {_pct(r.get('at_eps_max'))} | "
                     f"{_pct(r.get('near_zero'))} | "
                     f"{_pct(r.get('crossed_share'))} |")
    if not_done:
        lines.append(f"\nNot done: {', '.join(not_done)}")
    return "\n".join(lines)


def summary_md(records: list[dict], eps: float, reference_sat: str = f"SAT_eps{SAT_EPS[0]:g}") -> str:
    """One row per setting over its replicates: mean (min to max) of clean and PGD ADI, their differences
    to STD and PGD's to the mean of ``reference_sat`` (SAT at the small eps: STD's clean ADI), CPU s/iter."""
    groups = by_group(records)
    std = groups.get("STD", {}).get(None)
    ref = [r["pgd_adi"] for r in groups.get(reference_sat, {}).values() if r["pgd_adi"] is not None]
    if not std or std["pgd_adi"] is None:
        return "(no summary: STD not evaluated)"
    ref_mean = statistics.mean(ref) if ref else None

    def span(values, shift=0.0):
        v = [100 * (x - shift) for x in values]
        return f"{statistics.mean(v):+.1f} ({min(v):+.1f} to {max(v):+.1f})" if shift else \
            f"{statistics.mean(v):.1f} ({min(v):.1f} to {max(v):.1f})"

    lines = [f"| setting | n | clean ADI | clean − STD | PGD ADI eps {eps:g} | PGD − STD | PGD − {reference_sat} (mean) "
             f"| CPU s/iter |", "|---|---|---|---|---|---|---|---|"]
    for g, reps in groups.items():
        rows = [r for r in reps.values() if r["pgd_adi"] is not None and r["clean_adi"] is not None]
        if g == "STD" or not rows:
            continue
        clean, pgd = [r["clean_adi"] for r in rows], [r["pgd_adi"] for r in rows]
        cpu = [r["cpu_s_per_iter"] for r in rows if r.get("cpu_s_per_iter")]
        lines.append(f"| {g} | {len(rows)} | {span(clean)} | {span(clean, std['clean_adi'])} | {span(pgd)} | "
                     f"{span(pgd, std['pgd_adi'])} | {span(pgd, ref_mean) if ref_mean is not None else '—'} | "
                     f"{_num(statistics.mean(cpu) if cpu else None)} |")
    return "\n".join(lines)


def by_group(records: list[dict]) -> dict:
    groups: dict = {}
    for r in records:
        groups.setdefault(r["group"], {})[r["replicate"]] = r
    return groups


def _replicate_check(r: dict | None, std: dict, sats: dict, i: int) -> dict:
    """Target (a) on one replicate: gains over STD and over each SAT setting of the same replicate."""
    sats = {g: x for g, x in sats.items() if x["pgd_adi"] is not None}
    if r is None or r["pgd_adi"] is None or not sats:
        return {"replicate": i, "ok": False, "ok_equal_clean": False, "why": "not done"}
    gain_std, clean_gap = r["pgd_adi"] - std["pgd_adi"], r["clean_adi"] - std["clean_adi"]
    over_sat = {g: r["pgd_adi"] - x["pgd_adi"] for g, x in sats.items()}
    # SAT settings at equal clean ADI (within 1 point of STD's); all of them when none is
    equal = [g for g, x in sats.items() if abs(x["clean_adi"] - std["clean_adi"]) <= 0.01] or list(sats)
    base = gain_std >= 0.05 and abs(clean_gap) <= 0.01
    return {"replicate": i, "gain_over_std": gain_std, "gain_over_sat": over_sat, "clean_minus_std": clean_gap,
            "sat_at_equal_clean": equal, "ok": base and min(over_sat.values()) >= 0.01,
            "ok_equal_clean": base and min(over_sat[g] for g in equal) >= 0.01}


def check_a(records: list[dict], replicates: int) -> dict:
    """Target (a): an IMA setting whose PGD ADI beats STD's by >= 5 points and SAT's by >= 1, with clean
    ADI within 1 point of STD's, on every replicate. ``met``: beats every SAT setting of the same
    replicate; ``met_equal_clean``: beats the SAT settings whose clean ADI is also within 1 point of STD's."""
    groups = by_group(records)
    std = groups.get("STD", {}).get(None)
    if not std or std["pgd_adi"] is None:
        return {"met": False, "why": "STD not evaluated", "settings": {}}
    out = {}
    for g, reps in groups.items():
        if g.startswith("IMA"):
            rows = [_replicate_check(reps.get(i), std, {s: groups[s][i] for s in groups if s.startswith("SAT")
                                                        and i in groups[s]}, i) for i in range(replicates)]
            out[g] = {"replicates": rows, "met": all(x["ok"] for x in rows),
                      "met_equal_clean": all(x["ok_equal_clean"] for x in rows)}
    return {"met": any(v["met"] for v in out.values()),
            "met_equal_clean": any(v["met_equal_clean"] for v in out.values()), "settings": out}


def check_b(records: list[dict], k_combo: tuple[str, str]) -> dict:
    """Target (b): the cheapest K whose mean gain over STD is within the replicate spread of K=20's."""
    groups = by_group(records)
    std = groups.get("STD", {}).get(None)
    per_k = {}
    for k in K_SWEEP:
        reps = [r for r in groups.get(combo_name(*k_combo, k), {}).values() if r["pgd_adi"] is not None]
        if reps and std:
            gains = [r["pgd_adi"] - std["pgd_adi"] for r in reps]
            cost = [r["s_per_iter"] for r in reps if r["s_per_iter"]]
            per_k[k] = {"gains": gains, "mean_gain": statistics.mean(gains), "spread": max(gains) - min(gains),
                        "s_per_iter": statistics.mean(cost) if cost else None, "replicates": len(gains)}
    if 20 not in per_k:
        return {"met": False, "why": "K=20 not done", "per_k": per_k}
    spreads = [v["spread"] for v in per_k.values() if v["replicates"] > 1]
    spread = max(spreads) if spreads else None
    if spread is None:
        return {"met": False, "why": "no K setting has two replicates: no spread", "per_k": per_k}
    ok = [k for k in sorted(per_k) if per_k[k]["mean_gain"] >= per_k[20]["mean_gain"] - spread]
    k = ok[0]
    ratio = (per_k[k]["s_per_iter"] / per_k[20]["s_per_iter"]
             if per_k[k]["s_per_iter"] and per_k[20]["s_per_iter"] else None)
    return {"met": True, "cheapest_k": k, "spread": spread, "cost_ratio_to_k20": ratio, "per_k": per_k}


def auto_k_combo(records: list[dict]) -> tuple[str, str] | None:
    """The combo with the best mean PGD ADI over finished K=5 runs, clean ADI within 1 point of STD."""
    groups = by_group(records)
    std = groups.get("STD", {}).get(None)
    best = None
    for red, samp in COMBOS:
        reps = [r for r in groups.get(combo_name(red, samp), {}).values() if r["pgd_adi"] is not None]
        if not reps or not std or std["clean_adi"] is None:
            continue
        if statistics.mean(r["clean_adi"] for r in reps) < std["clean_adi"] - 0.01:
            continue
        score = statistics.mean(r["pgd_adi"] for r in reps)
        if best is None or score > best[0]:
            best = (score, (red, samp))
    return best[1] if best else None


def report(workdir: Path, records: list[dict], not_done: list[str], args, k_combo) -> None:
    a, b = check_a(records, args.replicates), check_b(records, k_combo)
    data = {"date": time.strftime("%Y-%m-%d %H:%M"), "eps": args.eps, "schedule": SCHEDULE,
            "epochs": {"std": EPOCHS_STD, "adv": EPOCHS_ADV}, "near_zero_below": NEAR_ZERO,
            "k_combo": list(k_combo), "runs": records, "not_done": not_done, "target_a": a, "target_b": b}
    (workdir / "study.json").write_text(json.dumps(data, indent=2, default=str))
    md = [f"# IMA study on the demo data ({data['date']}, CPU, 2 cores shared with other jobs)", "",
          "ADI in %, mean over grey and white matter, 16 test slices; PGD = L2 PGD-100. s/iter = shortest "
          f"epoch time / {SCHEDULE['ITERS']} iterations (wall; includes validation and checkpointing; the "
          "machine's load varies, the shortest epoch is the least disturbed). Margins: last "
          f"checkpoint; near 0 = below {NEAR_ZERO}. Replicates r0, r1 are unseeded repeats.", "",
          table_md(records, args.eps, not_done), "", "## Per setting, over its replicates",
          "mean (min to max), ADI in %; differences in points", "", summary_md(records, args.eps), "",
          "## Target (a)", _fmt_a(a), "",
          "## Target (b)", _fmt_b(b, k_combo)]
    (workdir / "study.md").write_text("\n".join(md) + "\n")
    print("\n".join(md), flush=True)


def _fmt_a(a: dict) -> str:
    if "why" in a:
        return f"not judged: {a['why']}"
    if not a["settings"]:
        return "not judged: no IMA run evaluated"
    lines = [f"met (beats every SAT setting): {a['met']}; met against the SAT settings at equal clean ADI: "
             f"{a['met_equal_clean']}"]
    for g, v in a["settings"].items():
        parts = []
        for x in v["replicates"]:
            if "why" in x:
                parts.append(f"r{x['replicate']}: not done")
                continue
            sat = ", ".join(f"{100 * d:+.1f} vs {s}" for s, d in x["gain_over_sat"].items())
            parts.append(f"r{x['replicate']}: {100 * x['gain_over_std']:+.1f} vs STD, {sat}, clean "
                         f"{100 * x['clean_minus_std']:+.1f} vs STD")
        verdict = "MET" if v["met"] else "met at equal clean ADI" if v["met_equal_clean"] else "not met"
        lines.append(f"- {g}: {verdict} ({'; '.join(parts)})")
    return "\n".join(lines)


def _fmt_b(b: dict, k_combo) -> str:
    lines = [f"K sweep at {combo_name(*k_combo)} (N={SCHEDULE['N']}):"]
    for k, v in sorted(b.get("per_k", {}).items()):
        lines.append(f"- K={k}: gain over STD {', '.join(f'{100 * g:+.1f}' for g in v['gains'])} "
                     f"(mean {100 * v['mean_gain']:+.1f}), s/iter {_num(v['s_per_iter'])}")
    if b.get("met"):
        lines.append(f"cheapest K within the replicate spread ({100 * b['spread']:.1f} points) of K=20: "
                     f"K={b['cheapest_k']}, cost ratio to K=20 {_num(b['cost_ratio_to_k20'])}")
    else:
        lines.append(f"not judged: {b.get('why')}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", type=Path, default=Path.home() / "nnunet_ima_study",
                   help="folder for data, runs, results, outside the repository (default ~/nnunet_ima_study)")
    p.add_argument("--only", nargs="+", help="run names or groups (shell patterns), e.g. STD 'IMA_max-*_r0'")
    p.add_argument("--replicates", type=int, default=2, help="unseeded repeats of each setting (default 2)")
    p.add_argument("--k-combo", default="auto", help="reduction-samples of the K sweep, e.g. max-all, or auto "
                   "(best finished combo; default)")
    p.add_argument("--eps", type=float, default=5.0, help="L2 eps of the evaluation (default 5, the demo's middle)")
    p.add_argument("--worst-of", nargs="+", default=["pgd", "ifgsm"],
                   help="attacks whose per-sample minimum is 'worst' (when nnunet-ima-attack has it)")
    p.add_argument("--stop-at", help="HH:MM: start no new training after this local time")
    p.add_argument("--dry-run", action="store_true", help="list runs, their state and commands; run nothing")
    p.add_argument("--report", action="store_true", help="no training: evaluate finished runs and print the table")
    args = p.parse_args(argv)
    if args.replicates < 1:
        p.error("--replicates must be >= 1")
    return args


def resolve_k_combo(args, records: list[dict]) -> tuple[str, str]:
    if args.k_combo != "auto":
        red, _, samp = args.k_combo.partition("-")
        if (red, samp) not in COMBOS:
            raise SystemExit(f"--k-combo {args.k_combo!r}: expected one of {['-'.join(c) for c in COMBOS]} or auto")
        return red, samp
    return auto_k_combo(records) or ("mean", "correct")


def past(stop_at: str | None) -> bool:
    return bool(stop_at) and time.strftime("%H:%M") >= stop_at


def dry_run(runs: list[Run], workdir: Path) -> None:
    std_ckpt = fold_dir(runs[0], workdir) / "checkpoint_final.pth"
    for run in runs:
        done = (fold_dir(run, workdir) / "checkpoint_final.pth").exists()
        env = train_env(run, workdir, std_ckpt)
        vars_ = " ".join(f"{k}={v}" for k, v in sorted(env.items()) if k.startswith(("NNUNET_IMA_", "nnUNet_results")))
        print(f"{run.name:<24} {'done' if done else 'todo'}\n    {vars_} {' '.join(train_command(run))}")


def process(runs: list[Run], workdir: Path, raw: Path, args, records: dict, not_done: list) -> None:
    """Train (when allowed) each run in order, one training at a time; each finished run's evaluation
    runs in the background during the next training (at most one evaluation at a time)."""
    std_ckpt = fold_dir(Run("STD", STD), workdir) / "checkpoint_final.pth"
    evaluating = None  # (run, process)
    for run in runs:
        ckpt = fold_dir(run, workdir) / "checkpoint_final.pth"
        may_train = not args.report and not past(args.stop_at) and (run.trainer == STD or std_ckpt.exists())
        if not ckpt.exists() and may_train:
            train(run, workdir, std_ckpt)
        if not ckpt.exists():
            not_done.append(run.name)
            continue
        if evaluating:
            records[evaluating[0].name] = finish_evaluation(*evaluating, workdir, args.eps)
        evaluating = (run, start_evaluation(run, workdir, raw, args))
    if evaluating:
        records[evaluating[0].name] = finish_evaluation(*evaluating, workdir, args.eps)


def main(argv=None) -> int:
    args = parse_args(argv)
    workdir = args.workdir.resolve()
    n_first = 1 + 6 * args.replicates  # STD, then per replicate 4 combos and 2 SATs
    if args.dry_run:
        k_combo = resolve_k_combo(args, [])
        dry_run(select(plan_runs(args.replicates, k_combo), args.only), workdir)
        return 0
    raw = prepare_data(workdir)
    records: dict = {}
    not_done: list = []
    process(select(plan_runs(args.replicates, ("mean", "correct"))[:n_first], args.only), workdir, raw, args,
            records, not_done)
    k_combo = resolve_k_combo(args, list(records.values()))
    _say(f"K sweep at {combo_name(*k_combo)}")
    process(select(plan_runs(args.replicates, k_combo)[n_first:], args.only), workdir, raw, args, records,
            not_done)
    report(workdir, list(records.values()), not_done, args, k_combo)
    return 0


if __name__ == "__main__":
    sys.exit(main())
