"""``nnunet-ima-attack``: robustness of trained nnU-Net models under attack (ADI, TVDI, 3D Dice).

    nnunet-ima-attack -d 4 -c 2d -f 0 -tr nnUNetTrainer nnUNetTrainerIMA --eps 2 6 10 -o results/
    nnunet-ima-attack ... --suite strong        # SegPGD, CosPGD, APGD (SEA's losses) and the per-sample worst
    nnunet-ima-attack ... --scope sample case   # also whole cases through nnU-Net's predictor, scored as deployed

prints the papers' table (rows = models; columns = clean, P. eps..., IF. eps..., W. eps...) and writes
results.csv, results.json, samples/, robustness.png (and examples/ with --save-examples N) to -o.
This module holds the options and their checks; :mod:`.pipeline` the steps of a run.

Several processes (:mod:`.distributed`): ``nnunet-ima-attack ... --num-gpus 4`` on one machine, or
``torchrun [--nnodes ...] --nproc_per_node 4 -m nnunet_ima_eval ...`` with the same arguments.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nnunet_ima.ui import DEVICES, OneLineParser, UsageError, add_option, check_writable, report_error, resolve_device, \
    spelling

from . import distributed
from .attacks import ATTACKS, step_settings
from .case_scope import BUDGETS, SCOPES
from .errors import EvalError
from .metrics import ADI_CONVENTIONS, DEFAULT_ADI
from .runner import ITERATES, STRONG_APGD_STEPS, SUITES, WORST, AttackSettings


PROG = "nnunet-ima-attack"
COMMAND = "attack"  # its key in the old spellings of nnunet_ima.ui.VOCABULARY


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog=PROG,
        description="Attack trained nnU-Net models in the network's input space (L2 or Linf; PGD and IFGSM as in "
                    "the IMA papers, or SegPGD, CosPGD, APGD and the per-sample worst case) and report ADI, TVDI and "
                    "per-case 3D Dice per noise level (Ma & Liang, IMA).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("-d", dest="dataset", required=True, help="dataset name or id (as for nnUNetv2_predict)")
    p.add_argument("-c", dest="configuration", default="2d",
                   help="configuration: 2d (the papers') or 3d_fullres / 3d_lowres")
    p.add_argument("-f", dest="fold", default="0",
                   help="fold (an integer or 'all'); its validation cases are the test set")
    p.add_argument("-tr", dest="trainers", nargs="+", default=["nnUNetTrainer"],
                   help="one or more trainers to compare (rows of the table); any trainer nnU-Net finds")
    p.add_argument("-p", dest="plans", default="nnUNetPlans", help="plans identifier")
    p.add_argument("-chk", dest="checkpoint", default="checkpoint_final.pth", help="checkpoint file name")
    add_option(p, COMMAND, "eps", required=True,
               help="noise levels (norm of the perturbation of one sample in the network's z-scored input space)")
    add_option(p, COMMAND, "attacks", default=None,
               help=f"attacks to run: {', '.join(ATTACKS)} (nnunet_ima_eval.attacks.ATTACKS), and worst = per "
                    "sample the lowest Dice over clean and the other attacks at that eps (AutoAttack's reporting); "
                    "None = pgd ifgsm")
    p.add_argument("--suite", choices=sorted(SUITES), default=None,
                   help="a preset instead of --attacks: paper = pgd ifgsm; strong = pgd segpgd cospgd apgd-mce "
                        "apgd-bmce apgd-js worst (a Croce-style ensemble)")
    p.add_argument("--iterate", choices=list(ITERATES), default=None,
                   help="the point of pgd, ifgsm, segpgd, cospgd a sample is counted at: final (the papers' protocol) or "
                        "best (per sample the iterate with the lowest Dice, at no extra attack cost); None = final, "
                        "best with --suite strong. The apgd attacks always return their lowest-Dice iterate (SEA)")
    add_option(p, COMMAND, "norm", default="l2", help="norm of the perturbation budget eps: l2 (the papers') or linf")
    p.add_argument("--loss", choices=["dicece", "ce"], default="dicece",
                   help="loss of pgd/ifgsm/apgd: the model's own Dice+CE (per sample) or cross-entropy")
    p.add_argument("--adi", dest="adi_convention", choices=list(ADI_CONVENTIONS), default=DEFAULT_ADI,
                   help="ADI convention: project = a class absent from truth and prediction is left out (a blank "
                        "slice predicted blank scores 1); paper = the authors' code (absent class scores 0, slices "
                        "without foreground skipped), which the paper's tables used")
    _add_step_options(p)
    p.add_argument("-i", dest="images", default=None,
                   help="raw test images (CASE_0000.nii.gz...) instead of the fold's validation cases; needs -l")
    p.add_argument("-l", dest="labels", default=None, help="raw test labels (CASE.nii.gz) matching -i")
    add_option(p, COMMAND, "output", required=True, help="output folder (created; may hold an earlier run)")
    add_option(p, COMMAND, "batch_size", default=16, help="samples (slices / patches) per attack batch")
    add_option(p, COMMAND, "device", default=None, help=f"{DEVICES} (default: cuda if available, else cpu)")
    add_option(p, COMMAND, "num_gpus", default=1,
               help="GPUs to evaluate on, one process each, started here (as nnUNetv2_train -num_gpus); for CPU "
                    "processes or several nodes: torchrun --nproc_per_node N -m nnunet_ima_eval <these arguments>")
    add_option(p, COMMAND, "overwrite", help="recompute every result, even with unchanged inputs")
    p.add_argument("--save-examples", type=int, default=0, metavar="N",
                   help="save N samples per model/attack/eps as NIfTI (+ PNG overlay)")
    p.add_argument("--max-samples", type=int, default=None, help="attack only the first N samples (quick runs)")
    add_option(p, COMMAND, "seed", default=0, help="seed of the attacks' random starts")
    p.add_argument("--no-sanity", action="store_true", help="skip the extra sanity-check attacks")
    add_option(p, COMMAND, "quiet", help="no progress bars")
    _case_options(p)
    return p


def _add_step_options(p) -> None:
    """One ``--<setting>`` per iteration setting of the registry (:func:`.attacks.step_settings`),
    defaulting to :class:`.runner.AttackSettings`'s; APGD's default follows ``--suite``."""
    defaults = AttackSettings()
    for setting, names in step_settings().items():
        if setting == "apgd_steps":
            add_option(p, COMMAND, setting, default=None,
                       help=f"iterations of {', '.join(names)} (None = {defaults.apgd_steps}; {STRONG_APGD_STEPS} "
                            f"with --suite strong: the masked losses are weak with few iterations)")
        else:
            add_option(p, COMMAND, setting, default=getattr(defaults, setting), help=f"iterations of {', '.join(names)}")


def _case_options(p) -> None:
    """The case scope's options (README, "The case scope")."""
    add_option(p, COMMAND, "scope", default=["sample"],
               help="sample = each 2d slice / 3d patch tile attacked and scored on its own (the papers'); case = "
                    "whole preprocessed cases attacked through nnU-Net's sliding-window predictor and scored as "
                    "nnUNetv2_predict would predict them, in the original geometry; both: --scope sample case")
    p.add_argument("--tile-step", type=float, default=0.5,
                   help="case scope: nnU-Net's tile step of the sliding window (nnUNetv2_predict -step_size)")
    p.add_argument("--no-mirroring", action="store_true",
                   help="case scope: no test-time mirroring (nnUNetv2_predict --disable_tta); default: the "
                        "checkpoint's mirroring axes, as nnUNetv2_predict")
    p.add_argument("--case-budget", choices=list(BUDGETS), default="blocks",
                   help="case scope: blocks = each slice (2d model) / patch-grid tile (3d model) of a case in its own "
                        "eps-ball, as in the sample scope; whole = one ball over the whole case (L2: radius eps x "
                        "sqrt(number of blocks); Linf: the same set as blocks)")


