"""Results on disk and on screen: results.csv / results.json, the papers' table, plots, examples.

``results.json`` = {"rows": [...], "per_case": [...], "checks": [...]}; ``results.csv`` holds the
rows. One row per (model, attack, eps, class) with ADI, TVDI and per-case 3D Dice (class "mean" =
over foreground classes). Both files are rewritten (atomically) after every finished
(model, attack, eps), so an interrupted run loses at most the noise level in progress; a rerun
skips rows whose settings match unless ``--overwrite``.
"""
from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import numpy as np

from .metrics import MEAN

FIELDS = ["model", "attack", "eps", "class", "class_id", "adi", "tvdi", "dice3d", "n_samples", "n_empty",
          "norm", "loss", "steps", "dataset", "configuration", "plans", "fold", "checkpoint", "source",
          "max_samples", "seconds"]
# settings that make two rows comparable: a rerun reuses a finished row only if all of these match
KEY_FIELDS = ["model", "attack", "eps", "norm", "loss", "steps", "dataset", "configuration", "plans", "fold",
              "checkpoint", "source", "max_samples"]


def row_key(row: dict) -> tuple:
    return tuple(str(row.get(k)) for k in KEY_FIELDS)


def make_rows(base: dict, summary: dict, class_names: dict, seconds: float) -> list[dict]:
    """Rows of one (model, attack, eps): one per foreground class plus the "mean" row."""
    rows = []
    for cid in [*class_names, MEAN]:
        rows.append({**base, "class": class_names.get(cid, MEAN), "class_id": cid if cid != MEAN else "",
                     "adi": summary["adi"][cid], "tvdi": summary["tvdi"][cid], "dice3d": summary["dice3d"][cid],
                     "n_samples": summary["n_samples"], "n_empty": summary["n_empty"][cid],
                     "seconds": round(seconds, 3)})
    return rows


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class ResultStore:
    """The output folder's results.json / results.csv, loaded on start and saved after every step."""

    def __init__(self, out: Path, overwrite: bool = False):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.json_path = self.out / "results.json"
        self.rows, self.per_case, self.checks, self.checks_on_disk = [], [], [], []
        if self.json_path.is_file() and not overwrite:
            data = json.loads(self.json_path.read_text())
            self.rows, self.per_case = data.get("rows", []), data.get("per_case", [])
            self.checks_on_disk = data.get("checks", [])
        self.done = {row_key(r) for r in self.rows}

    def finished(self, base: dict) -> bool:
        return row_key(base) in self.done

    def add(self, rows: list[dict], per_case: list[dict]) -> None:
        keys = {row_key(r) for r in rows}
        self.rows = [r for r in self.rows if row_key(r) not in keys] + rows
        self.per_case = [p for p in self.per_case if row_key(p) not in keys] + per_case
        self.done |= keys
        self.save()

    def rows_of(self, base: dict) -> list[dict]:
        k = row_key(base)
        return [r for r in self.rows if row_key(r) == k]

    def save(self) -> None:
        payload = {"rows": self.rows, "per_case": self.per_case, "checks": self.checks}
        _atomic_write(self.json_path, json.dumps(payload, indent=1, default=_jsonable))
        lines = [FIELDS]
        lines += [[_fmt_csv(r.get(f)) for f in FIELDS] for r in self.rows]
        tmp = self.out / "results.csv.tmp"
        with open(tmp, "w", newline="") as f:
            csv.writer(f).writerows(lines)
        os.replace(tmp, self.out / "results.csv")


def _jsonable(v):
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return float(v)
    return str(v)


def _fmt_csv(v):
    if isinstance(v, float):
        return "nan" if math.isnan(v) else repr(v)
    return "" if v is None else v


# ---------------------------------------------------------------------------------------------- table
def table(rows: list[dict], metric: str = "adi", cls: str = MEAN) -> str:
    """The papers' layout (Tables 6-8): rows = models, columns = clean ("S. Dice"), P. eps..., IF. eps...,
    in percent with two decimals."""
    sel = [r for r in rows if r["class"] == cls]
    models = list(dict.fromkeys(r["model"] for r in sel))
    cols = [("clean", 0.0)]
    for attack in ("pgd", "ifgsm"):
        cols += [(attack, e) for e in sorted({float(r["eps"]) for r in sel if r["attack"] == attack})]
    names = ["S. Dice" if a == "clean" else f"{'P.' if a == 'pgd' else 'IF.'} {e:g}" for a, e in cols]
    lookup = {(r["model"], r["attack"], float(r["eps"])): r[metric] for r in sel}
    width = max([len("Methods")] + [len(m) for m in models])
    head = "Methods".ljust(width) + "".join(f"  {n:>8}" for n in names)
    lines = [f"{metric.upper()} (%), class {cls}", head]
    for m in models:
        vals = [lookup.get((m, a, e)) for a, e in cols]
        lines.append(m.ljust(width) + "".join(f"  {'-' if v is None else f'{100 * v:.2f}':>8}" for v in vals))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- plot
