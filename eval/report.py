"""Results on disk and on screen: results.json / results.csv, the papers' table, plots, examples.

``results.json`` = {"version", "runs", "rows", "per_case", "checks"}:

* ``runs``: one entry per computed (model, attack, eps) with the settings that define it (``key``),
  the fingerprints of what produced it (``inputs``: checkpoint, images, labels, code; see
  :mod:`.provenance`), its time, and the file under ``samples/`` holding its per-sample TP/FP/FN
  counts. A rerun reuses a run only when key and inputs are both the same; figures are always
  recomputed from the counts, so adding ``worst`` needs no new attack, nor does changing ``--adi``
  except for runs that keep their best iterate (APGD, ``--iterate best``): their point is the one with
  the lowest Dice of the convention, so another convention is another run.
* ``rows`` (also ``results.csv``): one per (model, scope, attack, eps, class) with ADI, TVDI and per-case 3D
  Dice (class "mean" = over foreground classes; ``scope`` "sample" = slices / patch tiles attacked one by
  one, "case" = whole cases through nnU-Net's predictor, :mod:`.case_scope`, figures with nnU-Net's rules,
  :mod:`.case_metrics`), for the last run's selection plus the rows of models
  it did not touch. ``attack`` "worst" = per sample the lowest Dice over clean and the attacks at that eps.

* ``sanity``: the attack-strength sanity checks of each model and selection, stored like runs (the
  settings that define them, the inputs that produced them) and reused on the same terms; ``checks``
  holds what the last run printed: those, the budget check of every stored run and the monotonicity checks.
* a row is named by everything that tells models apart (:mod:`.naming`): ``trainer`` holds the trainer,
  ``model`` the trainer alone or with its plans / configuration / fold / checkpoint when the folder holds
  several models of one trainer. ``norm`` is the norm the row's eps is measured in (also on clean rows).

Files are rewritten atomically (fsync) after every finished (model, attack, eps), rows included, so an
interrupted run loses at most the noise level in progress and :func:`read_table` reads what finished.
``results.json`` is read by one reader (:mod:`.results_file`): a file that cannot be used is renamed aside
(``results.json.damaged``) and its rows recomputed, an entry with the wrong structure is left out with a
message; files are read, renamed and removed inside the output folder only. Nothing is created before
the first result.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import math
from pathlib import Path

import numpy as np

from nnunet_ima.eps_scale import NORM_NAMES
from nnunet_ima.plumbing import atomic_write, atomic_write_text, to_plain
from nnunet_ima.ui import pyplot

from .case_metrics import CASE_KEY_FIELDS, SAMPLE, case_dice, scope_of
from .metrics import DEFAULT_ADI, MEAN, Counts, sample_dice, worst_counts
from .naming import identity, name_models, trainer_of
from .results_file import ResultsFileError, _row_problem, inside, read_results

RESULTS_VERSION = 2
FIELDS = ["model", "attack", "eps", "class", "class_id", "adi", "tvdi", "dice3d", "n_samples", "n_empty",
          "adi_convention", "norm", "loss", "steps", "iterate", "worst_of", "seed", "batch_size", "scope", "tile_step",
          "mirroring", "budget", "trainer", "dataset", "configuration", "plans", "fold", "checkpoint", "source",
          "max_samples", "seconds"]
# settings that define a run (besides its inputs): a rerun reuses a finished run only if all of these match
# ("iterate": "final", or "best-<ADI convention>" for a run that keeps each sample's lowest-Dice iterate)
KEY_FIELDS = ["model", "attack", "eps", "norm", "loss", "steps", "iterate", "seed", "batch_size", "dataset",
              "configuration", "plans", "fold", "checkpoint", "source", "max_samples"]


def row_key(row: dict) -> str:
    """The identity of a run: :data:`KEY_FIELDS`, and for the case scope also its scope, tile step, mirroring and
    budget (a sample-scope key is spelled as before the case scope existed, so earlier results stay reusable)."""
    extra = [f"{k}={row.get(k)}" for k in CASE_KEY_FIELDS] if scope_of(row) != SAMPLE else []
    return json.dumps([str(row.get(k)) for k in KEY_FIELDS] + extra)


def run_key_of(row: dict) -> str:
    """The :func:`row_key` of the run a row was computed from (a row's ``model`` is its name, the run's its trainer)."""
    return row_key({**row, "model": trainer_of(row)})


def entry_key(key: dict) -> str:
    """The store's key of a sanity-check entry: every field of ``key``."""
    return json.dumps(key, sort_keys=True, default=str)


