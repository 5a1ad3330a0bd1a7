"""Benchmark (not a test): cost of one training iteration of nnUNetTrainer, nnUNetTrainerSAT and
nnUNetTrainerIMA, and IMA against its floor, all measured in one run on a generated dataset.

    .venv/bin/python benchmarks/bench_trainers.py                 # K=20, N=10 (paper), 2d, CPU
    .venv/bin/python benchmarks/bench_trainers.py --k 5 --n 3 --iters 2 --shape 8 32 32   # quick look
    # GPU, a real-size 2d plan (generated 256x256 slices, or an existing preprocessed dataset):
    .venv/bin/python benchmarks/bench_trainers.py --device cuda --compile off --shape 32 256 256 --json off.json
    .venv/bin/python benchmarks/bench_trainers.py --device cuda --compile on  --shape 32 256 256 --json on.json
    # what K costs, side by side (issue 13), on the demo's data and network:
    .venv/bin/python benchmarks/bench_trainers.py --k 5 --n 5 --k-sweep 2 5 10 20 \
        --preprocessed nnunet_ima_work/nnUNet_preprocessed/Dataset990_MNIBrain --plans nnUNetPlansDemo
    .venv/bin/python benchmarks/bench_trainers.py --device cuda --preprocessed \
        $nnUNet_preprocessed/Dataset004_Hippocampus

What is measured
* A small dataset (``synthetic_shapes``) is written, planned and preprocessed by the real
  ``nnUNetv2_plan_and_preprocess`` (2d). Each trainer is built in-process, ``on_train_start()`` is
  called, and ``train_step`` is timed on the *same* batches (drawn once from nnU-Net's augmented
  loader), every trainer starting from the same weights. One warm-up step is not timed.
* IMA's worst case is forced: its Dice predicate still computes the Dice (so its cost counts) but
  reports every clean sample as correct and every attacked point as wrong, so BPGD runs all K PGD
  steps, the check forward and all N binary-search forwards on the whole batch (an untrained
  network segments nothing correctly, and IMA would then do no attack at all).
* The floor = one standard step (nnUNetTrainer.train_step) + K attack steps + N forwards, each
  measured with bare code on the same network and batch: an attack step is forward + backward to
  the input with frozen weights + the L2 step/projection arithmetic; a forward is ``no_grad``.
  IMA's extra work above the floor is the check forward, the noisy forward/backward of
  (L_clean + L_noisy) / 2, the Dice predicate and the margin bookkeeping.
* Memory on CPU: the process is re-executed with ``MALLOC_MMAP_THRESHOLD_=65536`` and
  ``MALLOC_TRIM_THRESHOLD_=0`` so that tensor buffers are mmapped and returned to the OS when freed;
  a thread samples the resident set size (/proc/self/statm) every ~0.5 ms during each timed step.
  Reported: the largest (over the timed steps) peak RSS increase over the RSS just before the
  step, taken after ``optimizer.zero_grad(set_to_none=True)`` (the first thing nnU-Net's step
  does), i.e. activations, gradients and temporaries on top of model + optimizer state.
  tracemalloc is not used: it only sees Python's allocator, not torch's buffers.
  On CUDA: torch.cuda.max_memory_allocated() minus the allocation before the step.
* CUDA: the trainers run as ``nnUNetv2_train -device cuda`` runs them (autocast + GradScaler,
  ``cudnn.benchmark = True``, one CPU thread); ``--compile on`` sets nnUNet_compile=true, so the
  network of all three trainers is compiled (3 untimed warm-up steps) while IMA's and SAT's attacks
  run on the uncompiled module (``attack_module``; their batch size changes every iteration). The
  floor's bare attack steps and forwards run under autocast on that same uncompiled module (the one
  IMA's attacks use), so IMA / floor compares like with like under either setting; the standard step
  in the floor is nnU-Net's own (compiled with --compile on). Every CUDA timing is bracketed by
  ``torch.cuda.synchronize()``.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "OMP_WAIT_POLICY": "PASSIVE"}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--k", type=int, default=20, help="PGD steps (paper: 20)")
    p.add_argument("--n", type=int, default=10, help="binary-search steps (paper: 10)")
    p.add_argument("--iters", type=int, default=3, help="timed iterations per trainer (after the warm-up)")
    p.add_argument("--warmup", type=int, default=None,
                   help="untimed warm-up iterations per trainer (default 1; 3 with --compile on)")
    p.add_argument("--shape", type=int, nargs=3, default=(16, 64, 64), help="generated case shape z y x")
    p.add_argument("--cases", type=int, default=6)
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads (0: all cores on the CPU, 1 on CUDA as nnUNetv2_train)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="cuda: autocast + GradScaler, as nnU-Net")
    p.add_argument("--compile", default="off", choices=("on", "off"),
                   help="nnU-Net's torch.compile of the network (nnUNet_compile; CUDA only, nnU-Net never "
                        "compiles on the CPU). IMA/SAT attack the uncompiled module either way (attack_module)")
    p.add_argument("--preprocessed", default=None,
                   help="an existing nnUNet_preprocessed/DatasetXXX folder to benchmark its 2d plan (e.g. a real "
                        "dataset) instead of generating one")
    p.add_argument("--plans", default="nnUNetPlans", help="plans identifier inside --preprocessed")
    p.add_argument("--root", default=None, help="work folder (default: a temporary one)")
    p.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    p.add_argument("--k-sweep", type=int, nargs="+", default=None, metavar="K",
                   help="also time IMA's step with each of these K (same batches and weights, worst case, the K "
                        "values interleaved over --rounds rounds) and print each one's cost relative to the largest")
    p.add_argument("--rounds", type=int, default=2, help="rounds of the --k-sweep (default 2; the fastest counts)")
    args = p.parse_args()
    if args.k_sweep and min(args.k_sweep) < 1:
        p.error("--k-sweep: every K must be >= 1")
    if args.warmup is None:
        args.warmup = 3 if args.compile == "on" else 1
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            p.error("--device cuda: no CUDA device is available to torch on this machine")
    if args.cases < 5 and not args.preprocessed:
        p.error(f"--cases {args.cases}: nnU-Net's 5-fold split needs at least 5 cases")
    if args.compile == "on" and args.device != "cuda":
        p.error("--compile on needs --device cuda (nnU-Net disables torch.compile on the CPU)")
    return args


class RSSPeak:
    """Samples this process's resident set size in a thread; ``peak`` in bytes."""

    PAGE = os.sysconf("SC_PAGE_SIZE")

    def __init__(self):
        self.peak = 0
        self._stop = threading.Event()

    @classmethod
    def rss(cls) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * cls.PAGE

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(0.0005)

    def __enter__(self):
        self.peak = self.rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())


