"""Throughput of nnunet-ima-attack's evaluation loop: batched slices vs a one-slice-at-a-time loop.

Both are measured in the same run, on the same slices, with the same network and attack, through
the same code path (:class:`nnunet_ima_eval.runner.Evaluator`; only ``batch_size`` differs). The
network is nnU-Net's own 2d PlainConvUNet built from a plans-style configuration like the one nnU-Net
plans for Hippocampus (the later paper's Table 7: 56 x 40 slices, 4 stages, 32..256 features,
instance norm); weights are random because throughput does not depend on them.

    .venv/bin/python benchmarks/bench_eval.py                    # PGD-3, 32 slices, batch 32
    .venv/bin/python benchmarks/bench_eval.py --steps 10 --slices 128 --batch-size 64

``--world-sizes 1 2`` (issue 23) measures instead the sharded evaluation over several processes: the
same attack on the same slices with 1 process and with 2 (torch.distributed's rendezvous, CPU, one
thread each; started by :func:`nnunet_ima_eval.distributed.launch`, what ``--num-gpus`` uses), each
through the code of a real job (:mod:`nnunet_ima_eval.units`: rank 0 plans and publishes the work
order, every rank computes its share of test cases and writes each finished case to disk, rank 0
waits for all and merges). Timed from the moment every rank is ready (model built, data in memory,
one warm-up batch) to the merged result; process start-up is not counted. The world sizes alternate,
``--repeats`` times; the per-sample counts must be identical across world sizes.

    .venv/bin/python benchmarks/bench_eval.py --world-sizes 1 2  # PGD-10, 64 slices in 8 cases, 1 thread each
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from nnunet_ima_eval.data import Case
from nnunet_ima_eval.runner import AttackSettings, Evaluator

ARCH = {
    "n_stages": 4, "features_per_stage": [32, 64, 128, 256], "conv_op": "torch.nn.modules.conv.Conv2d",
    "kernel_sizes": [[3, 3]] * 4, "strides": [[1, 1], [2, 2], [2, 2], [2, 2]], "n_conv_per_stage": [2, 2, 2, 2],
    "n_conv_per_stage_decoder": [2, 2, 2], "conv_bias": True,
    "norm_op": "torch.nn.modules.instancenorm.InstanceNorm2d", "norm_op_kwargs": {"eps": 1e-5, "affine": True},
    "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU", "nonlin_kwargs": {"inplace": True},
}


def network(num_classes: int = 3) -> torch.nn.Module:
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    torch.manual_seed(0)
    return get_network_from_plans("dynamic_network_architectures.architectures.unet.PlainConvUNet", ARCH,
                                  ["conv_op", "norm_op", "dropout_op", "nonlin"], 1, num_classes,
                                  allow_init=True, deep_supervision=False)


def model_like(net, patch=(56, 40)):
    """What Evaluator reads from a LoadedModel (nnUNetPredictor is not needed for a throughput test)."""
    return SimpleNamespace(label="PlainConvUNet-2d", network=net.eval(), patch_size=patch, pool_factor=(8, 8),
                           num_classes=3, device=torch.device("cpu"), label_manager=SimpleNamespace(ignore_label=None),
                           configuration_manager=SimpleNamespace(batch_dice=True))


def cases(n_slices: int, shape=(56, 40), per_case: int = 32) -> list[Case]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(0, n_slices, per_case):
        z = min(per_case, n_slices - i)
        lab = np.zeros((z, *shape), np.int16)
        lab[:, 15:40, 10:30] = 1
        lab[:, 22:32, 15:25] = 2
        img = (lab + rng.normal(scale=0.5, size=lab.shape)).astype(np.float32)[None]
        out.append(Case(f"case_{i // per_case:03d}", img, lab))
    return out


def measure(model, data, attack: str, steps: int, batch_size: int, eps: float, repeats: int) -> tuple[float, float]:
    """(slices per wall second, slices per process-CPU second), best of ``repeats``. CPU time is
    printed too because other jobs on a shared machine inflate wall time but hardly CPU time."""
    settings = AttackSettings(pgd_steps=steps, ifgsm_steps=steps, batch_size=batch_size)
    ev = Evaluator(model, data, settings, progress=False)
    ev.run(attack, eps, batches=ev.batches[:1])  # warm-up (allocator, first-call overheads)
    wall = cpu = float("inf")
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        ev.run(attack, eps)
        wall, cpu = min(wall, time.perf_counter() - t), min(cpu, time.process_time() - c)
    return len(ev.refs) / wall, len(ev.refs) / cpu


# ---------------------------------------------------------------------------------------------- world sizes
def worker(args) -> None:
    """One rank of a benchmark job (started by :func:`nnunet_ima_eval.distributed.launch`)."""
    from nnunet_ima_eval import distributed, units
    from nnunet_ima_eval.shards import ShardStore

    world = distributed.join()
    torch.set_num_threads(args.threads)
    settings = AttackSettings(pgd_steps=args.steps, ifgsm_steps=args.steps, batch_size=args.batch_size)
    ev = Evaluator(model_like(network(), tuple(args.shape)), cases(args.slices, tuple(args.shape), args.per_case),
                   settings, progress=False)
    ev.run(args.attack, args.eps, batches=ev.batches[:1])  # warm-up (allocator, first-call overheads)
    key, inputs, shards = {"attack": args.attack, "eps": args.eps, "steps": args.steps}, {"bench": "1"}, \
        ShardStore(Path(args.work))
    world.count("ready", 1)
    world.wait_count("ready", world.size)
    t, c = time.perf_counter(), time.process_time()
    if world.is_main:
        order = units.plan_work(world, ev, "bench", [key], inputs, shards)
        units.lead(world, units.SampleWork(ev), order, shards, progress=False)
        ((_, evaluation, _),) = units.merge_runs(order, shards, settings.convention)
        np.savez(Path(args.work) / "counts.npz", tp=evaluation.counts.tp, fp=evaluation.counts.fp,
                 fn=evaluation.counts.fn)
    else:
        units.follow(world, "bench", lambda order: units.SampleWork(ev), shards)
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    (Path(args.work) / f"rank{world.rank}.json").write_text(json.dumps({"wall": wall, "cpu": cpu}))


def world_sizes(args) -> None:
    """``--world-sizes``: each size ``--repeats`` times, alternating; a table of medians."""
    from nnunet_ima_eval import distributed

    forwarded = ["--worker", "--slices", str(args.slices), "--per-case", str(args.per_case), "--steps",
                 str(args.steps), "--batch-size", str(args.batch_size), "--attack", args.attack, "--eps",
                 str(args.eps), "--threads", str(args.threads), "--shape", *map(str, args.shape)]
    n_cases = -(-args.slices // args.per_case)
    print(f"torch {torch.__version__}; {args.slices} slices of {args.shape[0]}x{args.shape[1]} in {n_cases} cases, "
          f"nnU-Net PlainConvUNet 2d (4 stages, 32..256 features), {args.attack.upper()}-{args.steps} L2 "
          f"eps={args.eps}, batch {args.batch_size}, {args.threads} thread(s) per process; load average "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    times, counts = {w: [] for w in args.world_sizes}, {}
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    for _ in range(args.repeats):
        for w in args.world_sizes:
            with tempfile.TemporaryDirectory() as work:
                rc = distributed.launch("bench_eval", [*forwarded, "--work", work], w,
                                        command=[sys.executable, str(Path(__file__).resolve())])
                if rc:
                    raise SystemExit(f"world size {w}: a rank failed (exit code {rc})")
                ranks = [json.loads((Path(work) / f"rank{r}.json").read_text()) for r in range(w)]
                times[w].append((ranks[0]["wall"], sum(r["cpu"] for r in ranks)))
                with np.load(Path(work) / "counts.npz") as z:
                    counts[w] = {k: z[k] for k in ("tp", "fp", "fn")}
    first = args.world_sizes[0]
    same = all(np.array_equal(counts[w][k], counts[first][k]) for w in counts for k in ("tp", "fp", "fn"))
    base = args.slices / float(np.median([t for t, _ in times[first]]))
    print(f"| processes | wall s (median of {args.repeats}) | slices/s | CPU s (all ranks) | throughput vs {first} |")
    print("|---|---|---|---|---|")
    for w, runs in times.items():
        wall, cpu = float(np.median([t for t, _ in runs])), float(np.median([c for _, c in runs]))
        print(f"| {w} | {wall:.2f} | {args.slices / wall:.2f} | {cpu:.2f} | **{args.slices / wall / base:.2f}x** |")
    print(f"per-sample counts identical across world sizes: {'yes' if same else 'NO'} (target: throughput of 2 "
          f">= 1.7x that of 1)")
    print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world-sizes", type=int, nargs="+", default=None, metavar="N",
                   help="measure the sharded evaluation with these numbers of processes instead")
    p.add_argument("--per-case", type=int, default=None, help="slices per test case (default 32; 8 with --world-sizes)")
    p.add_argument("--threads", type=int, default=1, help="threads per process (--world-sizes)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--work", default=None, help=argparse.SUPPRESS)
    p.add_argument("--slices", type=int, default=None, help="slices (default 32; 64 with --world-sizes)")
    p.add_argument("--steps", type=int, default=None,
                   help="attack iterations (default 3; 10 with --world-sizes; the papers use PGD-100: time "
                        "scales linearly)")
    p.add_argument("--batch-size", type=int, default=None, help="default 32; 8 with --world-sizes")
    p.add_argument("--attack", choices=["pgd", "ifgsm"], default="pgd")
    p.add_argument("--eps", type=float, default=2.0)
    p.add_argument("--repeats", type=int, default=1, help="best of N timings per mode")
    p.add_argument("--shape", type=int, nargs=2, default=[56, 40], metavar=("H", "W"),
                   help="slice size (multiples of 8); 56 40 = Hippocampus, 32 32 = the tests' tiny data")
    args = p.parse_args(argv)
    scale = args.world_sizes is not None or args.worker
    for name, plain, sharded in (("slices", 32, 64), ("per_case", 32, 8), ("steps", 3, 10), ("batch_size", 32, 8)):
        if getattr(args, name) is None:
            setattr(args, name, sharded if scale else plain)
    if args.worker:
        return worker(args)
    if args.world_sizes:
        return world_sizes(args)

    model = model_like(network(), tuple(args.shape))
    data = cases(args.slices, tuple(args.shape), args.per_case)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.slices} slices of "
          f"{args.shape[0]}x{args.shape[1]}, "
          f"nnU-Net PlainConvUNet 2d (4 stages, 32..256 features), {args.attack.upper()}-{args.steps} L2 eps={args.eps}")
    batched, batched_cpu = measure(model, data, args.attack, args.steps, args.batch_size, args.eps, args.repeats)
    single, single_cpu = measure(model, data, args.attack, args.steps, 1, args.eps, args.repeats)
    print(f"batched (batch {args.batch_size}): {batched:8.2f} slices/s wall, {batched_cpu:8.2f} slices per CPU-s")
    print(f"one at a time (batch 1): {single:8.2f} slices/s wall, {single_cpu:8.2f} slices per CPU-s")
    print(f"speed-up: {batched / single:.1f}x wall, {batched_cpu / single_cpu:.1f}x CPU (target >= 4x)")
    return batched / single


if __name__ == "__main__":
    main()