def make_rows(base: dict, summary: dict, class_names: dict, seconds: float) -> list[dict]:
    """Rows of one (model, attack, eps): one per foreground class plus the "mean" row."""
    rows = []
    for cid in [*class_names, MEAN]:
        rows.append({**base, "class": class_names.get(cid, MEAN), "class_id": cid if cid != MEAN else "",
                     "adi": summary["adi"][cid], "tvdi": summary["tvdi"][cid], "dice3d": summary["dice3d"][cid],
                     "n_samples": summary["n_samples"], "n_empty": summary["n_empty"][cid],
                     "adi_convention": summary.get("adi_convention", ""), "seconds": round(seconds, 3)})
    return rows


def _aside(path: Path, tag: str) -> Path:
    """Rename ``path`` to ``path.<tag>`` (``.<tag>.1``, ... if taken); returns the new name. Only ever
    called on paths inside the output folder (:func:`~.results_file.inside`)."""
    target, i = path.with_name(f"{path.name}.{tag}"), 0
    while target.exists():
        i += 1
        target = path.with_name(f"{path.name}.{tag}.{i}")
    path.rename(target)
    return target


class ResultStore:
    """The output folder's results: runs (with their per-sample counts), sanity checks, rows, checks.

    Nothing is written (not even the folder) before the first :meth:`put` or :meth:`save`.
    ``messages``: what loading had to say (a damaged or old results file set aside, entries left out).
    ``finished``: results computed and saved by this process.
    """

    def __init__(self, out: Path, overwrite: bool = False):
        self.out = Path(out)
        self.json_path = self.out / "results.json"
        self.runs: dict[str, dict] = {}
        self.sanity: dict[str, dict] = {}
        self.rows, self.per_case, self.checks, self.checks_on_disk = [], [], [], []
        self.messages: list[str] = []
        self.finished = 0
        if self.json_path.is_file() and not overwrite:
            self._load()

    def _load(self) -> None:
        try:
            parsed = read_results(self.out)
        except ResultsFileError as e:
            moved = _aside(self.json_path, "damaged")
            self.messages.append(f"{e}; kept as {moved.name}, its results are recomputed")
            return
        if parsed.version != RESULTS_VERSION:
            moved = _aside(self.json_path, "old")
            self.messages.append(f"{self.json_path} was written by an older version (no record of the checkpoint "
                                 f"and data behind each row); kept as {moved.name}, its results are recomputed")
            return
        self.messages += parsed.problems
        self.runs = {row_key(r["key"]): r for r in parsed.runs}
        self.sanity = {entry_key(e["key"]): e for e in parsed.sanity}
        self.rows, self.per_case, self.checks_on_disk = parsed.rows, parsed.per_case, parsed.checks

    def lookup(self, key: dict, inputs: dict, examples: int = 0) -> tuple[Counts | None, str]:
        """The stored counts of ``key`` if its inputs are ``inputs`` (and, with ``examples`` > 0, that many
        examples were saved with it); else (None, why it is computed)."""
        run = self.runs.get(row_key(key))
        if run is None:
            return None, "new"
        if run["inputs"] != inputs:
            from .provenance import describe_changes

            return None, describe_changes(run["inputs"], inputs)
        saved = run.get("examples") or {}
        folder = inside(self.out, saved.get("folder"))
        if examples and (saved.get("n") != examples or folder is None or not folder.is_dir()):
            return None, f"--save-examples {examples}: its examples are not saved yet"
        path = inside(self.out, run["samples"])
        try:
            with np.load(path, allow_pickle=False) as z:
                return Counts(z["tp"], z["fp"], z["fn"], [str(c) for c in z["cases"]]), "reused"
        except (OSError, ValueError, KeyError, EOFError) as e:
            if path.exists():
                moved = _aside(path, "damaged")
                return None, f"its per-sample file was unreadable ({e.__class__.__name__}; kept as {moved.name})"
            return None, f"its per-sample file {run['samples']} is missing"

    def run_of(self, key: dict) -> dict | None:
        return self.runs.get(row_key(key))

    def put(self, key: dict, inputs: dict, counts: Counts, seconds: float, classes: dict, extra: dict) -> None:
        """Record a computed run: counts to ``samples/<id>.npz``, its entry to results.json."""
        rid = hashlib.sha256(json.dumps([row_key(key), inputs], sort_keys=True).encode()).hexdigest()[:16]
        rel = f"samples/{rid}.npz"
        (self.out / "samples").mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        np.savez_compressed(buf, tp=counts.tp, fp=counts.fp, fn=counts.fn, cases=np.array(counts.cases, dtype=str))
        with atomic_write(self.out / rel, "wb") as f:
            f.write(buf.getvalue())
        old = self.runs.get(row_key(key))
        stale = inside(self.out, old["samples"]) if old is not None and old["samples"] != rel else None
        if stale is not None and stale.is_file():
            stale.unlink()
        self.runs[row_key(key)] = {"key": key, "inputs": inputs, "samples": rel, "seconds": round(seconds, 3),
                                   "classes": {str(k): v for k, v in classes.items()}, **extra}
        self.finished += 1
        self.save()

    def lookup_checks(self, key: dict, inputs: dict) -> tuple[list | None, str]:
        """The stored sanity checks of ``key`` if they were made from ``inputs``; else (None, why not)."""
        entry = self.sanity.get(entry_key(key))
        if entry is None:
            return None, "new"
        if entry["inputs"] != inputs:
            from .provenance import describe_changes

            return None, describe_changes(entry["inputs"], inputs)
        return entry["checks"], "reused"

    def put_checks(self, key: dict, inputs: dict, checks: list[dict]) -> None:
        """Record the sanity checks ``key`` made from ``inputs`` (and save)."""
        self.sanity[entry_key(key)] = {"key": key, "inputs": inputs, "checks": checks}
        self.save()

    def replace_model(self, ident: tuple, rows: list, per_case: list) -> None:
        """The rows and per-case rows of model ``ident`` (:func:`~.naming.identity`) become ``rows``, ``per_case``."""
        self.rows = [r for r in self.rows if identity(r) != ident] + rows
        self.per_case = [p for p in self.per_case if identity(p) != ident] + per_case

    def save(self) -> None:
        """Write results.json and results.csv (atomically), every model named (:func:`~.naming.name_models`)."""
        self.out.mkdir(parents=True, exist_ok=True)
        name_models(self.rows, self.per_case, self.checks)
        payload = {"version": RESULTS_VERSION, "runs": list(self.runs.values()), "rows": self.rows,
                   "per_case": self.per_case, "checks": self.checks, "sanity": list(self.sanity.values())}
        atomic_write_text(self.json_path, json.dumps(to_plain(payload, for_json=True), indent=1))
        out = io.StringIO()
        w = csv.writer(out)
        w.writerow(FIELDS)
        w.writerows([_fmt_csv(r.get(f)) for f in FIELDS] for r in self.rows)
        atomic_write_text(self.out / "results.csv", out.getvalue())


