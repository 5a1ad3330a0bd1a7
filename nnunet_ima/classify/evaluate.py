"""Robustness evaluation as in the papers, on the kernel's attacks and torchattacks' AutoAttack.

* ``pgd``   - 100-step PGD with random start, run twice (CE loss and margin loss); a sample is
  robust only if it is classified correctly clean and under both (worst case per sample).
* ``ifgsm`` - 10-step IFGSM (CE loss), no random start.
* ``aa``    - AutoAttack from torchattacks (a maintained implementation): ``version="standard"``
  (apgd-ce, apgd-t, fab-t, square with 5000 queries) for more than two classes, and apgd-ce + square
  for two classes (apgd-t and fab-t need more than two classes; later paper, Table 5). torchattacks
  clamps every input to [0, 1], so AutoAttack is only run for datasets whose values lie in [0, 1]
  (all image datasets here; not Moons, whose coordinates are unbounded).

Only samples still correct are attacked further (as AutoAttack does); wrong ones count as broken.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from nnunet_ima import ifgsm, pgd

from .datasets import collate

ATTACKS = ("pgd", "ifgsm", "aa")
LABELS = {"pgd": "P.", "ifgsm": "IF.", "aa": "AA."}


@dataclass
class EvalConfig:
    eps: tuple = (0.1, 0.2, 0.3)    # noise levels
    norm: str = "l2"
    attacks: tuple = ATTACKS
    pgd_steps: int = 100
    ifgsm_steps: int = 10
    batch_size: int = 500
    clip: tuple | None = None       # valid value range of the data; AutoAttack needs (0, 1)
    aa_queries: int = 5000          # Square's query budget for the 2-class AutoAttack
    seed: int = 0
    device: str = "cpu"
    progress: bool = True


def aa_applicable(clip) -> bool:
    return clip is not None and float(clip[0]) == 0.0 and float(clip[1]) == 1.0


def autoattack(model, eps: float, norm: str, num_classes: int, seed: int = 0, queries: int = 5000):
    """torchattacks' AutoAttack (standard) or, for 2 classes, apgd-ce + square (inputs in [0, 1])."""
    import torchattacks

    n = {"l2": "L2", "linf": "Linf"}[norm]
    if num_classes > 2:
        return torchattacks.AutoAttack(model, norm=n, eps=eps, version="standard", n_classes=num_classes, seed=seed)
    return torchattacks.MultiAttack([
        torchattacks.APGD(model, norm=n, eps=eps, loss="ce", n_restarts=1, seed=seed),
        torchattacks.Square(model, norm=n, eps=eps, n_queries=queries, n_restarts=1, seed=seed),
    ])


def _still_correct(model, x_adv, y):
    with torch.no_grad():
        return model(x_adv).argmax(1) == y


def robust_mask(model, x, y, eps: float, attack: str, cfg: EvalConfig, num_classes: int) -> torch.Tensor:
    """Bool (B,): correct under ``attack`` at ``eps`` (x, y: samples that are correct on clean data)."""
    ok = torch.ones_like(y, dtype=torch.bool)
    if eps == 0 or x.shape[0] == 0:
        return ok
    if attack == "pgd":
        for loss in ("ce", "margin"):
            idx = torch.nonzero(ok).flatten()
            if idx.numel() == 0:
                break
            adv = pgd(model, x[idx], y[idx], eps, norm=cfg.norm, steps=cfg.pgd_steps, loss=loss, clip=cfg.clip)
            ok[idx] = _still_correct(model, adv, y[idx])
        return ok
    if attack == "ifgsm":
        adv = ifgsm(model, x, y, eps, norm=cfg.norm, steps=cfg.ifgsm_steps, clip=cfg.clip)
        return _still_correct(model, adv, y)
    if attack == "aa":
        adv = autoattack(model, eps, cfg.norm, num_classes, cfg.seed, cfg.aa_queries)(x, y)
        return _still_correct(model, adv, y)
    raise ValueError(f"attack: unknown attack {attack!r}; known: {ATTACKS}")


