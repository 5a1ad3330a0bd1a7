"""Memory and time of one case-scope attack step (``nnunet-ima-attack --scope case``) for cases of 1x, 2x
and 4x the volume, on a 3d and a 2d nnU-Net model.

The networks are nnU-Net's own, built from the plans nnU-Net's planner writes for a generated dataset
(``synthetic_shapes``; ``nnUNetv2_plan_and_preprocess -c 2d 3d_fullres --no_pp``) or from a real plans
file (``--plans``), with random weights: memory and time do not depend on them. A case of 1x is 1.5 patches
along every axis of the patch (a 2d model: ``--slices`` slices of 1.5 x 1.5 patches), 2x doubles its last
axis, 4x its last two. One step is what the kernel's PGD does per iteration
(``nnunet_ima.attacks.gradient`` + ``step``) through :class:`nnunet_ima_eval.case_predictor.CasePredictor`
(window-by-window backward) with the model's Dice+CE over the blended logits and the per-slice / per-tile
budget (``BlockNorm``).

Measured side by side, each case size in a fresh process (so that the peak is its own):

* **peak above the case's arrays**: the peak memory of one step minus what was allocated before it (the
  network, the case and its perturbation) minus the blended logits it returns (CPU: the process's peak
  resident memory, ``VmHWM`` after resetting it through ``/proc/self/clear_refs``, with glibc returning
  large blocks at once, ``MALLOC_MMAP_THRESHOLD_``; CUDA: ``torch.cuda.max_memory_allocated``, all sizes in
  one process). Target: at 4x within 1.3x of 1x.
* **s/step** against the **bare** cost ``windows x mirrors x (2 forwards + 1 backward)``: one window's
  forward without a graph and its forward + backward to the input, timed in the same process (best of
  ``--repeats``). Target: s/step within 1.3x of it.

    .venv/bin/python benchmarks/bench_case_attack.py                       # CPU, generated dataset
    .venv/bin/python benchmarks/bench_case_attack.py --device cuda --json case.json
    .venv/bin/python benchmarks/bench_case_attack.py --plans nnUNetPlans.json --configurations 3d_fullres
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCALES = (1, 2, 4)
DATASET_ID, DATASET_NAME = 996, "BenchCase"


# ---------------------------------------------------------------------------------------------- the dataset
def plans_file(args) -> Path:
    """A plans file with 2d and 3d_fullres: ``--plans``, or one planned for a generated dataset in ``--root``."""
    if args.plans:
        return Path(args.plans).resolve()
    from nnunet_ima_demo.nnunet_data import nnunet_command, nnunet_env, write_raw_dataset

    root = Path(args.root)
    env = nnunet_env(root)
    target = root / "nnUNet_preprocessed" / f"Dataset{DATASET_ID}_{DATASET_NAME}" / "nnUNetPlans.json"
    if not target.is_file():
        sys.path.insert(0, str(REPO / "tests"))  # test-only data generators
        from data_gen import synthetic_shapes

        cases = synthetic_shapes(4, shape=tuple(args.shape), seed=1)
        write_raw_dataset(env["nnUNet_raw"], DATASET_ID, DATASET_NAME, cases, {"background": 0, "outer": 1, "core": 2})
        cmd = nnunet_command("nnUNetv2_plan_and_preprocess") + ["-d", str(DATASET_ID), "-c", "2d", "3d_fullres",
                                                                 "--no_pp", "-np", "1"]
        subprocess.run(cmd, env={k: v for k, v in env.items() if k != "nnUNet_n_proc_DA"}, check=True,
                       stdout=subprocess.DEVNULL)
    return target


# ---------------------------------------------------------------------------------------------- one measurement
def _status() -> dict:
    text = Path("/proc/self/status").read_text()
    return {k: int(re.search(rf"{k}:\s+(\d+)", text).group(1)) * 1024 for k in ("VmRSS", "VmHWM")}


class Peak:
    """Peak memory above the moment :meth:`start` is called (bytes), on CPU or CUDA."""

    def __init__(self, device):
        self.device = device

    def start(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
            self.base = _status()["VmRSS"]

    def stop(self) -> int:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.base
        return _status()["VmHWM"] - self.base


def build(plans: Path, configuration: str, device):
    """(network, configuration manager) from the plans, random weights, eval mode, on ``device``."""
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    cm = PlansManager(load_json(str(plans))).get_configuration(configuration)
    torch.manual_seed(0)
    net = get_network_from_plans(cm.network_arch_class_name, cm.network_arch_init_kwargs,
                                 cm.network_arch_init_kwargs_req_import, 1, 3, allow_init=True, deep_supervision=False)
    return net.to(device).eval(), cm


def case_shape(patch: tuple, scale: int, slices: int) -> tuple:
    """1x: 1.5 patches per patch axis (a 2d model: ``slices`` slices in front); 2x doubles the last axis, 4x the
    last two."""
    base = [math.ceil(1.5 * p) for p in patch]
    if scale >= 2:
        base[-1] *= 2
    if scale >= 4:
        base[-2] *= 2
    return tuple(([slices] if len(patch) == 2 else []) + base)


def _timed(fn, device, repeats: int) -> float:
    import torch

    best = math.inf
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def bare_window(net, patch: tuple, device, repeats: int) -> dict:
    """One window's forward without a graph, and its forward + backward to the input (seconds, best of)."""
    import torch

    w = torch.randn((1, 1, *patch), device=device)

    def forward():
        with torch.no_grad():
            net(w)

    def forward_backward():
        x = w.clone().requires_grad_(True)
        out = net(x)
        torch.autograd.grad(out, x, torch.ones_like(out))

    forward(), forward_backward()  # warm-up
    return {"forward_s": _timed(forward, device, repeats), "forward_backward_s": _timed(forward_backward, device,
                                                                                         repeats)}


