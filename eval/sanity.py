"""Sanity checks of ``nnunet-ima-attack`` (AutoAttack's, each failure with what it suggests).

Every figure a check prints is in the run's ADI convention (``--adi``). Each check returns one dict
``{"model", "check", "status": "ok" | "warning" | "vacuous" | "unknown", "message"}``; the messages name
the defect a failure points to. The checks are results like any other: the pipeline stores them with
what produced them, computes them when missing and prints them from the store on every run.

* :func:`check_budget` / :func:`budget_check` (every stored attack run, from the :func:`budget_measure`
  saved with it): each returned point lies in its eps-ball and puts nothing on padding. Fails for a
  broken projection or step (the figures would be for a larger eps than reported), or a perturbation
  that spends budget on padding the network never sees (the attack is weaker than its eps says: the
  figures overstate robustness).
* :func:`check_eps0`: the attack run through its steps at eps 0 reproduces the clean per-sample Dice
  (an attack that ignores eps, or a non-deterministic model).
* :func:`check_large_eps`: IFGSM at a huge eps drives a standard model near 0 (else masked gradients?).
* :func:`check_more_steps`, :func:`check_noise`, :func:`check_gradient_free`: at the middle eps, 5x the
  steps, random noise and a gradient-free search must not find clearly lower Dice than the attacks.
* :func:`monotonicity_checks`: figures do not rise with eps.
* :func:`vacuous_reason`: a model whose clean ADI is already near 0 (e.g. untrained) cannot be pushed
  lower, so the strength checks (large eps, more steps, noise, gradient-free) would pass whatever the
  attack does: they are reported with status "vacuous" (:func:`vacuous_checks`), not as passed.
"""
from __future__ import annotations

import math

import numpy as np

from nnunet_ima import baselines

from .metrics import Counts, adi, sample_dice_of
from .runner import CLEAN, Evaluation, Evaluator

CHECK_SAMPLES = 4  # slices (2d) / patches (3d) the attack-strength sanity checks run on
BUDGET_RTOL = 1e-4  # float32 projections land within this of eps
VACUOUS_ADI = 0.1  # a clean ADI below this leaves the attacks nothing to lower: the strength checks say nothing


def check(model: str, name: str, ok: bool, message: str) -> dict:
    return {"model": model, "check": name, "status": "ok" if ok else "warning", "message": message}


def _counts(clean) -> Counts:
    """The clean counts, given as an :class:`Evaluation` or as its :class:`Counts`."""
    return getattr(clean, "counts", clean)


def _adi(ev: Evaluator, counts: Counts) -> float:
    return adi(counts, ev.settings.convention)["mean"]


def budget_measure(run: Evaluation) -> dict:
    """What the budget check needs of one attack run, stored with it: the samples, those beyond the
    eps-ball and with perturbation on padding, and the largest of each."""
    bound = run.eps * (1 + BUDGET_RTOL) + 1e-6
    dist, pad = run.distance, run.on_pad
    return {"eps": run.eps, "n": int(dist.size), "over": int((dist > bound).sum()),
            "max_distance": float(dist.max()) if dist.size else 0.0,
            "on_pad": int((pad > 1e-6).sum()), "max_on_pad": float(pad.max()) if pad.size else 0.0}


def budget_check(model: str, norm: str, attack: str, runs: list) -> dict:
    """The budget check of ``attack`` from its runs' stored :func:`budget_measure` (``runs``: store entries
    with a "budget", or measures themselves); runs computed before the measure was stored are named."""
    measures = [r.get("budget", r) if isinstance(r, dict) else None for r in runs]
    known = [m for m in measures if m and "n" in m]
    unknown = len(measures) - len(known)
    over = [f"eps={m['eps']:g}: {m['over']} samples, largest {m['max_distance']:.4g}" for m in known if m["over"]]
    pad = [f"eps={m['eps']:g}: {m['on_pad']} samples, up to {m['max_on_pad']:.3g}" for m in known if m["on_pad"]]
    n = sum(m["n"] for m in known)
    msg = f"{attack}: every returned point of {n} lies in its {norm.upper()} eps-ball, nothing on padding"
    if over:
        msg = (f"{attack}: perturbation beyond eps ({'; '.join(over)}): the projection or the step is broken, the "
               f"figures are for a larger eps than reported")
    if pad:
        msg = (f"{msg}; " if over else f"{attack}: ") + (
            f"perturbation on padding ({'; '.join(pad)}): the budget is partly spent where the network sees zeros "
            f"(a random start or step that ignores the padding mask), so the figures overstate robustness")
    if unknown:
        msg += f" ({unknown} earlier result(s) carry no budget record: --overwrite measures them)"
    result = check(model, f"budget[{attack}]", not (over or pad), msg)
    if not known:
        result["status"] = "unknown"
    return result


