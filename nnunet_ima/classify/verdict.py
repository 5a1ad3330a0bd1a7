"""What a comparison table shows, in one plain sentence per noise level (as the demo's verdict).

For every eps > 0 (eps 0 is the clean accuracy, which every sentence states): IMA's accuracy under
attack (the lowest over the attacks in the table at that eps) against each other method's, and IMA's
clean accuracy against STD's. Differences smaller than :data:`LEVEL` percentage points are called
level.

Example: ``verdict({"std": {"clean": .95, "pgd": {0.5: .40}}, "ima": {"clean": .90, "pgd": {0.5: .62}}})``
gives ``["At eps 0.5 under attack (PGD), IMA is above STD (62.0% vs 40.0%, +22.0 points); clean
accuracy: IMA 90.0%, below STD (95.0%, -5.0 points)."]``.
"""
from __future__ import annotations

from .evaluate import ATTACKS, display_name

LEVEL = 1.0  # percentage points: a smaller difference is "level"
NAMES = {"pgd": "PGD", "ifgsm": "IFGSM", "aa": "AutoAttack"}


def _compare(a: float, b: float) -> tuple[str, float]:
    """(word, difference in points) for accuracies a against b (fractions)."""
    d = 100 * (a - b)
    return ("above" if d >= LEVEL else "below" if d <= -LEVEL else "level with"), d


def _under_attack(r: dict, eps: float, attacks) -> float | None:
    vals = [r[a][eps] for a in attacks if eps in r.get(a, {})]
    return min(vals) if vals else None


def _ima_label(results: dict) -> str | None:
    return next((m for m in results if m == "ima"), None) or next((m for m in results if m.startswith("ima")), None)


def _clean_clause(results: dict, ima: str) -> str:
    ref = next((m for m in results if m == "std"), None) or next((m for m in results if m != ima), None)
    c = results[ima]["clean"]
    if ref is None:
        return f"clean accuracy: IMA {100 * c:.1f}%"
    word, d = _compare(c, results[ref]["clean"])
    return (f"clean accuracy: IMA {100 * c:.1f}%, {word} {display_name(ref)} ({100 * results[ref]['clean']:.1f}%, "
            f"{d:+.1f} points)")


def _sentence(results: dict, ima: str, eps: float, attacks: list) -> str | None:
    mine = _under_attack(results[ima], eps, attacks)
    if mine is None:
        return None
    how = "PGD" if attacks == ["pgd"] else ("worst of " + ", ".join(NAMES[a] for a in attacks))
    parts = []
    for m, r in results.items():
        theirs = _under_attack(r, eps, attacks)
        if m == ima or theirs is None:
            continue
        word, d = _compare(mine, theirs)
        parts.append(f"{word} {display_name(m)} ({100 * mine:.1f}% vs {100 * theirs:.1f}%, {d:+.1f} points)")
    if not parts:
        return None
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    return f"At eps {eps:g} under attack ({how}), IMA is {listed}; {_clean_clause(results, ima)}."


def verdict(results: dict) -> list[str]:
    """One sentence per noise level from a results dict ``{label: {"clean": acc, attack: {eps: acc}}}``
    (what :func:`~.evaluate.evaluate` returns, one entry per method; accuracies as fractions).
    Empty when there is no IMA row or nothing to compare it with."""
    ima = _ima_label(results)
    if ima is None:
        return []
    attacks = [a for a in ATTACKS if a in results[ima]]
    levels = sorted({float(e) for a in attacks for e in results[ima][a] if float(e) > 0})  # eps 0: the clean row
    out = []
    for e in levels:
        present = [a for a in attacks if e in results[ima][a]]
        s = _sentence(results, ima, e, present)
        if s:
            out.append(s)
    return out