def measure(fn, device, repeats: int, prepare=None):
    """(mean wall seconds, mean process CPU seconds, max peak memory increase in bytes, max peak in
    bytes) of ``fn()``; ``prepare()`` runs before each call, outside the measurement. Peak on CUDA:
    ``torch.cuda.max_memory_allocated()`` (increase: over the allocation before the call); on the CPU:
    the resident set size."""
    import torch

    walls, cpus, peaks, tops = [], [], [], []
    for _ in range(repeats):
        if prepare:
            prepare()
        if device.type == "cuda":
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            torch.cuda.synchronize()
            walls.append(time.perf_counter() - t0)
            cpus.append(time.process_time() - c0)
            tops.append(torch.cuda.max_memory_allocated())
            peaks.append(tops[-1] - base)
        else:
            base = RSSPeak.rss()
            with RSSPeak() as s:
                t0, c0 = time.perf_counter(), time.process_time()
                fn()
                walls.append(time.perf_counter() - t0)
                cpus.append(time.process_time() - c0)
            peaks.append(s.peak - base)
            tops.append(s.peak)
    return sum(walls) / len(walls), sum(cpus) / len(cpus), max(peaks), max(tops)


class WorstCasePredicate:
    """Computes the real Dice, then answers: first call after ``reset()`` (the clean batch) ->
    all correct; every later call (inside BPGD, and the margin update's) -> all wrong."""

    def __init__(self, real):
        self.real, self._clean = real, True

    def __getattr__(self, name):  # threshold, reduction, ... of the real predicate
        return getattr(self.real, name)

    def reset(self):
        self._clean = True

    def __call__(self, output, y):
        import torch

        dice_ok = self.real(output, y)
        verdict = torch.full_like(dice_ok, self._clean)
        self._clean = False
        return verdict


