"""The demo's plain-words verdict on its robustness table.

The table comes from ``nnunet-ima-attack``'s output folder, read through the evaluation's own
report module (:func:`nnunet_ima_eval.report.read_table`), so this file knows no CSV columns. The
paper's effect is judged under PGD (the papers' protocol): IMA's ADI above STD's at the middle
noise levels, with IMA's clean ADI at most :data:`CLEAN_TOLERANCE` below STD's. The per-sample
worst case over every attack run (``worst``, AutoAttack's reporting) is printed beside it and
said in words, but not judged: it is the stricter reading a reviewer would ask for.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

TRAINERS = ("nnUNetTrainerSTD", "nnUNetTrainerSAT", "nnUNetTrainerIMA")
CLEAN_TOLERANCE = 0.05  # IMA's clean ADI may be this much below STD's and still count as "close"
LABELS = {"pgd": "PGD", "worst": "worst case"}


def say(msg: str) -> None:
    print(f"[nnunet-ima demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


@dataclass
class Comparison:
    """STD vs IMA (and SAT) under one attack at the middle noise levels."""

    attack: str
    lines: list[str] = field(default_factory=list)        # one printed line per eps
    ima_above_std: dict = field(default_factory=dict)     # eps -> IMA's ADI > STD's
    ima_vs_sat: list[str] = field(default_factory=list)   # "2: above", "5: not above"


def mean_adi(out: Path) -> dict:
    """{(model, attack, eps): ADI over foreground classes} of an ``nnunet-ima-attack`` folder."""
    from nnunet_ima_eval.report import read_table

    return {(r["model"], r["attack"], r["eps"]): r["adi"] for r in read_table(out) if r["class"] == "mean"}


def middle_eps(eps: list[float]) -> list[float]:
    """The noise levels the verdict judges: every eps > 0 but the largest (all of them if only one)."""
    positive = sorted(e for e in eps if e > 0)
    return positive[:-1] or positive


def clean_adi(adi: dict, model: str):
    """A model's clean ADI: the "clean" row, else the PGD row at eps 0 (older result folders)."""
    return adi.get((model, "clean", 0.0), adi.get((model, "pgd", 0.0)))


def compare(adi: dict, attack: str, mids: list[float]) -> Comparison:
    std, sat, ima = TRAINERS
    cmp = Comparison(attack)
    for e in mids:
        a, b, c = adi.get((std, attack, e)), adi.get((ima, attack, e)), adi.get((sat, attack, e))
        if a is None or b is None:
            continue
        cmp.ima_above_std[e] = b > a
        sat_text = f" (SAT {c:.3f})" if c is not None else ""
        cmp.lines.append(f"{LABELS.get(attack, attack)} eps={e:g}: ADI STD {a:.3f} vs IMA {b:.3f}{sat_text}")
        if c is not None:
            cmp.ima_vs_sat.append(f"{e:g}: {'above' if b > c else 'not above'}")
    return cmp


def judge_paper_effect(pgd: Comparison, clean: tuple) -> str:
    """The verdict sentence: the paper's effect shown in full, or not (and what would get closer)."""
    close = None not in clean and clean[0] - clean[1] < CLEAN_TOLERANCE
    if all(pgd.ima_above_std.values()) and close:
        return (f"shows the paper's effect: IMA is more robust at the middle noise levels with clean ADI close "
                f"(STD {clean[0]:.3f}, IMA {clean[1]:.3f})")
    return ("this short run does NOT show the paper's effect in full (see the lines above); a longer schedule "
            "(--epochs-adv, --k, --n, or --paper on a GPU) is closer to the paper")


def describe_worst(worst: Comparison) -> str:
    """One sentence on the per-sample worst case over all attacks (reported, not judged)."""
    where = ", ".join(f"{e:g}: {'above' if up else 'not above'}" for e, up in worst.ima_above_std.items())
    return f"worst case per sample over all attacks: IMA vs STD at eps {where}"


def verdict(out: Path, eps: list[float]) -> None:
    """Say honestly whether the table in ``out`` shows the paper's effect (see the module docstring)."""
    adi = mean_adi(Path(out))
    if not adi:
        say(f"no results in {out}; cannot judge the effect")
        return
    mids = middle_eps(eps)
    pgd, worst = compare(adi, "pgd", mids), compare(adi, "worst", mids)
    if not pgd.lines:
        say("could not find the ADI rows needed to judge the effect")
        return
    for line in pgd.lines + worst.lines:
        say(line)
    std, _, ima = TRAINERS
    say(judge_paper_effect(pgd, (clean_adi(adi, std), clean_adi(adi, ima))))
    if pgd.ima_vs_sat:  # the paper also finds IMA above SAT; reported, not judged (a short run rarely separates them)
        say(f"IMA vs SAT under PGD at eps {', '.join(pgd.ima_vs_sat)}")
    if worst.lines:
        say(describe_worst(worst))