def read_table(out_dir) -> list[dict]:
    """The result rows of an ``nnunet-ima-attack`` output folder, typed, for other tools (the demo's verdict).

    One dict per (model, attack, eps, class) with at least ``model`` (str: the model's name, the trainer
    unless the folder holds several models of one trainer, see :mod:`.naming`), ``trainer``, ``attack``
    (str: "clean", an attack name, or "worst"), ``eps`` (float), ``class`` (str; "mean" = over foreground
    classes), ``adi``, ``tvdi``, ``dice3d`` (float, 0..1, NaN where undefined), ``norm``, plus every other
    column the run wrote (loss, steps, n_samples, adi_convention, ...). Read from ``results.json``; from
    ``results.csv`` when the JSON is missing or unusable; ``[]`` when the folder has neither. Entries with
    the wrong structure are left out.
    """
    out = Path(out_dir)
    try:
        parsed = read_results(out)
    except ResultsFileError:
        parsed = None
    rows = parsed.rows if parsed is not None else None
    if rows is None:
        if not (out / "results.csv").is_file():
            return []
        with open(out / "results.csv", newline="") as f:
            rows = [r for r in csv.DictReader(f) if _row_problem(r) is None]
    return [_typed(r) for r in rows]


def read_sample_dice(out_dir, scope: str = SAMPLE) -> dict[tuple[str, str, float], tuple[list, np.ndarray]]:
    """Per-sample Dice behind each ADI of an ``nnunet-ima-attack`` output folder, for paired statistics
    across models (e.g. a bootstrap over test samples); ``scope="case"``: per-case Dice of the case scope.

    Returns {(model, attack, eps): (cases, dice)} for every row of class "mean" in ``results.json``
    (``model``: the row's name, see :func:`read_table`):
    ``dice`` (N,) float64, each sample's Dice over the foreground classes in the row's ADI convention
    (:func:`~.metrics.sample_dice`; NaN for the samples the "paper" convention skips), ``cases`` the
    case id of each sample. Samples are in the evaluation's order, so two models evaluated on the
    same test data are paired index by index (compare their ``cases``). The row's ADI is the mean of
    ``dice`` (NaN left out). "worst" rows are rebuilt from the per-sample counts of the rows their
    ``worst_of`` names ("clean" at eps 0), with the rule the evaluation uses (:func:`~.metrics.worst_counts`).
    ``{}`` when the folder holds no ``results.json`` with runs.

    ``scope="case"`` (``--scope case``): the rows of the case scope, one entry per case (whole cases as
    deployed, scored in their original geometry): ``dice`` is each case's Dice with nnU-Net's rules
    (:func:`~.case_metrics.case_dice`: the mean of the classes defined in that case, NaN if none is); the
    "worst" case per case is chosen as the evaluation chooses it (the "project" rule).
    """
    out = Path(out_dir)
    try:
        parsed = read_results(out)
    except ResultsFileError:
        return {}
    if parsed is None:
        return {}
    runs = {row_key(r["key"]): r for r in parsed.runs}
    by_name = {(r["model"], r["attack"], float(r["eps"])): r for r in parsed.rows
               if r["class"] == MEAN and scope_of(r) == scope}
    counts = {name: _run_counts(out, runs[run_key_of(r)]) for name, r in by_name.items() if run_key_of(r) in runs}
    result = {}
    for (model, attack, eps), r in by_name.items():
        conv = (r.get("adi_convention") or DEFAULT_ADI) if scope == SAMPLE else "project"  # the case scope's worst
        c = counts.get((model, attack, eps))
        if c is None and r.get("worst_of"):
            names = str(r["worst_of"]).split(",")  # "clean" first, then the attacks (eval/pipeline.py)
            parts = [counts.get((model, a, 0.0 if a == "clean" else eps)) for a in names]
            ok = len(parts) > 1 and names[0] == "clean" and None not in parts
            c = worst_counts(parts[0], parts[1:], conv)[0] if ok else None
        if c is not None:
            dice = sample_dice(c, conv) if scope == SAMPLE else case_dice(c)
            result[(model, attack, eps)] = (list(c.cases), dice.astype(np.float64))
    return result


