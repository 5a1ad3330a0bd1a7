"""Sanity checks of the case scope (their names end in ``@case``), in the form of :mod:`.sanity`'s.

* ``budget[<attack>]@case``: every case an attack returned lies in its budget (each block in its
  eps-ball, or the whole case in its ball of eps times the budget's factor): the sample scope's
  :func:`.sanity.budget_check` on the measure stored with each case-scope run.
* ``eps0_equals_clean[<attack>]@case``: the attack run through its steps at eps 0 on the first case,
  predicted and exported by nnU-Net, gives the clean case's Dice exactly (an attack that ignores eps,
  or a prediction path that alters a case it should leave alone).
* ``noise_weaker@case``: at the middle eps, a random point on the boundary of each case's budget must
  not lower the deployed Dice more than the white-box attacks did (else the gradient through the
  sliding window is masked or wrong).
* ``non_increasing[<attack>]@case``: :func:`.sanity.monotonicity_checks` on the case scope's rows.

The sample scope's strength checks (more steps, a gradient-free search, a huge eps) are not run on
whole cases: each would cost as much as the attacks themselves.
"""
from __future__ import annotations

import numpy as np

from nnunet_ima import baselines

from .case_metrics import case_dice
from .case_scope import CASE, CaseEvaluator, scope_of
from .metrics import worst_counts
from .runner import Evaluation
from .sanity import check, monotonicity_checks

TAG = "@case"


def tagged(c: dict) -> dict:
    return {**c, "check": c["check"] + TAG}


def check_eps0(cev: CaseEvaluator, attack: str, clean: Evaluation) -> dict:
    first = cev.indices[:1]
    steps = min(2, max(cev.ev.settings.steps(attack), 1))
    at0 = cev.run(attack, 0.0, cases=first,
                  custom=lambda case, x, y, eps, gen: cev.attack(attack, case, x, y, eps, steps, gen))
    a, b = case_dice(at0.counts), case_dice(clean.counts.head(len(first)))
    same = bool(np.array_equal(a, b, equal_nan=True))
    return check(cev.model.label, f"eps0_equals_clean[{attack}]{TAG}", same,
                 f"{attack} at eps=0 vs clean, as deployed, on {len(first)} case(s): Dice {a.tolist()} vs {b.tolist()}"
                 + ("" if same else " (the attack path changes a case it must leave alone)"))


def check_noise(cev: CaseEvaluator, eps: float, whitebox, tol: float = 0.03) -> dict:
    def noise(case, x, y, e, gen):
        norm, factor = cev.budget(case)
        return baselines.random_noise(cev.predictor, x, y, e * factor, norm=norm, generator=gen)

    run = cev.run("noise", eps, custom=noise)
    a, b = float(np.nanmean(case_dice(whitebox))), float(np.nanmean(case_dice(run.counts)))
    ok = not b < a - tol
    return check(cev.model.label, f"noise_weaker{TAG}", ok,
                 f"eps={eps:g} on {run.counts.n} cases: mean case Dice {b:.3f} under random noise, {a:.3f} under "
                 f"the white-box attacks" + ("" if ok else "; noise is stronger: the gradient is masked or wrong"))


def case_sanity_checks(plan, cev: CaseEvaluator, clean: Evaluation, keys: list[dict], found: dict) -> list[dict]:
    """eps 0 reproduces the clean case as deployed, for every attack; random noise weaker than the white-box
    attacks at the middle eps (see the module docstring; the budget check is made from each stored run's
    measure, :func:`.sanity.budget_check`)."""
    from . import report
    from .pipeline import middle_eps

    checks = [check_eps0(cev, a, clean) for a in plan.attacks]
    mid = middle_eps(plan.eps_list)
    at_mid = [found[report.row_key(k)] for k in keys if k["eps"] == mid and k["attack"] != "clean"
              and report.row_key(k) in found]
    if mid is not None and at_mid:
        whitebox = worst_counts(clean.counts, at_mid, "project")[0]
        checks.append(check_noise(cev, mid, whitebox))
    return checks


def case_monotonicity(rows: list[dict]) -> list[dict]:
    """:func:`.sanity.monotonicity_checks` on the case scope's rows, names tagged ``@case``."""
    return [tagged(c) for c in monotonicity_checks([r for r in rows if scope_of(r) == CASE])]


def is_case_check(c: dict) -> bool:
    return c["check"].endswith(TAG)

