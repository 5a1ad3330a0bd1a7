"""The steps of ``nnunet-ima-attack`` after argument validation.

1. :func:`prepare` - every check that needs no model (dataset, checkpoints, test-data layout), the
   fingerprints of what produces each result, and the result store. Nothing is written yet.
2. :func:`evaluate_model` - per model and scope (``--scope``: slices / patch tiles, and / or whole cases
   through nnU-Net's predictor, :mod:`.case_scope`): which results and sanity checks can be reused (same
   settings and same inputs) and which must be computed (saying why); load the model and data only if
   something is to be computed; check the label values and eps against the inputs; attack; sanity checks
   (stored like results). The sample scope is computed one unit (test case) at a time, shared out over
   the job's processes (:mod:`.units`; one process is a job of one), each finished unit on disk
   (:mod:`.shards`), and each run saved with its rows as soon as all its units are there. Rank 0 decides,
   merges and reports; the other ranks compute their share (:func:`.units.follow`). The case scope runs
   in rank 0's process.
3. :func:`publish` - the figures of every result (ADI convention of this run, the "worst" group:
   per sample the lowest Dice over clean and every attack at that eps), the checks (stored sanity checks,
   every stored run's budget, monotonicity), results.json / results.csv, tables, plot.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from nnunet_ima.eps_scale import scale_problems
from nnunet_ima.ui import warn

from . import case_checks, case_scope, report, units
from .attacks import step_settings
from .case_metrics import case_summary
from .case_scope import CASE, SAMPLE, scope_of
from .data import check_label_values, load_fold_cases, load_raw_cases, raw_case_files
from .distributed import World
from .errors import EvalError
from .images import check_raw_cases
from .metrics import MEAN, adi, summarize, worst_counts
from .model import dataset_name, load_model, locate
from .naming import folder_name, identity, same_model
from .provenance import CODE_VERSION, data_inputs, file_digest, files_digest, versions
from .runner import CLEAN, WORST, AttackSettings, Evaluation, Evaluator
from .sanity import (budget_check, budget_measure, check_eps0, check_gradient_free, check_large_eps, check_more_steps,
                     check_noise, monotonicity_checks, vacuous_checks, vacuous_reason)
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
    scopes: list = field(default_factory=lambda: [SAMPLE])  # --scope: "sample" and / or "case"
    case: case_scope.CaseSettings = field(default_factory=case_scope.CaseSettings)  # the case scope's predictor
    world: World = field(default_factory=World)  # this process's rank in the job (one process: rank 0 of 1)
    shards: ShardStore | None = None             # finished units of unmerged sample-scope runs (-o/shards)

    @property
    def out(self) -> Path:
        return Path(self.args.output)


def _check_raw_layout(args, checkpoint: Path) -> None:
    for what, folder in (("images folder (-i)", args.images), ("labels folder (-l)", args.labels)):
        if not Path(folder).is_dir():
            raise EvalError(f"{what} {folder} does not exist")
    dj = json.loads((checkpoint.parent.parent / "dataset.json").read_text())
    check_raw_cases(raw_case_files(args.images, args.labels, dj["file_ending"],
                                   len(dj.get("channel_names", dj.get("modality", {0: 0})))))


def prepare(args, world: World | None = None) -> Plan:
    """Checks and fingerprints; the store is opened (a damaged one set aside; by rank 0 alone) but nothing
    is created."""
    world = world or World()
    name = dataset_name(args.dataset)
    ckpts = {tr: locate(name, args.configuration, args.fold, tr, args.plans, args.checkpoint) for tr in args.trainers}
    if args.images:
        _check_raw_layout(args, next(iter(ckpts.values())))
    settings = AttackSettings(norm=args.norm, loss=args.loss, batch_size=args.batch_size, seed=args.seed,
                              convention=args.adi_convention, iterate=args.iterate,
                              **{s: getattr(args, s) for s in step_settings()})
    source = "fold" if not args.images else f"raw:{os.path.abspath(args.images)}"
    store = report.ResultStore(Path(args.output), overwrite=args.overwrite or not world.is_main)
    for m in store.messages:
        print(m)
    scopes = [sc for sc in case_scope.SCOPES if sc in args.scope]
    case = case_scope.CaseSettings(args.tile_step, not args.no_mirroring, args.case_budget)
    plan = Plan(args, name, source, sorted(set(args.eps)), [a for a in args.attacks if a != WORST],
                WORST in args.attacks, settings, store, ckpts, scopes=scopes, case=case, world=world,
                shards=ShardStore(Path(args.output)))
    case_scope.check_case_scope(plan)
    return plan


# ------------------------------------------------------------------------------------- run keys
def common_key(plan: Plan, tr: str) -> dict:
    a = plan.args
    return {"model": tr, "dataset": plan.name, "configuration": a.configuration, "plans": a.plans, "fold": a.fold,
            "checkpoint": a.checkpoint, "source": plan.source, "max_samples": a.max_samples}


def run_keys(plan: Plan, tr: str, scope: str | None = None) -> list[dict]:
    """The clean run and every (attack, eps) run of model ``tr`` in each scope of ``--scope`` (or in
    ``scope`` alone), with the settings that define them."""
    scopes = plan.scopes if scope is None else [scope]
    c, s = common_key(plan, tr), plan.settings
    case = case_scope.case_keys(c, s, plan.case, plan.attacks, plan.eps_list) if CASE in scopes else []
    return (sample_keys(plan, tr) if SAMPLE in scopes else []) + case


def sample_keys(plan: Plan, tr: str) -> list[dict]:
    """The sample scope's runs (slices / patch tiles, each attacked on its own)."""
    c, s = {**common_key(plan, tr), "scope": SAMPLE}, plan.settings
    # the clean run carries the norm too: every row names the norm its table's eps are measured in
    keys = [{**c, "attack": CLEAN, "eps": 0.0, "norm": s.norm, "loss": "-", "steps": 0, "seed": "-",
             "batch_size": "-", "iterate": "-"}]
    keys += [{**c, "attack": a, "eps": e, "norm": s.norm, "loss": s.loss, "steps": s.steps(a), "seed": s.seed,
              "batch_size": s.batch_size, "iterate": s.iterate_of(a)} for a in plan.attacks for e in plan.eps_list]
    return keys