def _run_counts(out: Path, run: dict) -> Counts | None:
    """The per-sample counts of one run entry (None when its file is missing or unreadable)."""
    try:
        with np.load(inside(out, run["samples"]), allow_pickle=False) as z:
            return Counts(z["tp"], z["fp"], z["fn"], [str(c) for c in z["cases"]])
    except (OSError, ValueError, KeyError, EOFError, TypeError):
        return None


def _typed(row: dict) -> dict:
    """A row with its numeric columns as numbers (CSV gives strings; JSON may hold NaN as null)."""
    r = dict(row)
    for k in ("eps", "adi", "tvdi", "dice3d", "seconds"):
        if k in r:
            v = r[k]
            r[k] = float("nan") if v in (None, "", "nan") else float(v)
    for k in ("steps", "n_samples"):
        if k in r and r[k] not in (None, ""):
            r[k] = int(float(r[k]))
    r["model"], r["attack"], r["class"] = str(r["model"]), str(r["attack"]), str(r["class"])
    r["scope"] = scope_of(r)
    return r


def _fmt_csv(v):
    if isinstance(v, float):
        return "nan" if math.isnan(v) else repr(v)
    return "" if v is None else v


# ---------------------------------------------------------------------------------------------- table
SHORT = {"pgd": "P.", "ifgsm": "IF.", "worst": "W."}  # the papers' column names (P. = PGD, IF. = IFGSM)


