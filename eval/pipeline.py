"""The steps of ``nnunet-ima-attack`` after argument validation.

1. :func:`prepare` - every check that needs no model (dataset, checkpoints, test-data layout), the
   fingerprints of what produces each result, and the result store. Nothing is written yet.
2. :func:`evaluate_model` - per model: which results can be reused (same settings and same inputs)
   and which must be computed (saying why); load the model and data only if something is to be
   computed; check the label values; attack, one unit (test case) at a time, shared out over the
   job's processes (:mod:`.units`; one process is a job of one), each finished unit on disk
   (:mod:`.shards`); merge the runs; sanity checks. Rank 0 decides, merges and reports; the other
   ranks compute their share (:func:`.units.follow`).
3. :func:`publish` - the figures of every result (ADI convention of this run, the "worst" group:
   per sample the lowest Dice over clean and every attack at that eps), monotonicity checks,
   results.json / results.csv, tables, plot.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import report, units
from .data import check_label_values, load_fold_cases, load_raw_cases, raw_case_files
from .distributed import World
from .errors import EvalError
from .metrics import MEAN, adi, summarize, worst_counts
from .model import dataset_name, load_model, locate
from .provenance import CODE_VERSION, data_inputs, file_digest, versions
from .runner import CLEAN, WORST, AttackSettings, Evaluation, Evaluator
from .sanity import (check_budget, check_eps0, check_gradient_free, check_large_eps, check_more_steps, check_noise,
                     monotonicity_checks)
from .shards import ShardStore


@dataclass
class Plan:
    """Everything decided before the first attack."""

    args: object
    name: str                      # DatasetXXX_Name
    source: str                    # "fold" or "raw:<images folder>"
    eps_list: list                 # sorted noise levels
    attacks: list                  # attack names (no "worst")
    worst: bool                    # add the per-sample worst case
    settings: AttackSettings
    store: report.ResultStore
    checkpoints: dict              # trainer -> checkpoint path
    data: dict = field(default_factory=dict)  # trainer -> {"images": digest, "labels": digest}
    world: World = field(default_factory=World)  # this process's rank in the job (one process: rank 0 of 1)
    shards: ShardStore | None = None             # finished units of unmerged runs (-o/shards)

    @property
    def out(self) -> Path:
        return Path(self.args.output)


def _check_raw_layout(args, checkpoint: Path) -> None:
    for what, folder in (("images folder (-i)", args.images), ("labels folder (-l)", args.labels)):
        if not Path(folder).is_dir():
            raise EvalError(f"{what} {folder} does not exist")
    dj = json.loads((checkpoint.parent.parent / "dataset.json").read_text())
    raw_case_files(args.images, args.labels, dj["file_ending"], len(dj.get("channel_names", dj.get("modality", {0: 0}))))


def prepare(args, world: World | None = None) -> Plan:
    """Checks and fingerprints; the store is opened (a damaged one set aside; by rank 0 alone) but nothing
    is created."""
    world = world or World()
    name = dataset_name(args.dataset)
    ckpts = {tr: locate(name, args.configuration, args.fold, tr, args.plans, args.checkpoint) for tr in args.trainers}
    if args.images:
        _check_raw_layout(args, next(iter(ckpts.values())))
    settings = AttackSettings(norm=args.norm, loss=args.loss, pgd_steps=args.pgd_steps, ifgsm_steps=args.ifgsm_steps,
                              segpgd_steps=args.segpgd_steps, cospgd_steps=args.cospgd_steps,
                              apgd_steps=args.apgd_steps, batch_size=args.batch_size,
                              seed=args.seed, convention=args.adi_convention, iterate=args.iterate)
    source = "fold" if not args.images else f"raw:{os.path.abspath(args.images)}"
    store = report.ResultStore(Path(args.output), overwrite=args.overwrite or not world.is_main)
    for m in store.messages:
        print(m)
    return Plan(args, name, source, sorted(set(args.eps)), [a for a in args.attacks if a != WORST],
                WORST in args.attacks, settings, store, ckpts, world=world, shards=ShardStore(Path(args.output)))


# ------------------------------------------------------------------------------------- run keys
def common_key(plan: Plan, tr: str) -> dict:
    a = plan.args
    return {"model": tr, "dataset": plan.name, "configuration": a.configuration, "plans": a.plans, "fold": a.fold,
            "checkpoint": a.checkpoint, "source": plan.source, "max_samples": a.max_samples}


def run_keys(plan: Plan, tr: str) -> list[dict]:
    """The clean run and every (attack, eps) run of model ``tr``, with the settings that define them."""
    c, s = common_key(plan, tr), plan.settings
    keys = [{**c, "attack": CLEAN, "eps": 0.0, "norm": "-", "loss": "-", "steps": 0, "seed": "-", "batch_size": "-",
             "iterate": "-"}]
    keys += [{**c, "attack": a, "eps": e, "norm": s.norm, "loss": s.loss, "steps": s.steps(a), "seed": s.seed,
              "batch_size": s.batch_size, "iterate": s.iterate_of(a)} for a in plan.attacks for e in plan.eps_list]
    return keys


def inputs_of(plan: Plan, tr: str) -> dict:
    """Fingerprints of what produces model ``tr``'s results (see :mod:`.provenance`)."""
    a = plan.args
    if tr not in plan.data:
        ident = None
        if plan.source == "fold":
            from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

            pm = PlansManager(str(plan.checkpoints[tr].parent.parent / "plans.json"))
            ident = pm.get_configuration(a.configuration).data_identifier
        pre = Path(os.environ["nnUNet_preprocessed"]) / plan.name
        plan.data[tr] = data_inputs(plan.source, a.images, a.labels, pre, ident, a.fold)
    return {"checkpoint": file_digest(plan.checkpoints[tr]), **plan.data[tr], "code": CODE_VERSION}