def evaluate(model, dataset, num_classes: int, cfg: EvalConfig, desc: str = "eval") -> dict:
    """Accuracies (fractions) on ``dataset`` (items (x, y, index)): clean and per attack and eps.

    Returns ``{"n": N, "clean": acc, "pgd": {eps: acc}, "ifgsm": {...}, "aa": {...}, "notes": [...]}``.

    >>> res = evaluate(model, splits.test, 10, EvalConfig(eps=(0.5, 1.0), norm="l2", clip=(0, 1)))
    """
    if model.training:
        import warnings

        warnings.warn("evaluate: the model was in train mode; switching it to eval mode", stacklevel=2)
    model.eval()
    device = torch.device(cfg.device)
    attacks = [a for a in cfg.attacks if a != "aa" or aa_applicable(cfg.clip)]
    notes = []
    if "aa" in cfg.attacks and "aa" not in attacks:
        notes.append("AutoAttack skipped: torchattacks clamps inputs to [0, 1], this data is not in [0, 1]")
    counts = {a: {float(e): 0 for e in cfg.eps} for a in attacks}
    clean, n = 0, 0
    loader = DataLoader(dataset, batch_size=cfg.batch_size, shuffle=False, collate_fn=collate)
    bar = tqdm(total=len(loader) * max(1, len(attacks) * len(cfg.eps)), desc=desc, leave=False,
               disable=not cfg.progress)
    torch.manual_seed(cfg.seed)
    for x, y, _ in loader:
        x, y = x.to(device), y.to(device)
        with torch.no_grad():
            correct = model(x).argmax(1) == y
        clean += int(correct.sum())
        n += y.shape[0]
        xc, yc = x[correct], y[correct]
        for a in attacks:
            for e in cfg.eps:
                counts[a][float(e)] += int(robust_mask(model, xc, yc, float(e), a, cfg, num_classes).sum())
                bar.update(1)
    bar.close()
    out = {"n": n, "clean": clean / max(n, 1), "notes": notes}
    for a in attacks:
        out[a] = {e: c / max(n, 1) for e, c in counts[a].items()}
    return out


def result_rows(results: dict) -> list[dict]:
    """Flat rows (method, attack, eps, accuracy, n) for CSV."""
    rows = []
    for method, r in results.items():
        rows.append({"method": method, "attack": "clean", "eps": 0.0, "accuracy": r["clean"], "n": r["n"]})
        for a in ATTACKS:
            for e, acc in r.get(a, {}).items():
                rows.append({"method": method, "attack": a, "eps": float(e), "accuracy": acc, "n": r["n"]})
    return rows


def format_table(results: dict, title: str = "") -> str:
    """Paper-style table in percent: Methods | S. Acc. | P. eps ... | IF. eps ... | AA. eps ..."""
    cols = [("clean", None)]
    for a in ATTACKS:
        eps = sorted({e for r in results.values() for e in r.get(a, {})})
        cols += [(a, e) for e in eps]
    head = ["Methods", "S. Acc."] + [f"{LABELS[a]} {e:g}" for a, e in cols[1:]]
    lines = [title] if title else []
    rows = []
    for method, r in results.items():
        head_, sep, rest = method.partition("(")
        cells = [head_.upper() + sep + rest]
        for a, e in cols:
            v = r["clean"] if a == "clean" else r.get(a, {}).get(e)
            cells.append("-" if v is None else f"{100 * v:.2f}")
        rows.append(cells)
    widths = [max(len(str(c)) for c in col) for col in zip(head, *rows)]
    fmt = lambda cells: "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    lines.append(fmt(head))
    lines += [fmt(c) for c in rows]
    notes = sorted({n for r in results.values() for n in r.get("notes", [])})
    lines += [f"note: {n}" for n in notes]
    return "\n".join(lines)