def inputs_of(plan: Plan, tr: str, scope: str = SAMPLE) -> dict:
    """Fingerprints of what produces model ``tr``'s results in ``scope`` (see :mod:`.provenance`)."""
    a = plan.args
    if tr not in plan.data:
        ident = None
        if plan.source == "fold":
            from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

            pm = PlansManager(str(plan.checkpoints[tr].parent.parent / "plans.json"))
            ident = pm.get_configuration(a.configuration).data_identifier
        pre = Path(os.environ["nnUNet_preprocessed"]) / plan.name
        folder = plan.checkpoints[tr].parent.parent  # the model's plans.json and dataset.json: network and preprocessing
        plan.data[tr] = {"plans": files_digest([folder / "plans.json", folder / "dataset.json"], folder),
                         **data_inputs(plan.source, a.images, a.labels, pre, ident, a.fold)}
    inputs = {"checkpoint": file_digest(plan.checkpoints[tr]), **plan.data[tr], "code": CODE_VERSION}
    return case_scope.case_inputs(plan, inputs) if scope == CASE else inputs


def split_reusable(plan: Plan, tr: str, keys: list[dict], inputs: dict) -> tuple[dict, list]:
    """({row key: stored counts} reusable, [(key, why)] to compute); prints each recomputation's reason."""
    found, todo = {}, []
    for k in keys:
        examples = plan.args.save_examples if k["attack"] != CLEAN else 0  # saved with the attacks' runs
        counts, why = (None, "--overwrite") if plan.args.overwrite else plan.store.lookup(k, inputs, examples)
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