def split_reusable(plan: Plan, tr: str, keys: list[dict], inputs: dict) -> tuple[dict, list]:
    """({row key: stored counts} reusable, [(key, why)] to compute); prints each recomputation's reason."""
    found, todo = {}, []
    for k in keys:
        counts, why = (None, "--overwrite") if plan.args.overwrite else plan.store.lookup(k, inputs)
        if counts is None:
            todo.append((k, why))
            if why != "new":
                print(f"{tr}: recomputing {k['attack']} eps={k['eps']:g}: {why}")
        else:
            found[report.row_key(k)] = counts
    return found, todo


# ------------------------------------------------------------------------------------- per model
def _choose_examples(ev: Evaluator, n: int) -> set:
    """n samples with foreground, evenly spread over the test set."""
    if n <= 0:
        return set()
    fg = []
    for r in ev.refs:
        lab = ev.cases[r.case].label
        part = lab[r.start[0]] if ev.dim == 2 else lab[tuple(slice(a, a + s) for a, s in zip(r.start, r.size))]
        if (part > 0).any():
            fg.append(r)
    pool = fg or ev.refs
    idx = sorted({int(round(i)) for i in np.linspace(0, len(pool) - 1, min(n, len(pool)))})
    return {pool[i] for i in idx}


def load_evaluator(plan: Plan, tr: str, share: units.WorkOrder | None = None) -> Evaluator:
    """Model, test cases (label values checked before any attack) and batches; with ``share`` (a rank's
    work order) only the cases and samples of this rank's share."""
    a = plan.args
    model = load_model(plan.name, a.configuration, a.fold, tr, a.plans, a.checkpoint, a.device)
    names = None if share is None else share.cases_of(plan.world.rank)
    if a.images:
        cases, where = load_raw_cases(model, a.images, a.labels, names), f"labels (-l {a.labels})"
    else:
        cases, where = load_fold_cases(model, a.fold, names), f"fold {a.fold}'s preprocessed labels"
    check_label_values(cases, model.num_classes, model.label_manager.ignore_label, where)
    packs = None if share is None else units.share_packs(cases, len(model.patch_size), model.patch_size, share,
                                                         plan.world.rank)
    return Evaluator(model, cases, plan.settings, max_samples=a.max_samples, progress=not a.quiet, packs=packs)


def load_share(plan: Plan, tr: str, order: units.WorkOrder) -> Evaluator:
    """A rank's evaluator for its share of ``order``, after checking that the checkpoint and the test data
    it sees are the ones rank 0 fingerprinted (several nodes: the same files on every node)."""
    here = inputs_of(plan, tr)
    if here != order.inputs:
        from .provenance import describe_changes

        raise EvalError(f"{tr}: the files on this node are not rank 0's ({describe_changes(order.inputs, here)}): "
                        f"every node needs the same checkpoint and test data")
    return load_evaluator(plan, tr, order)


