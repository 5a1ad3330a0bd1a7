"""Throughput of nnunet-ima-attack's evaluation loop: batched slices vs a one-slice-at-a-time loop.

Both are measured in the same run, on the same slices, with the same network and attack, through
the same code path (:class:`nnunet_ima_eval.runner.Evaluator`; only ``batch_size`` differs). The
network is nnU-Net's own 2d PlainConvUNet built from a plans-style configuration like the one nnU-Net
plans for Hippocampus (the later paper's Table 7: 56 x 40 slices, 4 stages, 32..256 features,
instance norm); weights are random because throughput does not depend on them.

    .venv/bin/python benchmarks/bench_eval.py                    # PGD-3, 32 slices, batch 32
    .venv/bin/python benchmarks/bench_eval.py --steps 10 --slices 128 --batch-size 64
"""
from __future__ import annotations

import argparse
import time
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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--slices", type=int, default=32)
    p.add_argument("--steps", type=int, default=3, help="attack iterations (the papers use PGD-100: time scales linearly)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--attack", choices=["pgd", "ifgsm"], default="pgd")
    p.add_argument("--eps", type=float, default=2.0)
    p.add_argument("--repeats", type=int, default=1, help="best of N timings per mode")
    p.add_argument("--shape", type=int, nargs=2, default=[56, 40], metavar=("H", "W"),
                   help="slice size (multiples of 8); 56 40 = Hippocampus, 32 32 = the tests' tiny data")
    args = p.parse_args(argv)

    model = model_like(network(), tuple(args.shape))
    data = cases(args.slices, tuple(args.shape))
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