def attack_order(rows: list[dict]) -> list[str]:
    """Attacks in table order: the papers' PGD and IFGSM first, others as they appear, "worst" last."""
    seen = list(dict.fromkeys(r["attack"] for r in rows if r["attack"] != "clean"))
    first = [a for a in ("pgd", "ifgsm") if a in seen]
    return first + [a for a in seen if a not in first and a != "worst"] + (["worst"] if "worst" in seen else [])


def norm_note(rows: list[dict]) -> str:
    """", L2 norm" (the norm the rows' eps are measured in; several joined by "/"), "" when none is recorded."""
    norms = sorted({str(r.get("norm")) for r in rows if r.get("norm") not in (None, "", "-")})
    return f", {'/'.join(NORM_NAMES.get(n, n) for n in norms)} norm" if norms else ""


SCOPE_TITLES = {"sample": ("sample scope (slices / tiles)", "sample scope", "sample"),  # longest first: the
                "case": ("case scope (whole cases, as deployed)", "case scope", "case")}   # one that fits is shown


def _scope_title(scope: str, width: int) -> str:
    """The longest title of ``scope`` that fits ``width`` characters (its name at least)."""
    titles = SCOPE_TITLES.get(scope, (scope,))
    return next((t for t in titles if len(t) <= width), titles[-1])


def _columns(sel: list[dict]) -> list[tuple]:
    """(scope, attack, eps) columns: per scope (in order of appearance) clean, then the attacks in table order."""
    cols = []
    for scope in dict.fromkeys(scope_of(r) for r in sel):
        part = [r for r in sel if scope_of(r) == scope]
        cols.append((scope, "clean", 0.0))
        for attack in attack_order(part):
            cols += [(scope, attack, e) for e in sorted({float(r["eps"]) for r in part if r["attack"] == attack})]
    return cols