def load_evaluator(plan: Plan, tr: str, share: units.WorkOrder | None = None, scope: str = SAMPLE) -> Evaluator:
    """Model, test cases (label values checked before any attack), batches; eps against the inputs. With
    ``share`` (a rank's work order of ``scope``) only the cases (and, in the sample scope, the samples) of
    this rank's share: the case scope's work needs the cases alone (no batches)."""
    a = plan.args
    model = load_model(plan.name, a.configuration, a.fold, tr, a.plans, a.checkpoint, a.device)
    names = None if share is None else share.cases_of(plan.world.rank)
    if a.images:
        cases, where = load_raw_cases(model, a.images, a.labels, names), f"labels (-l {a.labels})"
    else:
        cases, where = load_fold_cases(model, a.fold, names), f"fold {a.fold}'s preprocessed labels"
    check_label_values(cases, model.num_classes, model.label_manager.ignore_label, where)
    packs = None if share is None else {} if scope == CASE else \
        units.share_packs(cases, len(model.patch_size), model.patch_size, share, plan.world.rank)
    ev = Evaluator(model, cases, plan.settings, max_samples=a.max_samples, progress=not a.quiet, packs=packs)
    if share is None:  # rank 0 checked eps against the whole test set before sharing it out
        check_eps_scale(plan, ev)
    return ev


def load_share(plan: Plan, tr: str, order: units.WorkOrder, scope: str = SAMPLE):
    """A rank's work for its share of ``order`` in ``scope`` (:class:`.units.SampleWork` or
    :class:`.case_scope.CaseWork`), after checking that the checkpoint and the test data it sees are the
    ones rank 0 fingerprinted (several nodes: the same files on every node)."""
    here = inputs_of(plan, tr, scope)
    if here != order.inputs:
        from .provenance import describe_changes

        raise EvalError(f"{tr}: the files on this node are not rank 0's ({describe_changes(order.inputs, here)}): "
                        f"every node needs the same checkpoint and test data")
    ev = load_evaluator(plan, tr, order, scope)
    if scope == SAMPLE:
        return units.SampleWork(ev, _save_examples(plan))
    return case_scope.CaseWork(case_scope.CaseEvaluator(ev, plan.case, list(range(len(ev.cases)))),
                               _save_case_examples(plan, tr))


def check_eps_scale(plan: Plan, ev: Evaluator) -> None:
    """Each eps against the test inputs (:func:`nnunet_ima.eps_scale.scale_problems`): a warning where the size
    per voxel exceeds the inputs' standard deviation, EvalError where float32 cannot represent it."""
    n = sum(c.image.size for c in ev.cases)
    mean = sum(float(c.image.sum(dtype=np.float64)) for c in ev.cases) / n
    std = (sum(float(np.square(c.image - mean, dtype=np.float64).sum()) for c in ev.cases) / n) ** 0.5
    channels = ev.cases[0].image.shape[0]
    numel = int(np.median([channels * np.prod(r.size) for r in ev.refs]))
    warnings, refusals = scale_problems(plan.eps_list, plan.settings.norm, numel, std,
                                        "the test inputs' standard deviation", "--eps", "voxel")
    if refusals:
        raise EvalError(refusals[0])
    for w in warnings:
        warn("nnunet-ima-attack", w)


