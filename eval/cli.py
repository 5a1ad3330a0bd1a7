"""``nnunet-ima-attack``: robustness of trained nnU-Net models under attack (ADI, TVDI, 3D Dice).

    nnunet-ima-attack -d 4 -c 2d -f 0 -tr nnUNetTrainer nnUNetTrainerIMA --eps 2 6 10 -o results/
    nnunet-ima-attack ... --suite strong        # SegPGD, CosPGD, APGD (SEA's losses) and the per-sample worst
    nnunet-ima-attack ... --scope sample case   # also whole cases through nnU-Net's predictor, scored as deployed

prints the papers' table (rows = models; columns = clean, P. eps..., IF. eps..., W. eps...) and writes
results.csv, results.json, samples/, robustness.png (and examples/ with --save-examples N) to -o.
This module holds the options and their checks; :mod:`.pipeline` the steps of a run.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nnunet_ima import seg_attacks
from nnunet_ima.plumbing import OneLineParser
from nnunet_ima.ui import add_option

from .case_scope import BUDGETS, SCOPES
from .errors import EvalError
from .metrics import ADI_CONVENTIONS, DEFAULT_ADI
from .runner import ITERATES, STRONG_APGD_STEPS, SUITES, WORST


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="nnunet-ima-attack",
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
    p.add_argument("--eps", type=float, nargs="+", required=True,
                   help="noise levels (norm of the perturbation of one sample in the network's z-scored input space)")
    p.add_argument("--attacks", nargs="+", default=None, metavar="NAME",
                   help="attacks to run: pgd (random start), ifgsm (the papers'), segpgd, cospgd, apgd, apgd-mce, "
                        "apgd-bmce, apgd-js (those the installed kernel offers), and worst = per sample the lowest "
                        "Dice over clean and the other attacks at that eps (AutoAttack's reporting); None = pgd ifgsm")
    p.add_argument("--suite", choices=sorted(SUITES), default=None,
                   help="a preset instead of --attacks: paper = pgd ifgsm; strong = pgd segpgd cospgd apgd-mce "
                        "apgd-bmce apgd-js worst (a Croce-style ensemble)")
    p.add_argument("--iterate", choices=list(ITERATES), default=None,
                   help="the point of pgd, ifgsm, segpgd, cospgd a sample is counted at: final (the papers' protocol) or "
                        "best (per sample the iterate with the lowest Dice, at no extra attack cost); None = final, "
                        "best with --suite strong. The apgd attacks always return their lowest-Dice iterate (SEA)")
    p.add_argument("--norm", choices=["l2", "linf"], default="l2",
                   help="norm of the perturbation budget eps: l2 (the papers') or linf")
    p.add_argument("--loss", choices=["dicece", "ce"], default="dicece",
                   help="loss of pgd/ifgsm/apgd: the model's own Dice+CE (per sample) or cross-entropy")
    p.add_argument("--adi", dest="adi_convention", choices=list(ADI_CONVENTIONS), default=DEFAULT_ADI,
                   help="ADI convention: project = a class absent from truth and prediction is left out (a blank "
                        "slice predicted blank scores 1); paper = the authors' code (absent class scores 0, slices "
                        "without foreground skipped), which the paper's tables used")
    p.add_argument("--pgd-steps", dest="pgd_steps", type=int, default=100, help="PGD iterations (random start)")
    p.add_argument("--steps-pgd", dest="pgd_steps", type=int, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    p.add_argument("--ifgsm-steps", dest="ifgsm_steps", type=int, default=10, help="IFGSM iterations (no random start)")
    p.add_argument("--steps-ifgsm", dest="ifgsm_steps", type=int, default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    p.add_argument("--steps", dest="steps_other", type=int, default=100,
                   help="iterations of segpgd and cospgd")
    p.add_argument("--apgd-steps", type=int, default=None,
                   help=f"iterations of apgd, apgd-mce, apgd-bmce, apgd-js (None = 100; {STRONG_APGD_STEPS} with "
                        f"--suite strong: the masked losses are weak with few iterations)")
    p.add_argument("-i", dest="images", default=None,
                   help="raw test images (CASE_0000.nii.gz...) instead of the fold's validation cases; needs -l")
    p.add_argument("-l", dest="labels", default=None, help="raw test labels (CASE.nii.gz) matching -i")
    p.add_argument("-o", dest="output", required=True, help="output folder (created; may hold an earlier run)")
    p.add_argument("--batch-size", type=int, default=16, help="samples (slices / patches) per attack batch")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available")
    p.add_argument("--overwrite", action="store_true", help="recompute every result, even with unchanged inputs")
    p.add_argument("--save-examples", type=int, default=0, metavar="N",
                   help="save N samples per model/attack/eps as NIfTI (+ PNG overlay)")
    p.add_argument("--max-samples", type=int, default=None, help="attack only the first N samples (quick runs)")
    p.add_argument("--seed", type=int, default=0, help="seed of the attacks' random starts")
    p.add_argument("--no-sanity", action="store_true", help="skip the extra sanity-check attacks")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _case_options(p)
    return p


def _case_options(p) -> None:
    """The case scope's options (README, "The case scope")."""
    add_option(p, "attack", "scope", default=["sample"],
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
    bad = [e for e in args.eps if not e >= 0 or e != e or e == float("inf")]
    if bad:
        raise EvalError(f"--eps must be finite and >= 0, got {', '.join(f'{e:g}' for e in bad)}")
    for flag, value in (("--pgd-steps", args.pgd_steps), ("--ifgsm-steps", args.ifgsm_steps),
                        ("--steps", args.steps_other), ("--batch-size", args.batch_size),
                        ("--apgd-steps", 1 if args.apgd_steps is None else args.apgd_steps)):
        if value < 1:
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
    known = seg_attacks.SEG_ATTACKS
    unknown = [a for a in names if a not in known and a != WORST]
    if unknown:
        raise EvalError(f"--attacks: unknown {', '.join(unknown)}; available: {', '.join([*known, WORST])}")
    attacks = [a for a in dict.fromkeys(names) if a != WORST]
    if not attacks:
        raise EvalError("--attacks: worst needs at least one attack to take the minimum over")
    args.attacks = attacks + ([WORST] if WORST in names else [])
    if args.apgd_steps is None:
        args.apgd_steps = STRONG_APGD_STEPS if args.suite == "strong" else 100
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
    if Path(args.output).exists() and not Path(args.output).is_dir():
        raise EvalError(f"-o {args.output} is a file: give a folder (new or from an earlier run)")
    import torch

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise EvalError("--device cuda: no CUDA device available")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        validate(args)
        return run(args)
    except EvalError as e:
        print(f"nnunet-ima-attack: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"nnunet-ima-attack: interrupted; finished rows are in {args.output}", file=sys.stderr)
        return 130


def run(args) -> int:
    """The command after validation: prepare (every check, nothing written), evaluate each model
    (reusing results whose inputs are unchanged), publish (figures, tables, checks, plot)."""
    from .pipeline import evaluate_model, prepare, publish

    plan = prepare(args)
    results = {tr: evaluate_model(plan, tr) for tr in args.trainers}
    publish(plan, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