def measure(args) -> dict:
    """One (configuration, scale) in this process: peak memory and time of one attack step, and the bare cost."""
    import torch

    from nnunet_ima.attacks import gradient, resolve_step_size, step
    from nnunet_ima_eval.case_predictor import CasePredictor, pad_case, sliding_window_slicers
    from nnunet_ima_eval.case_scope import case_budget
    from nnunet_ima_eval.model import PerSampleLoss

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    net, cm = build(Path(args.plans_path), args.configuration, device)
    patch = tuple(int(p) for p in cm.patch_size)
    mirror_axes = tuple(range(len(patch))) if args.mirroring else None
    predictor = CasePredictor(net, patch, 0.5, mirror_axes)
    shape = case_shape(patch, args.scale, args.slices)
    x = torch.randn((1, 1, *shape), device=device)
    y = (x > 0.5).long() + (x > 1.5).long()
    norm, factor = case_budget("l2", "blocks", patch, shape)
    eps = torch.tensor([2.0 * factor], device=device)
    alpha = resolve_step_size(None, eps, 10)
    loss = PerSampleLoss("dicece", False, None)
    x_adv = x.clone()
    windows = len(sliding_window_slicers(tuple(pad_case(x[0], patch)[0].shape[1:]), patch, 0.5))

    def one_step():
        _, g = gradient(predictor, x_adv.clone(), y, loss)
        return step(x, x_adv, g, eps, alpha, norm, None)

    bare = bare_window(net, patch, device, args.repeats)
    one_step()  # warm-up
    peak, peaks, seconds = Peak(device), [], math.inf
    for _ in range(args.repeats):  # each step timed and its peak taken
        peak.start()
        seconds = min(seconds, _timed(one_step, device, 1))
        peaks.append(peak.stop())
    logits = 3 * math.prod(shape) * 4
    mirrors = len(predictor.flips)
    return {"configuration": args.configuration, "scale": args.scale, "shape": shape, "patch": patch,
            "windows": windows, "mirrors": mirrors, "case_bytes": 2 * x.numel() * 4 + logits,
            "peak_above_bytes": max(peaks) - logits, "step_s": seconds,
            "bare_s": windows * mirrors * (bare["forward_s"] + bare["forward_backward_s"]), **bare}