def _check_numbers(args) -> None:
    counts = [(spelling(s), getattr(args, s)) for s in step_settings()] + [("--batch-size", args.batch_size)]
    for flag, value in counts:
        if value is not None and value < 1:
            raise EvalError(f"{flag} must be >= 1, got {value}")
    if args.max_samples is not None and args.max_samples < 1:
        raise EvalError(f"--max-samples must be >= 1, got {args.max_samples}")
    if args.save_examples < 0:
        raise EvalError(f"--save-examples must be >= 0, got {args.save_examples}")
    if not 0 < args.tile_step <= 1:
        raise EvalError(f"--tile-step must be in (0, 1], got {args.tile_step:g}")
    unknown = [sc for sc in args.scope if sc not in SCOPES]
    if unknown:
        raise EvalError(f"--scope: unknown {', '.join(unknown)}; use {' and/or '.join(SCOPES)}")


def _check_attacks(args) -> None:
    """Resolve --suite / --attacks into ``args.attacks`` (names in order, "worst" last if asked)."""
    if args.suite and args.attacks:
        raise EvalError("--suite and --attacks: give one of them")
    names = SUITES[args.suite] if args.suite else (args.attacks or SUITES["paper"])
    known = ATTACKS
    unknown = [a for a in names if a not in known and a != WORST]
    if unknown:
        raise EvalError(f"--attacks: unknown {', '.join(unknown)}; available: {', '.join([*known, WORST])}")
    attacks = [a for a in dict.fromkeys(names) if a != WORST]
    if not attacks:
        raise EvalError("--attacks: worst needs at least one attack to take the minimum over")
    args.attacks = attacks + ([WORST] if WORST in names else [])
    if args.apgd_steps is None:
        args.apgd_steps = STRONG_APGD_STEPS if args.suite == "strong" else AttackSettings().apgd_steps
    if args.iterate is None:
        args.iterate = "best" if args.suite == "strong" else "final"