def plot(rows: list[dict], path: Path, cls: str = MEAN) -> Path:
    """ADI and TVDI (and 3D Dice) against eps, one line per model and attack (eps 0 = clean)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sel = [r for r in rows if r["class"] == cls]
    metrics = [("adi", "ADI"), ("tvdi", "TVDI"), ("dice3d", "per-case 3D Dice")]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4), squeeze=False)
    models = list(dict.fromkeys(r["model"] for r in sel))
    colors = {m: f"C{i % 10}" for i, m in enumerate(models)}  # one colour per model, one line style per attack
    for ax, (key, title) in zip(axes[0], metrics):
        for m in models:
            clean = [r for r in sel if r["model"] == m and r["attack"] == "clean"]
            for attack, style in (("pgd", "-o"), ("ifgsm", "--s")):
                pts = sorted((float(r["eps"]), r[key]) for r in sel if r["model"] == m and r["attack"] == attack)
                if not pts:
                    continue
                if clean and not any(e == 0 for e, _ in pts):
                    pts = [(0.0, clean[0][key])] + pts
                ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], style, color=colors[m],
                        label=f"{m} {attack.upper()}")
        ax.set_xlabel("eps (noise level)")
        ax.set_ylabel(f"{title} (%)")
        ax.set_title(title)
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------- examples
def save_examples(folder: Path, examples: list, spacing=None) -> list[Path]:
    """For each example: NIfTI files (clean image, adversarial image, perturbation, label, clean and
    adversarial prediction; preprocessed space, channel 0) and a PNG overlay to look at."""
    import SimpleITK as sitk
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for ex in examples:
        start = ex.ref.start[:1] if ex.image.ndim == 3 else ex.ref.start  # 2d: the slice index only
        stem = ex.case + "".join(f"_{a}{s}" for a, s in zip("zyx", start))
        arrays = {"image": ex.image[0], "adversarial": ex.adversarial[0], "noise": ex.adversarial[0] - ex.image[0],
                  "label": ex.label.astype(np.uint8), "pred_adversarial": ex.pred.astype(np.uint8)}
        if ex.pred_clean is not None:
            arrays["pred_clean"] = ex.pred_clean.astype(np.uint8)
        for name, a in arrays.items():
            img = sitk.GetImageFromArray(a[None] if a.ndim == 2 else a)
            if spacing is not None:
                sp = list(spacing)[::-1]
                img.SetSpacing([float(s) for s in (sp + [1.0] * 3)[:img.GetDimension()]])
            p = folder / f"{stem}_{name}.nii.gz"
            sitk.WriteImage(img, str(p), useCompression=True)
            written.append(p)
        mid = (lambda a: a if a.ndim == 2 else a[a.shape[0] // 2])
        panels = [("image", arrays["image"], "gray"), ("adversarial", arrays["adversarial"], "gray"),
                  ("noise", arrays["noise"], "seismic"), ("label", arrays["label"], None)]
        if "pred_clean" in arrays:
            panels.append(("clean prediction", arrays["pred_clean"], None))
        panels.append(("adversarial prediction", arrays["pred_adversarial"], None))
        fig, axes = plt.subplots(1, len(panels), figsize=(3 * len(panels), 3.2))
        for ax, (title, a, cmap) in zip(axes, panels):
            a = mid(a)
            if cmap is None:
                ax.imshow(mid(arrays["image"]), cmap="gray")
                ax.imshow(np.ma.masked_equal(a, 0), cmap="autumn", alpha=0.5, interpolation="nearest")
            elif cmap == "seismic":
                v = float(np.abs(a).max()) or 1.0
                ax.imshow(a, cmap=cmap, vmin=-v, vmax=v)
            else:
                ax.imshow(a, cmap=cmap)
            ax.set_title(title, fontsize=8)
            ax.axis("off")
        fig.tight_layout()
        p = folder / f"{stem}.png"
        fig.savefig(p, dpi=80)
        plt.close(fig)
        written.append(p)
    return written


def format_checks(checks: list[dict]) -> str:
    return "\n".join(f"[{c['status'].upper():7}] {c['model']}: {c['check']}: {c['message']}" for c in checks)