# ---------------------------------------------------------------------------------------------- the table
def run_all(args, plans: Path) -> list[dict]:
    """Every (configuration, scale): on CUDA in this process (the allocator's peak is exact), on the CPU each in
    a fresh process (the resident-memory peak is the process's)."""
    out = []
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", OMP_WAIT_POLICY="PASSIVE")
    for conf in args.configurations:
        for scale in SCALES:
            if args.device.startswith("cuda"):
                out.append(measure(argparse.Namespace(**{**vars(args), "plans_path": str(plans), "configuration": conf,
                                                         "scale": scale})))
                print(f"  measured {conf} x{scale}: {out[-1]['step_s']:.3f} s/step", flush=True)
                continue
            cmd = [sys.executable, __file__, "--worker", "--plans-path", str(plans), "--configuration", conf,
                   "--scale", str(scale), "--device", args.device, "--repeats", str(args.repeats), "--threads",
                   str(args.threads), "--slices", str(args.slices)] + ([] if args.mirroring else ["--no-mirroring"])
            run = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if run.returncode:
                raise SystemExit(f"bench_case_attack.py: error: {conf} x{scale} failed: {run.stderr[-2000:]}")
            out.append(json.loads(run.stdout.strip().splitlines()[-1]))
            print(f"  measured {conf} x{scale}: {out[-1]['step_s']:.2f} s/step", flush=True)
    return out


def table(rows: list[dict]) -> str:
    head = ("| model | case | case shape | windows x mirrors | case arrays MiB | peak above MiB | vs 1x | s/step | "
            "bare s | step / bare |")
    lines = [head, "|" + "---|" * 10]
    first = {}
    for r in rows:
        one = first.setdefault(r["configuration"], r)
        lines.append(f"| {r['configuration']} (patch {'x'.join(map(str, r['patch']))}) | {r['scale']}x | "
                     f"{'x'.join(map(str, r['shape']))} | {r['windows']} x {r['mirrors']} | "
                     f"{r['case_bytes'] / 2**20:.1f} | {r['peak_above_bytes'] / 2**20:.1f} | "
                     f"{r['peak_above_bytes'] / one['peak_above_bytes']:.2f} | {r['step_s']:.2f} | "
                     f"{r['bare_s']:.2f} | {r['step_s'] / r['bare_s']:.2f} |")
    return "\n".join(lines)


def verdict(rows: list[dict]) -> list[str]:
    out = []
    for conf in dict.fromkeys(r["configuration"] for r in rows):
        rs = {r["scale"]: r for r in rows if r["configuration"] == conf}
        mem = rs[4]["peak_above_bytes"] / rs[1]["peak_above_bytes"]
        worst = max(r["step_s"] / r["bare_s"] for r in rs.values())
        out.append(f"{conf}: peak above the case's arrays at 4x = {mem:.2f} x 1x (target <= 1.3: "
                   f"{'met' if mem <= 1.3 else 'MISSED'}); s/step <= {worst:.2f} x bare (target <= 1.3: "
                   f"{'met' if worst <= 1.3 else 'MISSED'})")
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--plans", default=None, help="a real nnUNetPlans.json (default: plan a generated dataset)")
    p.add_argument("--configurations", nargs="+", default=["3d_fullres", "2d"])
    p.add_argument("--root", default=str(Path(tempfile.gettempdir()) / "nnunet_ima_bench_case"),
                   help="where the generated dataset is written and planned (reused)")
    p.add_argument("--shape", type=int, nargs=3, default=(16, 48, 48), help="generated case shape (z y x)")
    p.add_argument("--slices", type=int, default=2, help="slices of a 2d model's case")
    p.add_argument("--no-mirroring", dest="mirroring", action="store_false",
                   help="one pass per window (default: mirroring over every spatial axis, nnU-Net's default)")
    p.add_argument("--repeats", type=int, default=2, help="best of N for every time")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--json", default=None, help="also write the measurements here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--plans-path", help=argparse.SUPPRESS)
    p.add_argument("--configuration", help=argparse.SUPPRESS)
    p.add_argument("--scale", type=int, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(measure(args)))
        return 0
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            print("bench_case_attack.py: error: --device cuda: no CUDA GPU is available here", file=sys.stderr)
            return 2
    plans = plans_file(args)
    rows = run_all(args, plans)
    print(table(rows))
    print("\n".join(verdict(rows)))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