def evaluate_model(plan: Plan, tr: str) -> dict:
    """Counts of every run of model ``tr`` in each scope ({row key: Counts}) and its sanity checks in the
    store; computes only what cannot be reused. Ranks > 0 compute their share of rank 0's work orders (one
    per scope) and return {}."""
    world = plan.world
    if not world.is_main:  # rank 0 publishes one order per model for the sample scope, one for the case scope
        units.follow(world, tr, lambda order: load_share(plan, tr, order), plan.shards)
        if CASE in plan.scopes:
            units.follow(world, case_scope.job_name(tr), lambda order: load_share(plan, tr, order, CASE), plan.shards)
        return {}
    inputs = {sc: inputs_of(plan, tr, sc) for sc in plan.scopes}
    found, todo, checks_todo = {}, {}, []
    for sc in plan.scopes:
        reused, new = split_reusable(plan, tr, run_keys(plan, tr, sc), inputs[sc])
        found.update(reused)
        todo[sc] = new
        if not plan.args.no_sanity:
            stored, why = plan.store.lookup_checks(sanity_key(plan, tr, sc), inputs[sc])
            if stored is None:
                checks_todo.append(sc)
                if why != "new":
                    print(f"{tr}: recomputing the {sc}-scope sanity checks: {why}")
    n = len(run_keys(plan, tr))
    if not any(todo.values()) and not checks_todo:
        units.skip(world, tr)
        if CASE in plan.scopes:
            units.skip(world, case_scope.job_name(tr))
        print(f"{tr}: all {n} results{'' if plan.args.no_sanity else ' and the sanity checks'} already in "
              f"{plan.store.json_path} with unchanged checkpoint, data and settings (use --overwrite to recompute)")
        return found
    ev = load_evaluator(plan, tr)
    if SAMPLE in plan.scopes and (todo[SAMPLE] or SAMPLE in checks_todo):
        print(f"{tr}: {len(ev.cases)} cases, {len(ev.refs)} {'slices' if ev.dim == 2 else 'patches'} in "
              f"{len(ev.batches)} batches; {len(todo[SAMPLE])} of {len(run_keys(plan, tr, SAMPLE))} results to "
              f"compute" + ("; the sanity checks" if SAMPLE in checks_todo else ""))
        compute_runs(plan, ev, tr, todo[SAMPLE], inputs[SAMPLE], found)
        if SAMPLE in checks_todo:
            plan.store.put_checks(sanity_key(plan, tr, SAMPLE), inputs[SAMPLE],
                                  sanity_checks(plan, ev, run_keys(plan, tr, SAMPLE), found))
    else:
        units.skip(world, tr)
    if CASE in plan.scopes and (todo[CASE] or CASE in checks_todo):
        cev = compute_case_runs(plan, ev, tr, todo[CASE], inputs[CASE], found)
        if CASE in checks_todo:
            keys = run_keys(plan, tr, CASE)
            clean = Evaluation(CLEAN, 0.0, found[report.row_key(keys[0])], 0.0, convention="nnunet")
            plan.store.put_checks(sanity_key(plan, tr, CASE), inputs[CASE],
                                  case_checks.case_sanity_checks(plan, cev, clean, keys, found))
    elif CASE in plan.scopes:
        units.skip(world, case_scope.job_name(tr))
    return found


def keep_result(plan: Plan, tr: str, k: dict, inputs: dict, evaluation, extra: dict, found: dict) -> None:
    """Store one finished run (with ``extra``: versions, budget measure, examples) and save the rows of what
    finished: readable after an interruption."""
    plan.store.put(k, inputs, evaluation.counts, evaluation.seconds, extra.pop("classes"), extra)
    found[report.row_key(k)] = evaluation.counts
    plan.store.replace_model(identity(common_key(plan, tr)), *figures(plan, tr, found))
    plan.store.save()


def compute_runs(plan: Plan, ev: Evaluator, tr: str, todo: list, inputs: dict, found: dict) -> None:
    """Compute the sample scope's runs of ``todo``, unit by unit over the job's processes (finished units of
    an earlier job are kept); each run is saved with its budget measure, examples and rows once all its units
    are there, also when the job is interrupted (Ctrl-C)."""
    keep = _choose_examples(ev, plan.args.save_examples)
    order = units.plan_work(plan.world, ev, tr, [k for k, _ in todo], inputs, plan.shards,
                            reuse=not plan.args.overwrite, keep=keep)
    print(order.describe(plan.world.size))
    lead_and_merge(plan, tr, units.SampleWork(ev, _save_examples(plan)), order, inputs, found,
                   ev.model.class_names, lambda e: _say(ev, e, plan.settings.convention))