def prepare_dataset(args) -> Path:
    """Set the nnU-Net environment; return the 2d plans file (generated + preprocessed if needed)."""
    root = Path(args.root or tempfile.mkdtemp(prefix="bench_trainers_"))
    from nnunet_ima_demo.nnunet_data import nnunet_env, plan_and_preprocess, write_raw_dataset

    env = nnunet_env(root)
    env.update(nnUNet_n_proc_DA="0", nnUNet_compile="true" if args.compile == "on" else "false",
               NNUNET_IMA_K=str(args.k), NNUNET_IMA_N=str(args.n))
    if args.preprocessed:
        folder = Path(args.preprocessed).resolve()
        env["nnUNet_preprocessed"] = str(folder.parent)
        os.environ.update(env)
        return folder / f"{args.plans}.json"
    os.environ.update(env)
    plans_file = root / "nnUNet_preprocessed" / "Dataset998_Bench" / "nnUNetPlans.json"
    if not plans_file.exists():
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # test-only data generators
        from data_gen import synthetic_shapes

        t0 = time.perf_counter()
        cases = synthetic_shapes(args.cases, shape=tuple(args.shape), seed=1)
        write_raw_dataset(env["nnUNet_raw"], 998, "Bench", cases, {"background": 0, "outer": 1, "core": 2})
        plan_and_preprocess(998, ("2d",), env=env, num_processes=min(8, os.cpu_count() or 1))
        print(f"dataset: {args.cases} cases {tuple(args.shape)}, planned + preprocessed in "
              f"{time.perf_counter() - t0:.0f} s")
    return plans_file


def build(cls, plans_file: Path, device):
    from batchgenerators.utilities.file_and_folder_operations import load_json

    plans = load_json(str(plans_file))
    plans["continue_training"] = False
    dataset_json = load_json(str(plans_file.with_name("dataset.json")))
    trainer = cls(plans, "2d", 0, dataset_json, device=device)
    trainer.on_train_start()
    trainer.on_train_epoch_start()
    return trainer


def time_steps(trainer, weights, batches, args, device, before=None):
    """(wall s, CPU s, peak bytes) of ``train_step`` on the timed batches, after the warm-up ones."""
    trainer.network.load_state_dict(weights)
    it = iter(batches)

    def prepare():
        # train_step starts with zero_grad(set_to_none=True); doing it first makes the baseline
        # "model + optimizer state", without the previous step's gradient buffers
        trainer.optimizer.zero_grad(set_to_none=True)
        if before:
            before()

    for _ in range(args.warmup):  # allocates the optimizer state; compiles under --compile on
        prepare()
        trainer.train_step(next(it))
    return measure(lambda: trainer.train_step(next(it)), device, args.iters, prepare)


def measure_floor(std, weights, batch, args, device) -> dict:
    """One bare attack step (forward + backward to the input with frozen weights + the L2 step
    arithmetic, under autocast on CUDA) and one no_grad forward, on the standard trainer's network
    without the torch.compile wrapper (the module IMA's attacks run on)."""
    import torch

    std.network.load_state_dict(weights)
    net, loss_fn = getattr(std.network, "_orig_mod", std.network), std.loss  # what IMA's attacks run on
    x = batch["data"].to(device)
    y = [t.to(device) for t in batch["target"]]

    def attack_step():
        for p in net.parameters():
            p.requires_grad_(False)
        net.eval()
        xa = x.clone().requires_grad_(True)
        with torch.autocast(device.type, enabled=device.type == "cuda"):  # as nnU-Net's training step
            loss = loss_fn(net(xa), y)
        (g,) = torch.autograd.grad(loss, xa)
        with torch.no_grad():
            step = g / g.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
            d = xa.detach() + 0.1 * step - x
            d = d * (1.0 / d.flatten(1).norm(dim=1).clamp(min=1.0)).view(-1, 1, 1, 1)
            _ = x + d
        for p in net.parameters():
            p.requires_grad_(True)
        net.train()

    def forward():
        with torch.no_grad(), torch.autocast(device.type, enabled=device.type == "cuda"):
            net.eval()
            net(x)
            net.train()

    attack_step(), forward()  # warm-up
    reps = max(args.iters, 3)
    return {"attack": measure(attack_step, device, reps), "forward": measure(forward, device, reps)}


