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

import time
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
    batch_size: int | None = None   # None: 500 for small vectors, 32 images on CPU, 256 on a GPU (see auto_batch_size)
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


def attack_cost(attack: str, cfg: EvalConfig, num_classes: int) -> float:
    """Rough cost of ``attack`` per sample and eps, in forward+backward passes (a forward counts 1/3).

    pgd: 2 losses x pgd_steps; ifgsm: ifgsm_steps; aa (torchattacks' defaults): 2 classes apgd-ce 10
    steps + Square's queries; more classes apgd-ce 10 + apgd-t 9 x 10 + fab-t 9 x 10 (x2) + Square
    5000. An upper estimate: every attack stops early on samples it has broken.
    """
    if attack == "pgd":
        return 2.0 * cfg.pgd_steps
    if attack == "ifgsm":
        return float(cfg.ifgsm_steps)
    if num_classes > 2:
        return 10 + 90 + 180 + 5000 / 3
    return 10 + cfg.aa_queries / 3


def aa_announcement(cfg: EvalConfig, num_classes: int) -> str | None:
    """One line saying that AutoAttack will run and what it costs next to PGD; None when it will not."""
    if "aa" not in cfg.attacks or not aa_applicable(cfg.clip):
        return None
    what = ("torchattacks' standard AutoAttack (apgd-ce, apgd-t, fab-t, square 5000 queries)" if num_classes > 2
            else f"AutoAttack for 2 classes (apgd-ce + square, {cfg.aa_queries} queries)")
    ratio = attack_cost("aa", cfg, num_classes) / attack_cost("pgd", cfg, num_classes)
    others = " ".join(a for a in cfg.attacks if a != "aa") or "pgd"
    return (f"evaluation runs {what}: up to about {ratio:.0f}x the time of PGD-{cfg.pgd_steps} per noise level; "
            f"leave it out with --attacks {others}")


def auto_batch_size(sample_numel: int, device) -> int:
    """Evaluation batch: 500 for small vectors (Moons, digits), else 256 on a GPU and 32 on a CPU, so
    that progress (and the time estimate after the first batch) shows early."""
    if sample_numel <= 256:
        return 500
    return 256 if torch.device(device).type == "cuda" else 32


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


class _Progress:
    """A bar in units of attack cost (see :func:`attack_cost`) that moves after every batch, and one
    line with the expected total time once the first batch is done."""

    def __init__(self, total_units: float, desc: str, enabled: bool):
        self.total, self.desc, self.enabled, self.done = total_units, desc, enabled, 0.0
        self.t0 = time.perf_counter()
        self.bar = tqdm(total=round(total_units), desc=desc, leave=False, disable=not enabled, unit="pass")
        self.said = False

    def update(self, units: float, batch_done: bool) -> None:
        self.done += units
        self.bar.update(round(self.done) - self.bar.n)
        if batch_done and not self.said and self.enabled and self.done > 0:
            spent = time.perf_counter() - self.t0
            tqdm.write(f"{self.desc}: first batch took {_duration(spent)}; expected about "
                       f"{_duration(spent * self.total / self.done)} in all")
            self.said = True

    def close(self) -> None:
        self.bar.close()


def _duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


def evaluate(model, dataset, num_classes: int, cfg: EvalConfig, desc: str = "eval") -> dict:
    """Accuracies (fractions) on ``dataset`` (items (x, y, index)): clean and per attack and eps.

    Returns ``{"n": N, "clean": acc, "pgd": {eps: acc}, "ifgsm": {...}, "aa": {...}, "notes": [...]}``.
    With ``cfg.progress`` a bar moves after every batch and the expected time is printed after the first.

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
    if "aa" in attacks and cfg.norm == "l2" and len(dataset) and min(dataset[0][0].shape[-2:], default=0) < 5:
        attacks.remove("aa")  # torchattacks' L2 Square tiles the image in fifths: h // 5 == 0 divides by zero
        notes.append("AutoAttack skipped: torchattacks' L2 Square attack needs images of at least 5x5 pixels")
    counts = {a: {float(e): 0 for e in cfg.eps} for a in attacks}
    clean, n = 0, 0
    batch = cfg.batch_size or auto_batch_size(dataset[0][0].numel() if len(dataset) else 0, device)
    loader = DataLoader(dataset, batch_size=batch, shuffle=False, collate_fn=collate)
    cost = {a: attack_cost(a, cfg, num_classes) for a in attacks}
    progress = _Progress(len(dataset) * len(cfg.eps) * sum(cost.values()), desc, cfg.progress)
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
                progress.update(cost[a] * y.shape[0], batch_done=False)
        progress.update(0.0, batch_done=True)
    progress.close()
    out = {"n": n, "clean": clean / max(n, 1), "notes": notes}
    for a in attacks:
        out[a] = {e: c / max(n, 1) for e, c in counts[a].items()}
    return out


def result_rows(results: dict, norm: str | None = None) -> list[dict]:
    """Flat rows (method, attack, eps, accuracy, n, and ``norm``: what eps is measured in, when given) for CSV."""
    rows = []
    extra = {} if norm is None else {"norm": norm}
    for method, r in results.items():
        rows.append({"method": method, "attack": "clean", "eps": 0.0, "accuracy": r["clean"], "n": r["n"], **extra})
        for a in ATTACKS:
            for e, acc in r.get(a, {}).items():
                rows.append({"method": method, "attack": a, "eps": float(e), "accuracy": acc, "n": r["n"], **extra})
    return rows


def display_name(label: str) -> str:
    """Row name of a method label as the papers write it: 'sat0.3' -> 'SAT0.3' ('(path)' kept as is)."""
    head, sep, rest = label.partition("(")
    return head.upper() + sep + rest


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
        cells = [display_name(method)]
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