def compute_case_runs(plan: Plan, ev: Evaluator, tr: str, todo: list, inputs: dict, found: dict):
    """The case scope's runs of ``todo`` as :func:`compute_runs` computes the sample scope's: one unit per
    case and run, shared out over the job's processes. Returns the case evaluator (the sanity checks use it)."""
    from .case_examples import choose_cases, say

    cev = case_scope.CaseEvaluator(ev, plan.case)
    print(f"{ev.model.label}: case scope: {len(cev.indices)} cases, {cev.windows()} windows x "
          f"{len(cev.predictor.flips)} mirrored passes; {len(todo)} results to compute")
    order = case_scope.work_order(plan.world, cev, case_scope.job_name(tr), [k for k, _ in todo], inputs,
                                  plan.shards, reuse=not plan.args.overwrite,
                                  keep=choose_cases(cev, plan.args.save_examples))
    print(order.describe(plan.world.size))
    lead_and_merge(plan, tr, case_scope.CaseWork(cev, _save_case_examples(plan, tr)), order, inputs, found,
                   ev.model.class_names, lambda e: say(cev, e))
    return cev


def lead_and_merge(plan: Plan, tr: str, work, order: units.WorkOrder, inputs: dict, found: dict, classes: dict,
                   say) -> None:
    """Compute ``order`` over the job (rank 0's share through ``work``), then merge each run and keep it
    (:func:`keep_result`, with its budget measure, the units' record and, when examples are kept, their
    folder, :func:`_examples_folder`), printing it through ``say(evaluation)``; after Ctrl-C the runs whose
    units are all there are kept first."""
    def merge(complete_only: bool) -> None:
        for k, evaluation, record in units.merge_runs(order, plan.shards, plan.settings.convention,
                                                      complete_only=complete_only):
            extra = {"versions": versions(), "classes": classes, "units": record}
            if k["attack"] != CLEAN:
                extra["budget"] = budget_measure(evaluation)
                say(evaluation)
                if order.keep:
                    folder = _examples_folder(plan, tr, k).as_posix()
                    extra["examples"] = {"n": plan.args.save_examples, "folder": folder}
            keep_result(plan, tr, k, inputs, evaluation, extra, found)
            plan.shards.clear(k, inputs)  # results.json holds it now

    try:
        units.lead(plan.world, work, order, plan.shards, not plan.args.quiet)
    except KeyboardInterrupt:  # Ctrl-C: the runs with every unit are saved now (a failed rank: the rerun merges)
        merge(complete_only=True)
        raise
    merge(complete_only=False)


def _say(ev: Evaluator, evaluation: Evaluation, convention: str) -> None:
    s = summarize(evaluation.counts, convention)
    print(f"  {ev.model.label} {evaluation.attack:9} eps={evaluation.eps:<8g} ADI {100 * s['adi'][MEAN]:6.2f}  "
          f"TVDI {100 * s['tvdi'][MEAN]:6.2f}  3D Dice {100 * s['dice3d'][MEAN]:6.2f}  ({evaluation.seconds:.1f} s)")


def _examples_folder(plan: Plan, tr: str, key: dict) -> Path:
    """examples/<model>/<attack>_eps<eps> (the case scope's under examples/<model>/case/), relative to -o."""
    model = Path("examples") / folder_name(identity(common_key(plan, tr)))
    return (model / "case" if key["scope"] == CASE else model) / f"{key['attack']}_eps{key['eps']:g}"


def _save_case_examples(plan: Plan, tr: str):
    """``save(cev, key, evaluation, index)``: one kept case of a case-scope run, with its clean prediction
    beside (predicted again: one pass of nnU-Net's predictor), to :func:`_examples_folder`."""
    from .case_examples import save_case_examples

    def save(cev, key: dict, evaluation: Evaluation, index: int) -> None:
        if key["attack"] == CLEAN:
            return
        clean = cev.run(CLEAN, 0.0, cases=[index], keep={index})
        save_case_examples(plan.out / _examples_folder(plan, tr, key), cev, evaluation, clean)

    return save


