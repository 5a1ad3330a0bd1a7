"""Kernel benchmark: our PGD and BPGD against their floors (bare code) and torchattacks, side by side.

Run:  .venv/bin/python benchmarks/bench_kernel.py            (about a minute on 2 CPU cores)
      .venv/bin/python benchmarks/bench_kernel.py --quick    (fewer rounds, a smoke run)

Every case is timed once per round, the rounds interleave all cases in a shuffled order (so that
load from other processes hits every case alike) and the table reports medians and the ratio to
the floor, of wall time and of this process's CPU time (with one intra-op thread the CPU time is
the work done, and does not count the time other processes on a shared machine take from us; its
minimum over the rounds is the least disturbed measurement, since load only ever adds time). Cases (small CNN, batch B of 1x28x28 images in [0, 1], K = 20, N = 10, L2):

PGD    ours         nnunet_ima.pgd(..., clip=(0, 1)), random start, alpha = 4 eps / K
       floor        the same K steps written inline: forward, autograd.grad to the input,
                    normalised step, projection, clamp
       torchattacks torchattacks.PGDL2(eps, alpha = 4 eps / K, steps = K, random_start=True)
BPGD   ours         nnunet_ima.bpgd, variant "boundary" and "augment", no random start
       floor        K x (forward + backward to the input) + N x forward, bare, on the full batch
       cases        "crossing": eps large enough that most samples cross, at different steps;
                    "no crossing": eps so small that no sample crosses (the boundary variant's
                    worst case for its active set: every sample runs all K steps)
"""
from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
import torch.nn.functional as F

from nnunet_ima import bpgd, pgd