def evaluate_model(plan: Plan, tr: str) -> dict:
    """Counts of every run of model ``tr`` ({row key: Counts}); computes only what cannot be reused.
    Ranks > 0 compute their share of rank 0's work order and return {}."""
    world = plan.world
    if not world.is_main:
        units.follow(world, tr, lambda order: load_share(plan, tr, order), plan.shards, _save_examples(plan))
        return {}
    keys, inputs = run_keys(plan, tr), inputs_of(plan, tr)
    found, todo = split_reusable(plan, tr, keys, inputs)
    if not todo:
        units.skip(world, tr)
        print(f"{tr}: all {len(keys)} results already in {plan.store.json_path} with unchanged checkpoint, data "
              f"and settings (use --overwrite to recompute)")
        plan.store.checks = [c for c in plan.store.checks if c["model"] != tr] + \
            [c for c in plan.store.checks_on_disk if c["model"] == tr and not c["check"].startswith("non_increasing")]
        return found
    ev = load_evaluator(plan, tr)
    print(f"{tr}: {len(ev.cases)} cases, {len(ev.refs)} {'slices' if ev.dim == 2 else 'patches'} in "
          f"{len(ev.batches)} batches; {len(todo)} of {len(keys)} results to compute")
    order = units.plan_work(world, ev, tr, [k for k, _ in todo], inputs, plan.shards, reuse=not plan.args.overwrite,
                            keep=_choose_examples(ev, plan.args.save_examples))
    print(order.describe(world.size))
    units.lead(world, ev, order, plan.shards, not plan.args.quiet, _save_examples(plan))
    computed = {}  # attack -> its evaluations computed now (the budget check reads their perturbations)
    for k, evaluation, record in units.merge_runs(order, plan.shards, plan.settings.convention):
        plan.store.put(k, inputs, evaluation.counts, evaluation.seconds, ev.model.class_names,
                       {"versions": versions(), "units": record})
        found[report.row_key(k)] = evaluation.counts
        if k["attack"] != CLEAN:
            computed.setdefault(k["attack"], []).append(evaluation)
            _say(ev, evaluation, plan.settings.convention)
    clean = Evaluation(CLEAN, 0.0, found[report.row_key(keys[0])], 0.0, convention=plan.settings.convention)
    checks = [] if plan.args.no_sanity else sanity_checks(plan, ev, keys, found, clean, computed)
    plan.store.checks = [c for c in plan.store.checks if c["model"] != tr] + checks
    plan.store.save()
    for k in order.runs:  # results.json holds them now
        plan.shards.clear(k, inputs)
    return found


def _say(ev: Evaluator, evaluation: Evaluation, convention: str) -> None:
    s = summarize(evaluation.counts, convention)
    print(f"  {ev.model.label} {evaluation.attack:9} eps={evaluation.eps:<8g} ADI {100 * s['adi'][MEAN]:6.2f}  "
          f"TVDI {100 * s['tvdi'][MEAN]:6.2f}  3D Dice {100 * s['dice3d'][MEAN]:6.2f}  ({evaluation.seconds:.1f} s)")


def _save_examples(plan: Plan):
    """``save(ev, key, evaluation, batches)``: the examples of one task, with the clean prediction beside
    (predicted again for the kept samples of ``batches``: one forward), to examples/<model>/<attack>_eps<eps>."""
    def save(ev: Evaluator, key: dict, evaluation: Evaluation, batches: list) -> None:
        if key["attack"] == CLEAN:
            return
        kept = {ex.ref for ex in evaluation.examples}
        batches = [b for b in batches if kept & set(b.refs)]
        clean_pred = {ex.ref: ex.pred for ex in ev.run(CLEAN, 0.0, batches=batches, keep=kept,
                                                       on_batch=lambda b: None).examples}
        for ex in evaluation.examples:
            ex.pred_clean = clean_pred.get(ex.ref)
        sub = plan.out / "examples" / ev.model.label / f"{evaluation.attack}_eps{evaluation.eps:g}"
        report.save_examples(sub, evaluation.examples, ev.model.configuration_manager.spacing)

    return save