def validate(args) -> None:
    """Every argument problem, before anything is loaded or written."""
    _check_numbers(args)
    _check_attacks(args)
    if (args.images is None) != (args.labels is None):
        raise EvalError("-i and -l go together: raw test images and their labels")
    if args.fold != "all":
        try:
            int(args.fold)
        except ValueError:
            raise EvalError(f"unknown fold {args.fold!r}: use an integer or 'all'") from None
    if len(set(args.trainers)) != len(args.trainers):
        raise EvalError("-tr: each trainer once")
    check_writable(args.output, "-o")  # a probe file, before anything is loaded or computed
    distributed.check_num_gpus(args.num_gpus, args.device)
    args.device = resolve_device(args.device)


def main(argv: list[str] | None = None) -> int:
    """The command: one process, one rank of a torchrun job (``python -m nnunet_ima_eval``), or, with
    ``--num-gpus N``, the launcher of N processes. Every rank parses the same arguments (rank 0 alone
    prints a parse error) and checks them after joining the job (the first rank to fail prints the one
    line)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    rank = distributed.launched_rank()
    with distributed.only_rank0_speaks():
        args = build_parser().parse_args(argv)
    try:
        if not distributed.in_job():
            validate(args)
            if args.num_gpus > 1:
                return distributed.launch(PROG, [*argv, "--num-gpus", "1"], args.num_gpus)
        return distributed.run_as_rank(PROG, args.output, lambda world: run(args, world))
    except (EvalError, UsageError) as e:
        return report_error(PROG, e)
    except KeyboardInterrupt:  # before the store was opened: nothing of this run was written
        if rank == 0:
            print(f"{PROG}: interrupted before any result was computed; nothing written to {args.output}",
                  file=sys.stderr)
        return 130


def run(args, world: distributed.World | None = None) -> int:
    """The command after validation: prepare (every check, nothing written), evaluate each model
    (reusing results whose inputs are unchanged; ``world``: this process's rank in the job, its share
    of the work), publish (figures, tables, checks, plot: rank 0)."""
    from .pipeline import evaluate_model, prepare, publish

    world = world or distributed.World()
    if world.size > 1:  # one process checked them before anything started
        validate(args)
    args.device = distributed.rank_device(world, args.device)
    distributed.rank_threads(world)
    plan = prepare(args, world)
    try:
        results = {tr: evaluate_model(plan, tr) for tr in args.trainers}
        if world.is_main:
            publish(plan, results)
            distributed.clear_errors(args.output)
    except KeyboardInterrupt:
        if world.is_main:
            print(f"{PROG}: interrupted; {interrupted(plan)}", file=sys.stderr)
        return 130
    return 0


def interrupted(plan) -> str:
    """What an interrupted run left in the output folder, in words (every finished result is saved with its
    rows at once: results.csv, results.json and read_table hold them)."""
    n, out = plan.store.finished, plan.out
    units = (f"; the finished test cases of unfinished runs are kept in {out / 'shards'}, and a rerun (with any "
             f"number of processes) computes only the rest") if plan.shards and plan.shards.root.is_dir() else ""
    if n:
        return (f"the {n} finished results of this run are saved in {out} (results.csv, results.json: rows for "
                f"every finished result){units or '; rerun the same command to compute the rest'}")
    held = " holds only earlier results" if plan.store.rows else ": nothing was written there"
    return f"no result of this run had finished; {out}{held}{units}"


if __name__ == "__main__":
    sys.exit(main())