def floor_of(step, parts: dict, k: int, n: int) -> list:
    """[wall, CPU] seconds of the floor: one standard step + ``k`` attack steps + ``n`` forwards."""
    return [step[i] + k * parts["attack"][i] + n * parts["forward"][i] for i in (0, 1)]


def report(results: dict, parts: dict, args, threads: int) -> dict:
    """Print the table; return the numbers (for --json)."""
    step = results["nnUNetTrainer"]
    floor = floor_of(step, parts, args.k, args.n)
    print(f"\nper iteration (mean of {args.iters}): wall s, process CPU s ({threads} threads; less "
          "disturbed by other load), peak memory increase (max) and peak:")
    for name, (w, c, m, top) in results.items():
        print(f"  {name:<18} {w:8.3f} s wall {c:8.3f} s CPU {m / 2**20:8.1f} MiB (peak {top / 2**20:.0f} MiB)  "
              f"(x{w / step[0]:.2f} wall, x{c / step[1]:.2f} CPU, x{m / step[2]:.2f} memory)")
    for i, kind in ((0, "wall"), (1, "CPU")):
        print(f"floor ({kind}): standard step {step[i]:.3f} s + K={args.k} x attack step "
              f"{parts['attack'][i]:.3f} s + N={args.n} x forward {parts['forward'][i]:.3f} s = {floor[i]:.3f} s")
    ima = results["nnUNetTrainerIMA"]
    ratios = [ima[i] / floor[i] for i in (0, 1)]
    mem = ima[2] / step[2]
    print(f"IMA / floor = {ratios[0]:.3f} wall, {ratios[1]:.3f} CPU  (target <= 1.2: "
          f"{'met' if max(ratios) <= 1.2 else 'NOT met'})")
    print(f"IMA peak memory increase / standard = {mem:.2f}  (target <= 1.5: {'met' if mem <= 1.5 else 'NOT met'})")
    return {"per_iteration": {k: {"wall_s": v[0], "cpu_s": v[1], "peak_bytes": v[2], "peak_total_bytes": v[3]}
                              for k, v in results.items()},
            "floor_parts": {k: {"wall_s": v[0], "cpu_s": v[1]} for k, v in parts.items()},
            "floor_wall_s": floor[0], "floor_cpu_s": floor[1], "ima_over_floor_wall": ratios[0],
            "ima_over_floor_cpu": ratios[1], "ima_memory_ratio": mem,
            "ima_over_nnunet_wall": ima[0] / step[0], "ima_over_nnunet_cpu": ima[1] / step[1]}


def sweep_numbers(best: dict, step, parts: dict, args) -> dict:
    """Per K of the sweep: seconds, the floor at that K (same N) and IMA / floor, IMA / nnUNetTrainer."""
    out = {}
    for k, (w, c) in sorted(best.items()):
        floor = floor_of(step, parts, k, args.n)
        out[str(k)] = {"wall_s": w, "cpu_s": c, "floor_wall_s": floor[0], "floor_cpu_s": floor[1],
                       "ima_over_floor_wall": w / floor[0], "ima_over_floor_cpu": c / floor[1],
                       "ima_over_nnunet_wall": w / step[0], "ima_over_nnunet_cpu": c / step[1]}
        print(f"  K={k:<3} IMA / floor {w / floor[0]:.3f} wall, {c / floor[1]:.3f} CPU; IMA / nnUNetTrainer "
              f"{w / step[0]:.2f} wall")
    return out