# ------------------------------------------------------------------------------------- sanity
def middle_eps(eps_list: list) -> float | None:
    """The middle positive noise level (the one the strength checks use)."""
    pos = [e for e in eps_list if e > 0]
    return pos[len(pos) // 2] if pos else None


def sanity_checks(plan: Plan, ev: Evaluator, keys: list[dict], found: dict, clean, computed: dict) -> list[dict]:
    """The runs computed now stay in their eps-ball and off padding; eps = 0 reproduces clean; a huge eps
    breaks a standard model; at the middle eps: 5x the steps do not find much lower Dice, random noise
    and a gradient-free search are weaker than the worst case (see :mod:`.sanity`). In ``--adi``'s convention."""
    checks = [check_budget(ev, runs) for runs in computed.values()]
    # each attack at eps 0, run through its own steps (the reported eps-0 rows skip them: the 0-ball holds x)
    checks += [check_eps0(ev, a, clean) for a in plan.attacks]
    checks.append(check_large_eps(ev, clean))
    mid = middle_eps(plan.eps_list)
    if mid is None:
        return checks
    at_mid = {k["attack"]: found[report.row_key(k)] for k in keys if k["eps"] == mid and k["attack"] != CLEAN}
    conv = plan.settings.convention
    strongest = min(at_mid, key=lambda a: adi(at_mid[a], conv)[MEAN])
    whitebox = worst_counts(clean.counts, list(at_mid.values()), conv)[0]
    checks.append(check_more_steps(ev, strongest, mid, at_mid[strongest]))
    checks.append(check_noise(ev, mid, whitebox))
    checks.append(check_gradient_free(ev, mid, whitebox))
    return checks


# ------------------------------------------------------------------------------------- publish
def _classes(plan: Plan, key: dict) -> dict:
    run = plan.store.run_of(key)
    return {int(c): n for c, n in run["classes"].items()}


def figures(plan: Plan, tr: str, found: dict) -> tuple[list[dict], list[dict]]:
    """Rows and per-case rows of model ``tr`` from the counts (this run's ADI convention), with the
    "worst" group when asked: per sample the lowest Dice over clean and every attack at that eps."""
    conv = plan.settings.convention
    keys = run_keys(plan, tr)
    classes = _classes(plan, keys[0])
    items = [(k, found[report.row_key(k)], plan.store.run_of(k)["seconds"]) for k in keys]
    clean = items[0][1]
    if plan.worst:
        for e in plan.eps_list:
            group = [(k, c, t) for k, c, t in items if k["attack"] != CLEAN and k["eps"] == e]
            counts, _ = worst_counts(clean, [c for _, c, _ in group], conv)
            key = {**group[0][0], "attack": WORST, "steps": 0, "iterate": "-",
                   "worst_of": ",".join([CLEAN] + [k["attack"] for k, _, _ in group])}
            items.append((key, counts, sum(t for _, _, t in group)))
    rows, per_case = [], []
    for k, counts, seconds in items:
        s = summarize(counts, conv)
        rows += report.make_rows(k, s, classes, seconds)
        per_case += [{**k, "case": c, "dice3d": v} for c, v in s["dice3d_per_case"].items()]
    return rows, per_case


def publish(plan: Plan, results: dict) -> None:
    """Figures of the selection (plus rows of models not touched), checks, files, tables, plot."""
    store, models = plan.store, list(results)
    rows, per_case = [], []
    for tr, found in results.items():
        r, p = figures(plan, tr, found)
        rows += r
        per_case += p
    mono = monotonicity_checks(rows)
    store.rows = [r for r in store.rows if r["model"] not in models] + rows
    store.per_case = [p for p in store.per_case if p["model"] not in models] + per_case
    kept = [c for c in store.checks_on_disk if c["model"] not in models]
    store.checks = kept + [c for c in store.checks if c["model"] in models] + mono
    store.save()
    print()
    for metric in ("adi", "tvdi", "dice3d"):
        print(report.table(rows, metric))
        print()
    print(f"ADI convention: {plan.settings.convention} (the paper's tables used the authors' code: --adi paper)")
    checks = [c for c in store.checks if c["model"] in models]
    if checks:
        print("Sanity checks:")
        print(report.format_checks(checks))
    png = report.plot(rows, plan.out / "robustness.png")
    print(f"\nwrote {plan.out / 'results.csv'}, {store.json_path}, {png}")