def check_budget(ev: Evaluator, runs: list[Evaluation]) -> dict:
    """Every point an attack returned (``runs``: its evaluations at each eps) lies in its eps-ball, and none
    of its perturbation lies on padding."""
    return budget_check(ev.model.label, ev.settings.norm, runs[0].attack, [budget_measure(r) for r in runs])


def check_eps0(ev: Evaluator, attack: str, clean, n_batches: int = 2) -> dict:
    """The attack path at eps = 0 must reproduce the clean per-sample Dice exactly (``clean``: the clean
    :class:`Evaluation` or its counts)."""
    sub = ev.batches[:n_batches]
    n = sum(len(b.refs) for b in sub)
    steps = min(2, max(ev.settings.steps(attack), 1))
    # through the attack itself: run()'s eps-0 short cut would compare clean with clean
    at0 = ev.run(attack, 0.0, batches=sub, custom=lambda b, y, eps, gen: ev.attack(attack, b, y, eps, steps, gen))
    conv = ev.settings.convention
    diff = float(np.max(np.abs(sample_dice_of(at0.counts, conv) - sample_dice_of(_counts(clean).head(n), conv)))) \
        if n else 0.0
    ok = diff <= 1e-9
    return check(ev.model.label, f"eps0_equals_clean[{attack}]", ok,
                 f"{attack} at eps=0 vs clean prediction on {n} samples: max per-sample Dice difference {diff:.2e}"
                 + ("" if ok else " (the attack path changes clean inputs: an attack that ignores eps, or a "
                                  "non-deterministic model)"))


def large_eps(ev: Evaluator) -> float:
    """A budget no standard model survives: per-element RMS of 10 (z-score units) for L2, 10 for Linf."""
    b = ev.batches[0]
    numel = int(np.prod(b.x.shape[1:]))
    return 10.0 * math.sqrt(numel) if ev.settings.norm == "l2" else 10.0


def check_large_eps(ev: Evaluator, clean, n_batches: int = 2, threshold: float = 0.1) -> dict:
    """IFGSM at a huge eps should drive a standard model's ADI near 0 (else: masked gradients?)."""
    eps = large_eps(ev)
    run = ev.run("ifgsm", eps, batches=ev.batches[:n_batches])
    v, c = _adi(ev, run.counts), _adi(ev, _counts(clean))
    ok = not v > threshold
    return check(ev.model.label, "large_eps_near_zero", ok,
                 f"IFGSM-{ev.settings.ifgsm_steps} at eps={eps:g} on {run.counts.n} samples: ADI {v:.3f} "
                 f"(clean {c:.3f}, ADI convention {ev.settings.convention})"
                 + ("" if ok else f"; above {threshold}: expected for a standard model to fall near 0 - a robust model "
                                  f"may legitimately stay higher, otherwise the attack is weak or the gradient is masked"))


def check_more_steps(ev: Evaluator, attack: str, eps: float, reported: Counts, factor: int = 5,
                     n_samples: int = CHECK_SAMPLES, tol: float = 0.03) -> dict:
    """``factor`` x the steps on the first batches must not give a clearly lower ADI than reported."""
    sub, n = ev.subset(n_samples)
    steps = factor * ev.settings.steps(attack)
    more = ev.run(attack, eps, steps=steps, batches=sub)
    a, b = _adi(ev, reported.head(n)), _adi(ev, more.counts)
    ok = not b < a - tol
    return check(ev.model.label, f"more_steps[{attack}]", ok,
                 f"{attack} eps={eps:g} on {n} samples: ADI {a:.3f} with {ev.settings.steps(attack)} steps, "
                 f"{b:.3f} with {steps}" + ("" if ok else f"; more than {tol} lower: too few steps, the reported "
                                                         f"figures overstate robustness (raise the step count)"))