def k_sweep(ima, weights, batches, args, device) -> dict:
    """IMA's iteration cost for each K of ``--k-sweep``, measured side by side: the K values take turns
    for ``--rounds`` rounds on the same batches and weights; per K the fastest round counts (load only
    ever adds time). Returns {K: (wall s, CPU s)}."""
    import dataclasses

    settings = ima.step_settings
    best: dict = {}
    for _ in range(args.rounds):
        for k in args.k_sweep:
            ima.step_settings = dataclasses.replace(settings, steps=k)
            w, c = time_steps(ima, weights, batches, args, device, before=ima.predicate.reset)[:2]
            old = best.get(k, (float("inf"), float("inf")))
            best[k] = (min(old[0], w), min(old[1], c))
    ima.step_settings = settings
    top = max(args.k_sweep)
    print(f"\nIMA per iteration by K (N={args.n}, worst case: every sample attacked, all K steps and N searches; "
          f"fastest of {args.rounds} interleaved rounds):")
    for k in sorted(best):
        w, c = best[k]
        print(f"  K={k:<3} {w:8.3f} s wall {c:8.3f} s CPU   (x{w / best[top][0]:.2f} wall, x{c / best[top][1]:.2f} CPU "
              f"of K={top})")
    return best


def main():
    args = parse_args()
    if args.device == "cpu" and any(os.environ.get(k) != v for k, v in MALLOC_ENV.items()):
        os.environ.update(MALLOC_ENV)  # glibc reads these at start-up: run again with them
        os.execv(sys.executable, [sys.executable, *sys.argv])
    plans_file = prepare_dataset(args)

    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    from nnunet_ima_trainers import nnUNetTrainerIMA, nnUNetTrainerSAT

    device = torch.device(args.device)
    if device.type == "cuda":  # as nnUNetv2_train -device cuda (nnunetv2.run.run_training)
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = True, False
    torch.set_num_threads(args.threads or (1 if device.type == "cuda" else os.cpu_count()))
    std, sat, ima = (build(cls, plans_file, device) for cls in (nnUNetTrainer, nnUNetTrainerSAT, nnUNetTrainerIMA))
    weights = copy.deepcopy(std.network.state_dict())
    batches = [next(ima.dataloader_train) for _ in range(args.iters + args.warmup)]  # keys: case/slice_k
    b = batches[0]["data"]
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "none"
    params = sum(p.numel() for p in std.network.parameters()) / 1e6
    print(f"2d patch {tuple(b.shape[2:])}, batch {b.shape[0]}, {params:.1f} M parameters, K={args.k}, N={args.n}, "
          f"{torch.get_num_threads()} threads, device {device} (GPU: {gpu}), compile {args.compile}")

    results = {"nnUNetTrainer": time_steps(std, weights, batches, args, device)}
    results["nnUNetTrainerSAT"] = time_steps(sat, weights, batches, args, device)
    ima.predicate = WorstCasePredicate(ima.predicate)
    results["nnUNetTrainerIMA"] = time_steps(ima, weights, batches, args, device, before=ima.predicate.reset)
    parts = measure_floor(std, weights, batches[0], args, device)
    numbers = report(results, parts, args, torch.get_num_threads())
    if args.k_sweep:
        best = k_sweep(ima, weights, batches, args, device)
        numbers["k_sweep"] = sweep_numbers(best, results["nnUNetTrainer"], parts, args)
    if args.json:
        numbers.update(device=str(device), gpu=gpu, compile=args.compile, k=args.k, n=args.n,
                       patch=list(b.shape[2:]), batch=int(b.shape[0]), plans=str(plans_file),
                       parameters_m=params, iters=args.iters, warmup=args.warmup, torch=torch.__version__)
        Path(args.json).write_text(json.dumps(numbers, indent=1))


if __name__ == "__main__":
    main()