def _save_examples(plan: Plan):
    """``save(ev, key, evaluation, batches)``: the examples of one task, with the clean prediction beside
    (predicted again for the kept samples of ``batches``: one forward), to :func:`_examples_folder`."""
    def save(ev: Evaluator, key: dict, evaluation: Evaluation, batches: list) -> None:
        if key["attack"] == CLEAN:
            return
        kept = {ex.ref for ex in evaluation.examples}
        batches = [b for b in batches if kept & set(b.refs)]
        clean_pred = {ex.ref: ex.pred for ex in ev.run(CLEAN, 0.0, batches=batches, keep=kept,
                                                       on_batch=lambda b: None).examples}
        for ex in evaluation.examples:
            ex.pred_clean = clean_pred.get(ex.ref)
        report.save_examples(plan.out / _examples_folder(plan, ev.model.trainer, key), evaluation.examples,
                             ev.model.configuration_manager.spacing)

    return save


# ------------------------------------------------------------------------------------- sanity
def middle_eps(eps_list: list) -> float | None:
    """The middle positive noise level (the one the strength checks use)."""
    pos = [e for e in eps_list if e > 0]
    return pos[len(pos) // 2] if pos else None


def sanity_key(plan: Plan, tr: str, scope: str = SAMPLE) -> dict:
    """What defines model ``tr``'s sanity checks in ``scope`` besides its inputs: the model, the test data,
    the attacks, the noise levels and every attack setting (the checks run the attacks and compare with
    their results); in the case scope also the predictor settings."""
    key = {**common_key(plan, tr), "checks": "sanity", "attacks": list(plan.attacks), "eps": list(plan.eps_list),
           **asdict(plan.settings)}
    return key if scope == SAMPLE else {**key, **case_scope.case_settings_key(plan.case)}


def sanity_checks(plan: Plan, ev: Evaluator, keys: list[dict], found: dict) -> list[dict]:
    """eps = 0 reproduces clean; a huge eps breaks a standard model; at the middle eps: 5x the steps do not
    find much lower Dice, random noise and a gradient-free search are weaker than the worst case (see
    :mod:`.sanity`). In ``--adi``'s convention. The strength checks of a model whose clean ADI is already near
    0 could not fail: they are reported as vacuous instead of run."""
    clean = found[report.row_key(keys[0])]
    # each attack at eps 0, run through its own steps (the reported eps-0 rows skip them: the 0-ball holds x)
    checks = [check_eps0(ev, a, clean) for a in plan.attacks]
    mid = middle_eps(plan.eps_list)
    at_mid = {k["attack"]: found[report.row_key(k)] for k in keys if k["eps"] == mid and k["attack"] != CLEAN}
    conv = plan.settings.convention
    strongest = min(at_mid, key=lambda a: adi(at_mid[a], conv)[MEAN]) if at_mid else None
    names = ["large_eps_near_zero"] + ([f"more_steps[{strongest}]", "noise_weaker", "gradient_free_weaker"]
                                       if strongest else [])
    vacuous = vacuous_reason(ev, clean)
    if vacuous:
        return checks + vacuous_checks(ev.model.label, names, vacuous)
    checks.append(check_large_eps(ev, clean))
    if strongest:
        whitebox = worst_counts(clean, list(at_mid.values()), conv)[0]
        checks += [check_more_steps(ev, strongest, mid, at_mid[strongest]), check_noise(ev, mid, whitebox),
                   check_gradient_free(ev, mid, whitebox)]
    return checks


def model_checks(plan: Plan, tr: str, rows: list[dict]) -> list[dict]:
    """What is printed for model ``tr``, per scope: its stored sanity checks (when made from these inputs and
    settings), the budget check of every stored run of each attack, the monotonicity checks of its rows."""
    out = []
    for sc in plan.scopes:
        stored, _ = plan.store.lookup_checks(sanity_key(plan, tr, sc), inputs_of(plan, tr, sc))
        keys = run_keys(plan, tr, sc)
        budgets = [budget_check(tr, plan.settings.norm, a, [plan.store.run_of(k) for k in keys if k["attack"] == a])
                   for a in plan.attacks]
        mono = monotonicity_checks([r for r in rows if scope_of(r) == sc])
        out += (stored or []) + (budgets + mono if sc == SAMPLE else [case_checks.tagged(c) for c in budgets + mono])
    ident = {k: v for k, v in common_key(plan, tr).items() if k not in ("source", "max_samples")}
    return [{**c, **ident, "model": tr} for c in out]


# ------------------------------------------------------------------------------------- publish
def _classes(plan: Plan, key: dict) -> dict:
    run = plan.store.run_of(key)
    return {int(c): n for c, n in run["classes"].items()}


def figures(plan: Plan, tr: str, found: dict) -> tuple[list[dict], list[dict]]:
    """Rows and per-case rows of model ``tr`` from the counts of ``found`` (the runs not found yet are left
    out), per scope: the sample scope in this run's ADI convention, the case scope with nnU-Net's rules
    (:mod:`.case_metrics`); with the "worst" group when asked and complete at an eps: per sample (case)
    the lowest Dice over clean and every attack at that eps."""
    rows, per_case = [], []
    for scope in plan.scopes:
        keys = [k for k in run_keys(plan, tr, scope) if report.row_key(k) in found]
        if not keys or keys[0]["attack"] != CLEAN:
            continue
        conv = plan.settings.convention if scope == SAMPLE else "project"  # the case scope's per-case rule
        summary = (lambda c: summarize(c, plan.settings.convention)) if scope == SAMPLE else case_summary
        items = [(k, found[report.row_key(k)], plan.store.run_of(k)["seconds"]) for k in keys]
        items += _worst_items(plan, items, conv) if plan.worst else []
        classes = _classes(plan, keys[0])
        for k, counts, seconds in items:
            s = summary(counts)
            rows += report.make_rows(k, s, classes, seconds)
            per_case += [{**k, "case": c, "dice3d": v} for c, v in s["dice3d_per_case"].items()]
    return rows, per_case


def _worst_items(plan: Plan, items: list, conv: str) -> list:
    """Per eps where every attack finished, the "worst" group of one scope's (key, counts, seconds) items
    (the clean run first)."""
    clean, out = items[0][1], []
    for e in plan.eps_list:
        group = [(k, c, t) for k, c, t in items if k["attack"] != CLEAN and k["eps"] == e]
        if len(group) < len(plan.attacks):
            continue
        counts, _ = worst_counts(clean, [c for _, c, _ in group], conv)
        key = {**group[0][0], "attack": WORST, "steps": 0, "iterate": "-",
               "worst_of": ",".join([CLEAN] + [k["attack"] for k, _, _ in group])}
        out.append((key, counts, sum(t for _, _, t in group)))
    return out


def publish(plan: Plan, results: dict) -> None:
    """Figures of the selection (plus rows of models not touched), checks, files, tables, plot."""
    store = plan.store
    idents = [identity(common_key(plan, tr)) for tr in results]
    rows, checks = [], []
    for tr, found in results.items():
        r, p = figures(plan, tr, found)
        store.replace_model(identity(common_key(plan, tr)), r, p)
        rows += r
        checks += model_checks(plan, tr, r)
    store.checks = [c for c in store.checks_on_disk if not any(same_model(c, i) for i in idents)] + checks
    store.save()  # names every model (the rows and checks printed below are these objects)
    print()
    for metric in ("adi", "tvdi", "dice3d"):
        print(report.table(rows, metric))
        print()
    if SAMPLE in plan.scopes:  # the case scope's rule is nnU-Net's, said by case_scope.describe below
        print(f"ADI convention: {plan.settings.convention} (the paper's tables used the authors' code: --adi paper)")
    if CASE in plan.scopes:
        print(case_scope.describe(plan.case))
    print("Sanity checks:")
    print(report.format_checks(checks))
    if plan.args.no_sanity and not any(c["check"].startswith("eps0") for c in checks):
        print("(the attack-strength checks were not run: --no-sanity; a run without it computes them once)")
    png = report.plot(rows, plan.out / "robustness.png")
    print(f"\nwrote {plan.out / 'results.csv'}, {store.json_path}, {png}")
