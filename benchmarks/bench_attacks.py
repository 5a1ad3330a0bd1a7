"""Attack strength per cost: ADI after 10, 20, 50 and 100 steps of PGD, SegPGD, CosPGD, APGD (Dice+CE)
and SEA's three APGD attacks at one noise level, plus ``worst`` (per sample the lowest Dice over clean and
those attacks at the same step count), and seconds per attack (issues 14 and 19; not a test). With
``--iterate best`` (the default, as ``--suite strong``) the PGD-type attacks keep each sample's
lowest-Dice iterate; ``pgd-final`` is the papers' PGD (final point) beside them.

Models: by default two small 2d PlainConvUNets it trains itself in a few minutes on synthetic
shapes (tests/data_gen.py): ``STD`` (Dice+CE) and ``PGD-AT`` (half of every batch replaced by PGD-5
adversarial slices at ``--eps-train``; a robust stand-in, not IMA). With ``--dataset`` it attacks
trained nnU-Net models instead (e.g. the demo's STD and IMA: set the nnU-Net path variables as the
demo prints them, then ``--dataset 990 --trainers nnUNetTrainer nnUNetTrainerIMA``), on the fold's
validation slices.

    .venv/bin/python benchmarks/bench_attacks.py                          # own models, eps 4, ~10-20 min CPU
    .venv/bin/python benchmarks/bench_attacks.py --quick                  # steps 2 4, smoke run
    .venv/bin/python benchmarks/bench_attacks.py --dataset 990 --plans nnUNetPlansDemo --trainers nnUNetTrainerSTD nnUNetTrainerIMA --eps 5

Targets (issue 14): some 20-step attack reaches an ADI at or below PGD-100's on both models, and
``worst`` is at or below every single attack and clean. Issue 19: SEA's APGD attacks at or below PGD.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from nnunet_ima_eval.data import Case  # noqa: E402
from nnunet_ima_eval.metrics import adi, worst_counts  # noqa: E402
from nnunet_ima_eval.model import PerSampleLoss  # noqa: E402
from nnunet_ima_eval.runner import AttackSettings, Evaluator  # noqa: E402

ATTACKS = ("pgd", "segpgd", "cospgd", "apgd", "apgd-mce", "apgd-bmce", "apgd-js")
ARCH = {
    "n_stages": 3, "features_per_stage": [8, 16, 32], "conv_op": "torch.nn.modules.conv.Conv2d",
    "kernel_sizes": [[3, 3]] * 3, "strides": [[1, 1], [2, 2], [2, 2]], "n_conv_per_stage": [2, 2, 2],
    "n_conv_per_stage_decoder": [2, 2], "conv_bias": True,
    "norm_op": "torch.nn.modules.instancenorm.InstanceNorm2d", "norm_op_kwargs": {"eps": 1e-5, "affine": True},
    "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True},
}


def network() -> torch.nn.Module:
    """nnU-Net's own 2d PlainConvUNet, small (3 stages, 8..32 features), 3 classes."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    torch.manual_seed(0)
    return get_network_from_plans("dynamic_network_architectures.architectures.unet.PlainConvUNet", ARCH,
                                  ["conv_op", "norm_op", "dropout_op", "nonlin"], 1, 3, allow_init=True,
                                  deep_supervision=False)


def model_like(net, label: str):
    """What Evaluator reads from a LoadedModel."""
    return SimpleNamespace(label=label, network=net.eval(), patch_size=(32, 32), pool_factor=(4, 4), num_classes=3,
                           device=torch.device("cpu"), label_manager=SimpleNamespace(ignore_label=None),
                           configuration_manager=SimpleNamespace(batch_dice=True))


def synthetic(n_cases: int, seed: int) -> list[Case]:
    from data_gen import synthetic_shapes

    out = []
    for name, (img, lab) in synthetic_shapes(n_cases, seed=seed).items():
        img = (img - img.mean()) / (img.std() + 1e-8)  # z-scored, as nnU-Net's preprocessing
        out.append(Case(name, img[None].astype(np.float32), lab.astype(np.int16)))
    return out


def train(cases: list[Case], iters: int, eps_train: float | None, seed: int = 0) -> torch.nn.Module:
    """Adam on Dice+CE over random batches of 16 slices; with ``eps_train`` half of each batch is
    replaced by PGD-5 adversarial slices (plain PGD adversarial training)."""
    from nnunet_ima.attacks import pgd

    net = network()
    x = torch.from_numpy(np.concatenate([c.image.transpose(1, 0, 2, 3) for c in cases]))
    y = torch.from_numpy(np.concatenate([c.label[:, None] for c in cases]).astype(np.int64))
    loss = PerSampleLoss("dicece", batch_dice=True, ignore_label=None)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(iters):
        idx = torch.randint(0, x.shape[0], (16,), generator=g)
        xb, yb = x[idx], y[idx]
        if eps_train:
            net.eval()
            xb = torch.cat([xb[:8], pgd(net, xb[8:], yb[8:], eps_train, steps=5, loss=loss, generator=g)])
        net.train()
        opt.zero_grad()
        loss(net(xb), yb).mean().backward()
        opt.step()
    return net.eval()


def own_models(iters: int, eps_train: float) -> tuple[list, list[Case]]:
    train_cases, test_cases = synthetic(12, seed=0), synthetic(4, seed=1)
    models = []
    for label, e in (("STD", None), ("PGD-AT", eps_train)):
        t = time.perf_counter()
        models.append(model_like(train(train_cases, iters, e), label))
        print(f"trained {label} in {time.perf_counter() - t:.0f} s")
    return models, test_cases