def check_noise(ev: Evaluator, eps: float, whitebox: Counts, n_samples: int = CHECK_SAMPLES, tol: float = 0.03) -> dict:
    """Random noise of the same norm must not lower the ADI more than the white-box attacks."""
    sub, n = ev.subset(n_samples)
    fn = (lambda b, y, e, gen: baselines.random_noise(ev.attacked, b.x, y, e, norm=ev.settings.norm, generator=gen,
                                                       region=b.mask))
    noise = ev.run("noise", eps, batches=sub, custom=fn)
    a, b = _adi(ev, whitebox.head(n)), _adi(ev, noise.counts)
    ok = not b < a - tol
    return check(ev.model.label, "noise_weaker", ok,
                 f"eps={eps:g} on {n} samples: ADI {b:.3f} under random noise, {a:.3f} under the white-box attacks"
                 + ("" if ok else "; noise is stronger: the gradient is masked or the attack is broken"))


def check_gradient_free(ev: Evaluator, eps: float, whitebox: Counts, queries: int = 100,
                        n_samples: int = CHECK_SAMPLES, tol: float = 0.03) -> dict:
    """A gradient-free random search must not find lower Dice than the white-box attacks."""
    sub, n = ev.subset(n_samples)

    def fn(b, y, e, gen):  # maximises minus the per-sample Dice (padding and the ignore label left out)
        return baselines.random_search(ev.attacked, b.x, y, e, norm=ev.settings.norm, queries=queries,
                                         score=lambda out, yy: -ev.dice(out, yy), generator=gen, region=b.mask)

    found = ev.run("random_search", eps, batches=sub, custom=fn)
    a, b = _adi(ev, whitebox.head(n)), _adi(ev, found.counts)
    ok = not b < a - tol
    return check(ev.model.label, "gradient_free_weaker", ok,
                 f"eps={eps:g} on {n} samples: ADI {b:.3f} under random search ({queries} queries), {a:.3f} under "
                 f"the white-box attacks" + ("" if ok else "; the blind search wins: gradient masking (obfuscated "
                                                           "gradients); the white-box figures overstate robustness"))


def vacuous_reason(ev: Evaluator, clean) -> str | None:
    """Why the strength checks of this model would pass whatever the attacks do (its clean ADI is below
    :data:`VACUOUS_ADI`: nothing left to lower), or None."""
    v = _adi(ev, _counts(clean))
    if v < VACUOUS_ADI:
        return (f"clean ADI {v:.3f} (convention {ev.settings.convention}) is below {VACUOUS_ADI}: the model segments "
                f"almost nothing, so no attack can lower its figures and this check cannot fail - vacuous, not passed "
                f"(an untrained or broken model?)")
    return None


def vacuous_checks(model: str, names: list[str], reason: str) -> list[dict]:
    """The strength checks ``names``, not run, each with status "vacuous" and ``reason``."""
    return [{"model": model, "check": name, "status": "vacuous", "message": reason} for name in names]


def monotonicity_checks(rows: list[dict], tol: float = 0.02) -> list[dict]:
    """Per model and attack: ADI / TVDI (over classes) must not rise with eps by more than ``tol``
    (absolute Dice; PGD's random start and argmax ties make small rises possible)."""
    out = []
    means = [r for r in rows if r["class"] == "mean"]
    models = list(dict.fromkeys(r["model"] for r in means))
    for m in models:
        clean = [r for r in means if r["model"] == m and r["attack"] == CLEAN]
        for attack in dict.fromkeys(r["attack"] for r in means if r["model"] == m and r["attack"] != CLEAN):
            seq = sorted((r for r in means if r["model"] == m and r["attack"] == attack), key=lambda r: r["eps"])
            seq = clean[:1] + [r for r in seq if r["eps"] > 0 or not clean]
            bad = []
            for metric in ("adi", "tvdi"):
                lowest = math.inf
                for r in seq:
                    if r[metric] > lowest + tol:
                        bad.append(f"{metric} rises to {r[metric]:.3f} at eps={r['eps']:g} (lower before: {lowest:.3f})")
                    lowest = min(lowest, r[metric])
            out.append(check(m, f"non_increasing[{attack}]", not bad,
                             f"{attack}: figures do not rise with eps (tolerance {tol})" if not bad else
                             f"{attack}: " + "; ".join(bad) + " - too few steps, or a masked gradient?"))
    return out
