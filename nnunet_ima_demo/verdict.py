"""The demo's plain-words verdict, with an honest interval.

The figures come from ``nnunet-ima-attack``'s output folders, read through the evaluation's own
reader of per-sample Dice (:func:`nnunet_ima_eval.report.read_sample_dice`), so this file knows no
CSV columns. Every difference IMA − STD and IMA − SAT (clean, and under PGD and in the per-sample
worst case at each ε) is the mean over the test slices of the per-slice difference in Dice, with a
95 % interval from a paired bootstrap over the slices (:func:`paired_bootstrap`): the models were
evaluated on the same slices, so each slice's difference is one observation. An interval that
includes 0 is "not distinguishable at this size".

The paper's effect *holds* on a run (one seed) when IMA's PGD ADI is above STD's at the middle ε
(:func:`middle_eps`: 5 of the demo's 2, 5, 10) and IMA's clean ADI is at most :data:`CLEAN_TOLERANCE`
below STD's; it is *shown* when, besides, that PGD interval lies above 0. The worst case (AutoAttack's reporting) and IMA − SAT
are reported beside it, not judged. With ``--repeats N`` (N seeds of SAT and IMA from one STD) the
verdict gives the mean and range of each difference over the seeds and the number of seeds in which
the effect held.

:data:`CLEAN_TOLERANCE` is the one tolerance of the demo, the study (``benchmarks/study_ima.py``)
and README: 1 point of ADI. The paper's IMA loses no clean Dice on its three nnU-Net tasks (it gains
0.8 to 10 points, Tables 6-8), so "robust at equal clean accuracy" is the claim; 1 point is about
the smallest clean difference 16 test slices can resolve (README's intervals), and a looser one (the
earlier 5 points) let a model 2.5 points worse count as "close".
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

TRAINERS = ("nnUNetTrainerSTD", "nnUNetTrainerSAT", "nnUNetTrainerIMA")
CLEAN_TOLERANCE = 0.01  # IMA's clean ADI may be this much below STD's for the effect to hold (1 point)
LEVEL = 0.95            # the intervals' confidence level
RESAMPLES = 10000       # bootstrap resamples of the test slices (seeded: the verdict is reproducible)
BOOTSTRAP_SEED = 0
LABELS = {"clean": "clean", "pgd": "PGD", "worst": "worst case"}
UNCLEAR = "not distinguishable at this size"


def say(msg: str) -> None:
    print(f"[nnunet-ima demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


@dataclass(frozen=True)
class Difference:
    """Mean paired difference (a − b, Dice units) over ``n`` samples and its bootstrap interval."""

    mean: float
    lo: float
    hi: float
    n: int

    @property
    def word(self) -> str:
        """"above" / "below" when the interval excludes 0, else :data:`UNCLEAR`."""
        return "above" if self.lo > 0 else "below" if self.hi < 0 else UNCLEAR

    def text(self) -> str:
        """'+1.7 points (95% CI +0.9 to +2.5)'."""
        return (f"{100 * self.mean:+.1f} points ({100 * LEVEL:.0f}% CI {100 * self.lo:+.1f} to "
                f"{100 * self.hi:+.1f})")


def paired_bootstrap(a, b, resamples: int = RESAMPLES, level: float = LEVEL, seed: int = BOOTSTRAP_SEED) -> Difference:
    """Mean of a − b over paired samples with the percentile interval of a paired bootstrap: the
    samples (pairs) are drawn with replacement ``resamples`` times, the mean difference of each draw
    computed, and the interval is the central ``level`` of those means. Pairs with a NaN (samples an
    ADI convention skips) are left out. ``a``, ``b``: (N,) per-sample Dice of two models on the same
    samples, in the same order.

    >>> d = paired_bootstrap([0.9] * 10, [0.9] * 9 + [0.8])
    >>> round(d.mean, 3), round(d.lo, 3), round(d.hi, 3)
    (0.01, 0.0, 0.03)
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired samples needed, got {a.shape} and {b.shape}")
    d = (a - b)[~(np.isnan(a) | np.isnan(b))]
    if not d.size:
        return Difference(float("nan"), float("nan"), float("nan"), 0)
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, size=(resamples, d.size))].mean(1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return Difference(float(d.mean()), float(lo), float(hi), int(d.size))


def middle_eps(eps: list[float]) -> list[float]:
    """The noise level the verdict judges, as a one-element list: the middle one of the positive levels
    (the median; the upper one of an even count), as the evaluation's strength checks choose it: 5 of 2, 5, 10."""
    positive = sorted(e for e in eps if e > 0)
    return positive[len(positive) // 2:][:1]


def columns(eps: list[float]) -> list[tuple[str, float]]:
    """(attack, eps) of every reported difference: clean, then PGD and worst case at each eps > 0."""
    positive = sorted(e for e in eps if e > 0)
    return [("clean", 0.0)] + [(a, e) for a in ("pgd", "worst") for e in positive]


def differences(samples: dict, eps: list[float]) -> dict:
    """{(other, attack, eps): Difference of IMA − other} for other in STD, SAT, over ``samples``
    ({(model, attack, eps): (cases, dice)}; the clean figures under attack "clean", eps 0)."""
    std, sat, ima = TRAINERS
    out = {}
    for other in (std, sat):
        for attack, e in columns(eps):
            a, b = samples.get((ima, attack, e)), samples.get((other, attack, e))
            if a is None or b is None:
                continue
            if a[0] != b[0]:
                raise ValueError(f"{ima} and {other} were not evaluated on the same samples ({attack} eps={e:g})")
            out[(other, attack, e)] = paired_bootstrap(a[1], b[1])
    return out


@dataclass(frozen=True)
class Judgement:
    holds: bool            # IMA above STD under PGD at the middle eps (means), clean within the tolerance
    shown: bool            # holds, and that PGD interval lies above 0
    above_sat: bool        # IMA above SAT under PGD at the middle eps (means)
    sentence: str


def judge(diffs: dict, mids: list[float]) -> Judgement:
    """The paper's effect on one run, in one sentence (see the module docstring)."""
    std, sat, _ = TRAINERS
    clean = diffs.get((std, "clean", 0.0))
    pgd = [diffs.get((std, "pgd", e)) for e in mids]
    vs_sat = [diffs.get((sat, "pgd", e)) for e in mids]
    if clean is None or None in pgd:
        return Judgement(False, False, False, "cannot judge: the clean or PGD results of STD or IMA are missing")
    where = " and ".join(f"{e:g}" for e in mids)
    robust, close = all(d.mean > 0 for d in pgd), clean.mean >= -CLEAN_TOLERANCE
    holds, shown = robust and close, robust and close and all(d.lo > 0 for d in pgd)
    above_sat = None not in vs_sat and all(d.mean > 0 for d in vs_sat)
    clean_text = f"clean ADI {clean.text()} vs STD (tolerance {100 * CLEAN_TOLERANCE:g} point)"
    if shown:
        sentence = f"shows the paper's effect: IMA is above STD under PGD at eps {where} (interval above 0), {clean_text}"
    elif holds:
        sentence = (f"points the paper's way but is {UNCLEAR} ({pgd[0].n} test slices): IMA's PGD ADI is above STD's "
                    f"at eps {where}, yet the interval includes 0; {clean_text}")
    else:
        why = [f"IMA's clean ADI is {-100 * clean.mean:.1f} points below STD's (tolerance {100 * CLEAN_TOLERANCE:g})"
               ] if not close else []
        why += [f"IMA is not above STD under PGD at eps {e:g} ({d.text()})" for e, d in zip(mids, pgd) if d.mean <= 0]
        sentence = "does NOT show the paper's effect: " + "; ".join(why)
    return Judgement(holds, shown, above_sat, sentence)


def table(diffs: dict, eps: list[float]) -> list[str]:
    """Lines of the difference table: one row per (attack, eps), IMA − STD and IMA − SAT with intervals."""
    std, sat, _ = TRAINERS
    n = next(iter(diffs.values())).n if diffs else 0
    lines = [f"ADI differences in points, {100 * LEVEL:.0f}% paired-bootstrap interval over {n} test slices "
             f"(n.d. = {UNCLEAR}: the interval includes 0):",
             f"    {'':<18}{'IMA − STD':<32}IMA − SAT"]
    for attack, e in columns(eps):
        cells = [diffs.get((other, attack, e)) for other in (std, sat)]
        if cells != [None, None]:
            lines.append(f"    {row_name(attack, e):<18}{_cell(cells[0]):<32}{_cell(cells[1])}")
    return lines


def row_name(attack: str, eps: float) -> str:
    return "clean" if attack == "clean" else f"{LABELS.get(attack, attack)} eps={eps:g}"


def _cell(d: Difference | None) -> str:
    if d is None:
        return "-"
    word = "n.d." if d.word == UNCLEAR else d.word
    return f"{100 * d.mean:+.1f} [{100 * d.lo:+.1f}, {100 * d.hi:+.1f}] {word}"


def report_run(diffs: dict, eps: list[float], seed=None) -> Judgement:
    """Print one run's difference table and verdict; return the judgement."""
    lines = table(diffs, eps)
    say(("" if seed is None else f"seed {seed}: ") + lines[0])
    print("\n".join(lines[1:]), flush=True)
    mids = middle_eps(eps)
    j = judge(diffs, mids)
    tag = "" if seed is None else f"seed {seed}: "
    say(tag + j.sentence)
    sat = [diffs.get((TRAINERS[1], "pgd", e)) for e in mids]
    if None not in sat:
        say(tag + "IMA vs SAT under PGD (reported, not judged): " +
            "; ".join(f"eps {e:g} {d.text()}: {d.word}" for e, d in zip(mids, sat)))
    return j


def report_repeats(runs: list[tuple], eps: list[float]) -> None:
    """Over seeds ([(seed, diffs, judgement)]): each difference's mean and range over the seeds, the
    number of seeds whose interval lies above 0, and in how many seeds the effect held."""
    std, sat, _ = TRAINERS
    n = len(runs)
    say(f"over {n} seeds of SAT and IMA from one STD ({', '.join(str(s) for s, _, _ in runs)}): ADI differences in "
        f"points, mean over the seeds (min to max), and the seeds whose interval lies above 0:")
    print(f"    {'':<18}{'IMA − STD':<32}IMA − SAT", flush=True)
    for attack, e in columns(eps):
        cells = []
        for other in (std, sat):
            ds = [d[(other, attack, e)] for _, d, _ in runs if (other, attack, e) in d]
            m = [100 * d.mean for d in ds]
            cells.append(f"{np.mean(m):+.1f} ({min(m):+.1f} to {max(m):+.1f}), {sum(d.lo > 0 for d in ds)}/{len(ds)}"
                         if ds else None)
        if cells != [None, None]:
            print(f"    {row_name(attack, e):<18}{cells[0] or '-':<32}{cells[1] or '-'}", flush=True)
    held = sum(j.holds for _, _, j in runs)
    shown = sum(j.shown for _, _, j in runs)
    above = sum(j.above_sat for _, _, j in runs)
    say(f"the paper's effect held in {held} of {n} seeds (IMA above STD under PGD at eps "
        f"{' and '.join(f'{x:g}' for x in middle_eps(eps))}, clean ADI within {100 * CLEAN_TOLERANCE:g} point), "
        f"with the interval above 0 in {shown} of {n}; IMA above SAT under PGD in {above} of {n}")


def seed_samples(folders: dict) -> list[tuple]:
    """[(seed, samples)] from {seed: attack output folder}: STD's per-sample Dice from the first folder
    (the one standard model), SAT's and IMA's from each seed's own."""
    from nnunet_ima_eval.report import read_sample_dice

    seeds = list(folders)
    first = read_sample_dice(folders[seeds[0]])
    std = {k: v for k, v in first.items() if k[0] == TRAINERS[0]}
    out = []
    for s in seeds:
        own = first if s == seeds[0] else read_sample_dice(folders[s])
        out.append((s, {**std, **{k: v for k, v in own.items() if k[0] != TRAINERS[0]}}))
    return out


def verdict(folders, eps: list[float], note: str | None = None) -> list[Judgement]:
    """Say honestly what the results show (see the module docstring). ``folders``: one attack output
    folder, or {seed: folder} (the first also holding STD's results); ``note``: a last line (e.g. how
    often the effect held in the study at these settings)."""
    if not isinstance(folders, dict):
        folders = {None: Path(folders)}
    runs = []
    for seed, samples in seed_samples(folders):
        diffs = differences(samples, eps)
        if not diffs:
            say(f"no per-sample results of IMA with STD or SAT in {folders[seed]}: cannot judge the effect")
            continue
        runs.append((seed, diffs, report_run(diffs, eps, seed)))
    if len(runs) > 1:
        report_repeats(runs, eps)
    if note and runs:
        say(note)
    return [j for _, _, j in runs]


def case_verdict(folder, eps: list[float], steps: int) -> Difference | None:
    """The deployed predictor's side (``nnunet-ima-attack --scope case`` in ``folder``): IMA − STD in per-case
    Dice, clean and under PGD at the middle eps, with paired-bootstrap intervals over the test cases, and
    whether IMA's advantage under attack holds for whole cases predicted as ``nnUNetv2_predict`` predicts
    them (reported, not judged: a few test cases). Returns the PGD difference (None when missing)."""
    from nnunet_ima_eval.report import read_sample_dice

    samples = read_sample_dice(folder, scope="case")
    std, _, ima = TRAINERS
    diffs = {}
    for attack, e in [("clean", 0.0)] + [("pgd", e) for e in middle_eps(eps)]:
        a, b = samples.get((ima, attack, e)), samples.get((std, attack, e))
        if a is not None and b is not None and a[0] == b[0]:
            diffs[(attack, e)] = paired_bootstrap(a[1], b[1])
    pgd = [d for (attack, _), d in diffs.items() if attack == "pgd"]
    if "clean" not in {attack for attack, _ in diffs} or not pgd:
        say(f"as deployed: no case-scope results of STD and IMA in {folder}")
        return None
    where = " and ".join(f"{e:g}" for e in middle_eps(eps))
    d, clean = pgd[0], diffs[("clean", 0.0)]
    holds = "holds" if d.mean > 0 else "does NOT hold"
    say(f"as deployed (whole test cases through nnU-Net's sliding-window predictor with mirroring, PGD-{steps} at "
        f"eps {where} per slice, scored in the original geometry; {d.n} cases): IMA − STD in case Dice under attack "
        f"{d.text()}, clean {clean.text()}: IMA's advantage {holds} for the deployed predictor"
        + (f" ({UNCLEAR})" if d.word == UNCLEAR else ""))
    return d