def nnunet_models(args) -> list[tuple]:
    """(LoadedModel, its fold's validation cases) for each trainer (nnU-Net path variables must be set)."""
    from nnunet_ima_eval.data import load_fold_cases
    from nnunet_ima_eval.model import load_model

    out = []
    for tr in args.trainers:
        m = load_model(args.dataset, args.configuration, args.fold, tr, plans=args.plans, device=args.device)
        out.append((m, load_fold_cases(m, args.fold)))
    return out


def measure(model, cases, eps: float, steps_list, batch_size: int, max_samples: int | None, iterate: str) -> dict:
    """{(attack, steps): (ADI, seconds)} for every attack and step count, plus ("worst", steps) and, with
    ``iterate`` "best", ("pgd-final", steps): the papers' PGD."""
    clean = Evaluator(model, cases, AttackSettings(batch_size=batch_size), max_samples=max_samples,
                      progress=False).run("clean", 0.0)
    res = {("clean", 0): (adi(clean.counts)["mean"], clean.seconds)}
    for steps in steps_list:
        settings = dict(pgd_steps=steps, segpgd_steps=steps, cospgd_steps=steps, apgd_steps=steps, batch_size=batch_size)
        ev = Evaluator(model, cases, AttackSettings(iterate=iterate, **settings), max_samples=max_samples,
                       progress=False)
        counts = []
        for attack in ATTACKS:
            r = ev.run(attack, eps)
            counts.append(r.counts)
            res[(attack, steps)] = (adi(r.counts)["mean"], r.seconds)
        w, _ = worst_counts(clean.counts, counts)
        res[("worst", steps)] = (adi(w)["mean"], sum(res[(a, steps)][1] for a in ATTACKS))
        if iterate == "best":
            r = Evaluator(model, cases, AttackSettings(**settings), max_samples=max_samples, progress=False).run("pgd", eps)
            res[("pgd-final", steps)] = (adi(r.counts)["mean"], r.seconds)
        print(f"  {model.label}: {steps} steps done", flush=True)
    return res


def print_table(label: str, res: dict, steps_list, eps: float) -> None:
    print(f"\n{label}: ADI (%) at eps {eps:g} [seconds]; clean ADI {100 * res[('clean', 0)][0]:.2f}")
    print("attack     " + "".join(f"{f'{s} steps':>18}" for s in steps_list))
    rows = [a for a in ("pgd-final", *ATTACKS, "worst") if (a, steps_list[0]) in res]
    for attack in rows:
        cells = "".join(f"{f'{100 * res[(attack, s)][0]:.2f} [{res[(attack, s)][1]:.1f}]':>18}" for s in steps_list)
        print(f"{attack:11}{cells}")
    top = max(steps_list)
    cheap = [s for s in steps_list if s <= top // 5] or [min(steps_list)]
    ref = "pgd-final" if ("pgd-final", top) in res else "pgd"
    pgd_top = res[(ref, top)][0]
    hits = [f"{a}-{s}" for a in ATTACKS for s in cheap if res[(a, s)][0] <= pgd_top]
    print(f"target: an attack at <= {top // 5 or min(steps_list)} steps at or below {ref}-{top} ({100 * pgd_top:.2f}): "
          f"{', '.join(hits) or 'none'}")
    sea = [a for a in ATTACKS if a.startswith("apgd-")]
    below = {s: [a for a in sea if res[(a, s)][0] <= res[(ref, s)][0]] for s in steps_list}
    print("target: SEA's APGD at or below " + ref + " at the same steps: "
          + "; ".join(f"{s}: {', '.join(v) or 'none'}" for s, v in below.items()))
    ok = all(res[("worst", s)][0] <= min(res[(a, s)][0] for a in ATTACKS) + 1e-12 and
             res[("worst", s)][0] <= res[("clean", 0)][0] + 1e-12 for s in steps_list)
    print(f"target: worst at or below every single attack and clean: {'yes' if ok else 'NO'}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--eps", type=float, default=4.0, help="the (middle) noise level, L2 in z-score units")
    p.add_argument("--steps", type=int, nargs="+", default=[10, 20, 50, 100])
    p.add_argument("--train-iters", type=int, default=300, help="training iterations of the own models")
    p.add_argument("--eps-train", type=float, default=4.0, help="PGD-AT's training eps")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-samples", type=int, default=None, help="attack only the first N slices")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="steps 2 4, 60 training iterations, 16 slices")
    p.add_argument("--iterate", choices=["final", "best"], default="best",
                   help="the point of the PGD-type attacks: best (as --suite strong) or final (the papers')")
    p.add_argument("--dataset", default=None, help="attack trained nnU-Net models of this dataset instead")
    p.add_argument("--trainers", nargs="+", default=["nnUNetTrainer", "nnUNetTrainerIMA"])
    p.add_argument("--configuration", default="2d")
    p.add_argument("--plans", default="nnUNetPlans", help="plans identifier of --dataset's models")
    p.add_argument("--fold", default="0")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.steps, args.train_iters, args.max_samples = [2, 4], 60, args.max_samples or 16
    if args.dataset:
        pairs = nnunet_models(args)
    else:
        models, cases = own_models(args.train_iters, args.eps_train)
        pairs = [(m, cases) for m in models]
    for model, cases in pairs:
        res = measure(model, cases, args.eps, args.steps, args.batch_size, args.max_samples, args.iterate)
        print_table(model.label, res, args.steps, args.eps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