def table(rows: list[dict], metric: str = "adi", cls: str = MEAN) -> str:
    """The papers' layout (Tables 6-8): rows = models, columns = clean ("S. Dice"), P. eps..., IF. eps...,
    then any other attack and the "worst" group (W. eps), in percent with two decimals; one such column
    group per scope (sample, case), under a line naming the scope when the case scope is there."""
    sel = [r for r in rows if r["class"] == cls]
    models = list(dict.fromkeys(r["model"] for r in sel))
    cols = _columns(sel)
    names = ["S. Dice" if a == "clean" else f"{SHORT.get(a, a)} {e:g}" for _, a, e in cols]
    lookup = {(r["model"], scope_of(r), r["attack"], float(r["eps"])): r[metric] for r in sel}
    width = max([len("Methods")] + [len(m) for m in models])
    cw = max([8] + [len(n) for n in names])
    head = "Methods".ljust(width) + "".join(f"  {n:>{cw}}" for n in names)
    conv = {r.get("adi_convention") for r in sel if r.get("adi_convention")}
    note = f" ({'/'.join(sorted(conv))} convention)" if metric == "adi" and conv else ""
    lines = [f"{metric.upper()} (%), class {cls}{norm_note(sel)}{note}"]
    scopes = list(dict.fromkeys(sc for sc, _, _ in cols))
    if scopes != [SAMPLE]:
        spans = [sum(1 for c in cols if c[0] == sc) * (cw + 2) for sc in scopes]
        lines.append((" " * width + "".join(f"  {_scope_title(sc, n - 3)}".ljust(n) for sc, n in zip(scopes, spans))).rstrip())
    lines.append(head)
    for m in models:
        vals = [lookup.get((m, sc, a, e)) for sc, a, e in cols]
        lines.append(m.ljust(width) + "".join(f"  {'-' if v is None else f'{100 * v:.2f}':>{cw}}" for v in vals))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- plot
STYLES = ["-o", "--s", "-.^", ":v", "-D", "--x", "-.+"]


def plot(rows: list[dict], path: Path, cls: str = MEAN) -> Path:
    """ADI and TVDI (and 3D Dice) against eps, one line per model and attack (eps 0 = clean)."""
    plt = pyplot()
    sel = [r for r in rows if r["class"] == cls]
    metrics = [("adi", "ADI"), ("tvdi", "TVDI"), ("dice3d", "per-case 3D Dice")]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4), squeeze=False)
    models = list(dict.fromkeys(r["model"] for r in sel))
    colors = {m: f"C{i % 10}" for i, m in enumerate(models)}  # one colour per model, one line style per attack
    for ax, (key, title) in zip(axes[0], metrics):
        for m in models:
            for scope in dict.fromkeys(scope_of(r) for r in sel):  # the case scope: hollow markers, "(case)"
                _plot_lines(ax, [r for r in sel if r["model"] == m and scope_of(r) == scope], key, colors[m],
                            attack_order(sel), "" if scope == SAMPLE else f" ({scope})")
        ax.set_xlabel(f"eps (noise level{norm_note(sel)})")
        ax.set_ylabel(f"{title} (%)")
        ax.set_title(title)
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _plot_lines(ax, sel: list[dict], key: str, color: str, attacks: list, suffix: str) -> None:
    """One model's lines in one scope: one per attack (eps 0 = clean)."""
    clean = [r for r in sel if r["attack"] == "clean"]
    for i, attack in enumerate(attacks):
        style = "-*" if attack == "worst" else STYLES[i % len(STYLES)]
        pts = sorted((float(r["eps"]), r[key]) for r in sel if r["attack"] == attack)
        if not pts:
            continue
        if clean and not any(e == 0 for e, _ in pts):
            pts = [(0.0, clean[0][key])] + pts
        ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], style, color=color, label=f"{sel[0]['model']} "
                f"{attack.upper()}{suffix}", linewidth=2.5 if attack == "worst" else 1.2,
                markerfacecolor="none" if suffix else color)


# ---------------------------------------------------------------------------------------------- examples
def save_examples(folder: Path, examples: list, spacing=None) -> list[Path]:
    """For each example: NIfTI files (clean image, adversarial image, perturbation, label, clean and
    adversarial prediction; preprocessed space, channel 0) and a PNG overlay to look at."""
    import SimpleITK as sitk

    plt = pyplot()

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
