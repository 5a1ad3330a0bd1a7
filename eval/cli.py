"""``nnunet-ima-attack``: robustness of trained nnU-Net models under L2 PGD / IFGSM (ADI, TVDI, 3D Dice).

    nnunet-ima-attack -d 4 -c 2d -f 0 -tr nnUNetTrainer nnUNetTrainerIMA --eps 2 6 10 -o results/

prints the papers' table (rows = models; columns = clean, P. eps..., IF. eps...) and writes
results.csv, results.json, robustness.png (and examples/ with --save-examples N) to -o.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .errors import EvalError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="nnunet-ima-attack",
        description="Attack trained nnU-Net models with L2 (or Linf) PGD and IFGSM in the network's input space "
                    "and report ADI, TVDI and per-case 3D Dice per noise level (Ma & Liang, IMA).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("-d", dest="dataset", required=True, help="dataset name or id (as for nnUNetv2_predict)")
    p.add_argument("-c", dest="configuration", default="2d",
                   help="configuration: 2d (the papers') or 3d_fullres / 3d_lowres")
    p.add_argument("-f", dest="fold", default="0",
                   help="fold (an integer or 'all'); its validation cases are the test set")
    p.add_argument("-tr", dest="trainers", nargs="+", default=["nnUNetTrainer"],
                   help="one or more trainers to compare (rows of the table)")
    p.add_argument("-p", dest="plans", default="nnUNetPlans", help="plans identifier")
    p.add_argument("-chk", dest="checkpoint", default="checkpoint_final.pth", help="checkpoint file name")
    p.add_argument("--eps", type=float, nargs="+", required=True,
                   help="noise levels (norm of the perturbation of one sample in the network's z-scored input space)")
    p.add_argument("--attacks", nargs="+", choices=["pgd", "ifgsm"], default=["pgd", "ifgsm"])
    p.add_argument("--norm", choices=["l2", "linf"], default="l2")
    p.add_argument("--loss", choices=["dicece", "ce"], default="dicece",
                   help="attack loss: the model's own Dice+CE (per sample) or cross-entropy")
    p.add_argument("--steps-pgd", type=int, default=100, help="PGD iterations (random start)")
    p.add_argument("--steps-ifgsm", type=int, default=10, help="IFGSM iterations (no random start)")
    p.add_argument("-i", dest="images", default=None,
                   help="raw test images (CASE_0000.nii.gz...) instead of the fold's validation cases; needs -l")
    p.add_argument("-l", dest="labels", default=None, help="raw test labels (CASE.nii.gz) matching -i")
    p.add_argument("-o", dest="output", required=True, help="output folder")
    p.add_argument("--batch-size", type=int, default=16, help="samples (slices / patches) per attack batch")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if available")
    p.add_argument("--overwrite", action="store_true", help="recompute rows already in -o/results.json")
    p.add_argument("--save-examples", type=int, default=0, metavar="N",
                   help="save N samples per model/attack/eps as NIfTI (+ PNG overlay)")
    p.add_argument("--max-samples", type=int, default=None, help="attack only the first N samples (quick runs)")
    p.add_argument("--seed", type=int, default=0, help="seed of PGD's random start")
    p.add_argument("--no-sanity", action="store_true", help="skip the extra sanity-check attacks")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def validate(args) -> None:
    """Every argument problem, before anything is loaded."""
    bad = [e for e in args.eps if not e >= 0 or e != e or e == float("inf")]
    if bad:
        raise EvalError(f"--eps must be finite and >= 0, got {', '.join(f'{e:g}' for e in bad)}")
    for name in ("steps_pgd", "steps_ifgsm"):
        if getattr(args, name) < 1:
            raise EvalError(f"--{name.replace('_', '-')} must be >= 1")
    if args.batch_size < 1:
        raise EvalError("--batch-size must be >= 1")
    if args.max_samples is not None and args.max_samples < 1:
        raise EvalError("--max-samples must be >= 1")
    if args.save_examples < 0:
        raise EvalError("--save-examples must be >= 0")
    if (args.images is None) != (args.labels is None):
        raise EvalError("-i and -l go together: raw test images and their labels")
    if args.fold != "all":
        try:
            int(args.fold)
        except ValueError:
            raise EvalError(f"unknown fold {args.fold!r}: use an integer or 'all'") from None
    if len(set(args.trainers)) != len(args.trainers):
        raise EvalError("-tr: each trainer once")
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


def _choose_examples(ev, n: int) -> set:
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
    idx = sorted({int(round(i)) for i in __import__("numpy").linspace(0, len(pool) - 1, min(n, len(pool)))})
    return {pool[i] for i in idx}


def run(args) -> int:
    from . import report
    from .data import load_fold_cases, load_raw_cases
    from .metrics import MEAN
    from .model import dataset_name, load_model, locate
    from .runner import ATTACKS, CLEAN, AttackSettings, Evaluator, check, monotonicity_checks

    name = dataset_name(args.dataset)
    for tr in args.trainers:  # fail early, before any attack, on an unknown trainer/fold/checkpoint
        locate(name, args.configuration, args.fold, tr, args.plans, args.checkpoint)
    for what, folder in (("images folder (-i)", args.images), ("labels folder (-l)", args.labels)):
        if folder is not None and not Path(folder).is_dir():
            raise EvalError(f"{what} {folder} does not exist")
    settings = AttackSettings(norm=args.norm, loss=args.loss, steps_pgd=args.steps_pgd, steps_ifgsm=args.steps_ifgsm,
                              batch_size=args.batch_size, seed=args.seed)
    out = Path(args.output)
    store = report.ResultStore(out, overwrite=args.overwrite)
    old_checks = store.checks_on_disk
    source = "fold" if not args.images else f"raw:{os.path.abspath(args.images)}"
    eps_list = sorted(set(args.eps))
    attacks = [a for a in ATTACKS if a in args.attacks]
    checks = []
    for tr in args.trainers:
        common = {"model": tr, "dataset": name, "configuration": args.configuration, "plans": args.plans,
                  "fold": args.fold, "checkpoint": args.checkpoint, "source": source, "max_samples": args.max_samples}
        bases = [{**common, "attack": CLEAN, "eps": 0.0, "norm": "-", "loss": "-", "steps": 0}]
        bases += [{**common, "attack": a, "eps": e, "norm": args.norm, "loss": args.loss, "steps": settings.steps(a)}
                  for a in attacks for e in eps_list]
        todo = [b for b in bases if not store.finished(b)]
        if not todo:
            print(f"{tr}: all {len(bases)} results already in {store.json_path} (use --overwrite to recompute)")
            checks += [c for c in old_checks if c["model"] == tr]
            continue
        model = load_model(name, args.configuration, args.fold, tr, args.plans, args.checkpoint, args.device)
        cases = load_raw_cases(model, args.images, args.labels) if args.images else load_fold_cases(model, args.fold)
        ev = Evaluator(model, cases, settings, max_samples=args.max_samples, progress=not args.quiet)
        keep = _choose_examples(ev, args.save_examples)
        print(f"{tr}: {len(cases)} cases, {len(ev.refs)} {'slices' if ev.dim == 2 else 'patches'} "
              f"in {len(ev.batches)} batches; {len(todo)} of {len(bases)} results to compute")

        clean = ev.run(CLEAN, 0.0, keep=keep)
        clean_pred = {ex.ref: ex.pred for ex in clean.examples}
        spacing = model.configuration_manager.spacing

        def record(base, evaluation):
            rows = report.make_rows(base, evaluation.summary, model.class_names, evaluation.seconds)
            per_case = [{**base, "case": c, "dice3d": v} for c, v in evaluation.summary["dice3d_per_case"].items()]
            store.add(rows, per_case)
            if evaluation.examples and evaluation.attack != CLEAN:
                for ex in evaluation.examples:
                    ex.pred_clean = clean_pred.get(ex.ref)
                sub = out / "examples" / tr / f"{evaluation.attack}_eps{evaluation.eps:g}"
                report.save_examples(sub, evaluation.examples, spacing)

        if not store.finished(bases[0]) or args.overwrite:
            record(bases[0], clean)
        clean_adi = clean.summary["adi"][MEAN]
        for base in bases[1:]:
            if store.finished(base) and not args.overwrite:
                continue
            evaluation = ev.run(base["attack"], base["eps"], keep=keep)
            record(base, evaluation)
            s = evaluation.summary
            print(f"  {tr} {base['attack']:5} eps={base['eps']:<8g} ADI {100 * s['adi'][MEAN]:6.2f}  "
                  f"TVDI {100 * s['tvdi'][MEAN]:6.2f}  3D Dice {100 * s['dice3d'][MEAN]:6.2f}  "
                  f"({evaluation.seconds:.1f} s)")
            if base["eps"] == 0:
                diff = abs(s["adi"][MEAN] - clean_adi)
                checks.append(check(tr, f"eps0_equals_clean[{base['attack']}]", diff <= 1e-9,
                                    f"{base['attack']} at eps=0 on all {evaluation.counts.n} samples: ADI "
                                    f"{s['adi'][MEAN]:.6f} vs clean {clean_adi:.6f}"))
        if not args.no_sanity:
            for a in attacks:
                if 0.0 not in eps_list:
                    checks.append(ev.check_eps0(a, clean))
            checks.append(ev.check_large_eps(clean))
        model_rows = [r for r in store.rows if all(r.get(k) == v for k, v in common.items())]
        checks += monotonicity_checks(model_rows)
        store.checks = [c for c in old_checks if c["model"] not in args.trainers] + checks
        store.save()
        del ev, model, cases

    rows = [r for r in store.rows if r["dataset"] == name and r["source"] == source
            and r["configuration"] == args.configuration and r["model"] in args.trainers
            and r["plans"] == args.plans and str(r["fold"]) == args.fold and r["checkpoint"] == args.checkpoint
            and r["max_samples"] == args.max_samples
            and (r["attack"] == CLEAN or (r["norm"] == args.norm and r["loss"] == args.loss
                                          and r["steps"] == settings.steps(r["attack"]) and r["eps"] in eps_list))]
    store.checks = [c for c in old_checks if c["model"] not in args.trainers] + checks
    store.save()
    print()
    for metric in ("adi", "tvdi", "dice3d"):
        print(report.table(rows, metric))
        print()
    if checks:
        print("Sanity checks:")
        print(report.format_checks(checks))
    png = report.plot(rows, out / "robustness.png")
    print(f"\nwrote {out / 'results.csv'}, {store.json_path}, {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