class SmallCNN(torch.nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.c1 = torch.nn.Conv2d(1, 16, 3, padding=1)
        self.c2 = torch.nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.c3 = torch.nn.Conv2d(32, 32, 3, stride=2, padding=1)
        self.fc = torch.nn.Linear(32 * 7 * 7, classes)

    def forward(self, x):
        x = F.relu(self.c1(x))
        x = F.relu(self.c2(x))
        x = F.relu(self.c3(x))
        return self.fc(x.flatten(1))


def synthetic_data(n: int, classes: int = 10, seed: int = 0):
    """Ten random blob templates plus noise, in [0, 1]: learnable in a few dozen steps."""
    g = torch.Generator().manual_seed(seed)
    templates = F.avg_pool2d(torch.rand(classes, 1, 28, 28, generator=g), 5, 1, 2)
    templates = (templates - templates.mean()) * 6 + 0.5  # stretch the smoothed noise to a visible contrast
    y = torch.randint(0, classes, (n,), generator=g)
    x = (templates[y] + 0.25 * torch.randn(n, 1, 28, 28, generator=g)).clamp(0, 1)
    return x, y


def train(model, x, y, steps: int = 100):
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for i in range(steps):
        sel = torch.randint(0, x.shape[0], (128,), generator=torch.Generator().manual_seed(i))
        opt.zero_grad()
        F.cross_entropy(model(x[sel]), y[sel]).backward()
        opt.step()
    model.eval()
    for p in model.parameters():
        p.grad = None
    return model


# ---------------------------------------------------------------- the floors: bare code
def floor_pgd(model, x, y, eps, steps, generator):
    """K plain PGD-L2 steps with a random start, clamped to [0, 1]."""
    b = x.shape[0]
    alpha = 4 * eps / steps
    delta = torch.randn(x.shape, generator=generator)
    delta = delta / delta.flatten(1).norm(dim=1).view(b, 1, 1, 1)
    delta = delta * (eps * torch.rand(b, generator=generator) ** (1 / x[0].numel())).view(b, 1, 1, 1)
    x_adv = (x + delta).clamp(0, 1)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = F.cross_entropy(model(x_adv), y, reduction="sum")
        (g,) = torch.autograd.grad(loss, x_adv)
        g = g / (g.flatten(1).norm(dim=1).view(b, 1, 1, 1) + 1e-12)
        d = x_adv.detach() + alpha * g - x
        d = d * (eps / (d.flatten(1).norm(dim=1) + 1e-12)).clamp(max=1).view(b, 1, 1, 1)
        x_adv = (x + d).clamp(0, 1)
    return x_adv


def floor_bpgd(model, x, y, steps, search_steps):
    """K x (forward + backward to the input) + N x forward on the full batch, nothing else."""
    x_adv = x.clone()
    for _ in range(steps):
        x_adv.requires_grad_(True)
        (g,) = torch.autograd.grad(F.cross_entropy(model(x_adv), y, reduction="sum"), x_adv)
        x_adv = x_adv.detach() + 1e-3 * g
    with torch.no_grad():
        for _ in range(search_steps):
            model(x_adv)
    return x_adv


def first_wrong_step(model, x, y, eps, steps):
    """For the report: the PGD iterate (0..K) at which each sample is first wrong, -1 if never."""
    b = x.shape[0]
    alpha = 4 * eps / steps
    x_adv, when = x.clone(), torch.full((b,), -1)
    for k in range(steps + 1):
        x_adv.requires_grad_(True)
        out = model(x_adv)
        wrong = (out.argmax(1) != y) & (when < 0)
        when[wrong] = k
        (g,) = torch.autograd.grad(F.cross_entropy(out, y, reduction="sum"), x_adv)
        g = g / (g.flatten(1).norm(dim=1).view(b, 1, 1, 1) + 1e-12)
        d = x_adv.detach() + alpha.view(b, 1, 1, 1) * g - x
        d = d * (eps / (d.flatten(1).norm(dim=1) + 1e-12)).clamp(max=1).view(b, 1, 1, 1)
        x_adv = x + d
    return when


# ---------------------------------------------------------------- timing
def bench(cases: dict, rounds: int, warmup: int = 2) -> dict:
    """{case: (wall seconds per round, process CPU seconds per round)}, rounds interleaved."""
    names = list(cases)
    times = {n: ([], []) for n in names}
    for r in range(warmup + rounds):
        random.Random(r).shuffle(names)
        for n in names:
            w0, c0 = time.perf_counter(), time.process_time()
            cases[n]()
            w, c = time.perf_counter() - w0, time.process_time() - c0
            if r >= warmup:
                times[n][0].append(w)
                times[n][1].append(c)
    return times


def report(title, times, floor, others):
    """Print medians; returns {case: (wall ratio, cpu ratio)} to the floor."""
    print(f"\n{title}")
    print(f"  {'case':<30}{'wall ms':>9}{'q25-q75':>13}{'x floor':>8}{'cpu ms':>9}{'x floor':>8}"
          f"{'cpu min':>9}{'x floor':>8}")
    wall0, cpu0 = (statistics.median(t) for t in times[floor])
    min0 = min(times[floor][1])
    ratios = {}
    for n in [floor, *others]:
        wall, cpu = times[n]
        q = statistics.quantiles(wall, n=4) if len(wall) > 1 else [wall[0]] * 3
        w, c, m = statistics.median(wall), statistics.median(cpu), min(cpu)
        ratios[n] = (w / wall0, c / cpu0, m / min0)
        print(f"  {n:<30}{1e3 * w:>9.1f}{f'{1e3 * q[0]:.0f}-{1e3 * q[2]:.0f}':>13}{w / wall0:>8.3f}"
              f"{1e3 * c:>9.1f}{c / cpu0:>8.3f}{1e3 * m:>9.1f}{m / min0:>8.3f}")
    return ratios


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (default 1: on a shared 2-core box two threads spin against "
                         "other processes and time 10x slower, drowning the comparison in noise; 0 = torch's default)")
    ap.add_argument("--quick", action="store_true", help="5 rounds (smoke run)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rounds = 5 if args.quick else args.rounds
    torch.manual_seed(0)
    K, N, B = 20, 10, args.batch

    x_all, y_all = synthetic_data(2048)
    model = train(SmallCNN(), x_all, y_all)
    x, y = x_all[:B].contiguous(), y_all[:B].contiguous()
    with torch.no_grad():
        pred = model(x).argmax(1)
    clean_acc = float((pred == y).float().mean())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {B} x 1x28x28, "
          f"K={K}, N={N}, SmallCNN clean accuracy {clean_acc:.2f}")

    # ------------------------------------------------------------ PGD
    import torchattacks

    eps = 1.0
    ta = torchattacks.PGDL2(model, eps=eps, alpha=4 * eps / K, steps=K, random_start=True)
    frozen = [p for p in model.parameters()]
    pgd_cases = {
        "floor (bare loop)": lambda: floor_pgd(model, x, y, eps, K, torch.Generator().manual_seed(0)),
        "nnunet_ima.pgd": lambda: pgd(model, x, y, eps, steps=K, clip=(0, 1),
                                      generator=torch.Generator().manual_seed(0)),
        "torchattacks.PGDL2": lambda: ta(x, y),
    }
    for p in frozen:  # the floor runs on a frozen model, as ours does inside attack_mode
        p.requires_grad_(False)
    t_pgd = bench(pgd_cases, rounds)
    for p in frozen:
        p.requires_grad_(True)
    r = report(f"PGD-L2, eps={eps}, K={K}, random start, clip [0,1]", t_pgd, "floor (bare loop)",
               ["nnunet_ima.pgd", "torchattacks.PGDL2"])
    ours, theirs = r["nnunet_ima.pgd"], r["torchattacks.PGDL2"]
    for i, kind in enumerate(("wall median", "cpu median", "cpu min")):
        print(f"  {kind}: ours/floor {ours[i]:.3f} (target <= 1.1), ours/torchattacks {ours[i] / theirs[i]:.3f} "
              f"(target <= 1.0)")

    # ------------------------------------------------------------ BPGD
    # BPGD serves clean-correct samples (Algorithm 1, line 4): attack the model's own predictions so
    # that "no crossing" really means every sample runs all K steps
    y = pred
    big, small = 3.0, 1e-3
    when = first_wrong_step(model, x, y, torch.full((B,), big), K)
    crossed = when[when >= 0]
    print(f"\nBPGD crossing case, eps={big}: {len(crossed)}/{B} samples cross; first wrong iterate "
          f"min {int(crossed.min())}, median {int(crossed.median())}, max {int(crossed.max())}, "
          f"{crossed.unique().numel()} distinct steps")
    for p in frozen:
        p.requires_grad_(False)
    bpgd_cases = {"floor K(f+b)+N f": lambda: floor_bpgd(model, x, y, K, N)}
    for variant in ("boundary", "augment"):
        for label, e in (("crossing", big), ("no crossing", small)):
            bpgd_cases[f"bpgd {variant}, {label}"] = (
                lambda v=variant, e=e: bpgd(model, x, y, e, steps=K, search_steps=N, variant=v))
    t_bpgd = bench(bpgd_cases, rounds)
    for p in frozen:
        p.requires_grad_(True)
    for label, e in (("crossing", big), ("no crossing", small)):
        res = bpgd(model, x, y, e, steps=K, search_steps=N)
        print(f"  check {label}: crossed {int(res.crossed.sum())}/{B}")
    r = report(f"BPGD-L2, K={K}, N={N}, no random start", t_bpgd, "floor K(f+b)+N f",
               [n for n in bpgd_cases if n.startswith("bpgd")])
    for n, (w, c, m) in r.items():
        if n.startswith("bpgd"):
            print(f"  {n}/floor: wall median {w:.3f}, cpu median {c:.3f}, cpu min {m:.3f} (target <= 1.2)")


if __name__ == "__main__":
    main()
