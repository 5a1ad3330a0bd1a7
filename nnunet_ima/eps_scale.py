"""How large a perturbation budget eps is for the inputs it perturbs, and whether float32 can hold it.

The one rule every front end checks its noise levels with (the attack command's ``--eps``,
classify's ``--eps`` and ``--eps-max``):

* **per element**: a budget of norm ``eps`` on an input of ``d`` elements moves each element by
  ``eps / sqrt(d)`` (L2, spread evenly: the root mean square) or by up to ``eps`` (Linf).
* **warning**: that size exceeds the inputs' own scale (the standard deviation of z-scored inputs,
  or the whole range of bounded images): the perturbation can outweigh the image, e.g. an L2-sized
  budget given with ``--norm linf``.
* **refusal**: float32 cannot represent the perturbation: eps itself >= :data:`MAX_EPS` (its squared
  L2 norm overflows, so the projection breaks down and the attack silently returns x), or a size
  per element beyond 2**24 times the inputs' scale (x + delta rounds the image away entirely).

>>> per_element(2.0, "l2", 1024)
0.0625
>>> warnings, refusals = scale_problems([2.0], "linf", 1024, 1.0, "the inputs' standard deviation", "--eps", "voxel")
"""
from __future__ import annotations

import math

FLOAT32_MAX = 3.4028234663852886e38
#: the largest budget float32 holds: the squared L2 norm of a larger perturbation overflows
MAX_EPS = math.sqrt(FLOAT32_MAX)
#: float32's significand: once |delta| exceeds |x| by this factor, x + delta no longer holds x
PRECISION = 2.0 ** 24
NORM_NAMES = {"l2": "L2", "linf": "Linf"}


def per_element(eps: float, norm: str, numel: int) -> float:
    """The size per input element of a budget ``eps``: eps / sqrt(numel) (L2, RMS) or eps (Linf)."""
    return eps / math.sqrt(max(numel, 1)) if norm == "l2" else float(eps)


def unrepresentable(eps: float, flag: str = "--eps") -> str | None:
    """Why float32 cannot hold a budget ``eps`` whatever the inputs (None when it can)."""
    if eps >= MAX_EPS:
        return (f"{flag} {eps:g}: a perturbation that large cannot be represented in float32 (its squared norm "
                f"overflows, the attack would silently return the clean input); expected eps < {MAX_EPS:.3g}")
    return None


def _size_words(eps: float, norm: str, numel: int, unit: str) -> str:
    size = per_element(eps, norm, numel)
    if norm == "l2":
        return f"{size:.3g} per {unit} (RMS of an L2 budget over {numel} {unit}{'s' if numel != 1 else ''})"
    return f"up to {size:.3g} per {unit}"


def scale_problems(eps_list, norm: str, numel: int, scale: float, what: str, flag: str,
                   unit: str = "element") -> tuple[list[str], list[str]]:
    """(warnings, refusals) for the positive budgets of ``eps_list`` on inputs of ``numel`` elements whose
    scale is ``scale`` (named ``what``, e.g. "the inputs' standard deviation"). One sentence each,
    naming ``flag``, the value, the norm and the size per ``unit`` it implies."""
    warnings, refusals = [], []
    name = NORM_NAMES.get(norm, norm)
    for eps in sorted({float(e) for e in eps_list if e > 0}):
        static = unrepresentable(eps, flag)
        size = per_element(eps, norm, numel)
        head = f"{flag} {eps:g} ({name}): {_size_words(eps, norm, numel, unit)}"
        if static:
            refusals.append(static)
        elif scale > 0 and size > PRECISION * scale:
            refusals.append(f"{head}, over 2**24 times {what} ({scale:.3g}): in float32 the image vanishes below "
                            f"the perturbation's rounding, the figures would not be about this image")
        elif scale > 0 and size > scale:
            hint = (f"; an L2-sized budget? (with --norm l2 it is {per_element(eps, 'l2', numel):.3g} per {unit})"
                    if norm == "linf" else "")
            warnings.append(f"{head}, {size / scale:.3g}x {what} ({scale:.3g}): the perturbation can outweigh the "
                            f"image itself{hint}")
    return warnings, refusals
