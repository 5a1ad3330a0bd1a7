"""Every argument, path and device of ``nnunet-ima demo`` checked before the first expensive step.

:func:`check_args` raises :class:`DemoArgumentError` for the first problem it finds; the CLI prints
it as one line (``nnunet-ima demo: error: argument --k: got 0; expected an integer >= 1``) and
exits with code 2, before any folder is created, any data is built or any model is trained.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

from nnunet_ima.ui import UsageError, check_writable, resolve_device

from .mni import DATASET_NAME

NNUNET_VARS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
TEMPLATE_Z_MM = 189  # axial extent of the MNI152 2009a template in nilearn (197 x 233 x 189 at 1 mm)
MIN_SLABS = 7  # test_every=3 leaves >= 5 training slabs (nnU-Net's 5-fold split) and 2 test slabs


class DemoArgumentError(UsageError):
    """A bad ``nnunet-ima demo`` argument: names the argument, the value and what is expected."""

    def __init__(self, flag: str, value, expected: str):
        self.flag, self.value, self.expected = flag, value, expected
        what = f"environment variable {flag[1:]}" if flag.startswith("$") else f"argument {flag}"
        super().__init__(f"{what}: got {_show(value)}; expected {expected}")


def _show(value) -> str:
    if isinstance(value, (list, tuple)):
        return " ".join(_show(v) for v in value) or "nothing"
    return f"{value:g}" if isinstance(value, float) else str(value)


def check_args(args, environ=None) -> None:
    """All checks, cheapest first; raises :class:`DemoArgumentError` on the first failure."""
    environ = os.environ if environ is None else environ
    check_numbers(args)
    check_paths(args, environ)
    args.device = check_device(args.device)


def check_numbers(args) -> None:
    """Counts >= 1, positive radii with delta <= eps_max, attack levels >= 0, a usable template cut."""
    for flag in ("--epochs-std", "--epochs-adv", "--iters", "--val-iters", "--k", "--n", "--pgd-steps", "--ifgsm-steps",
                 "--slab", "--batch-size", "--repeats"):
        _at_least_one(flag, getattr(args, _dest(flag)))
    if args.seed < 0:
        raise DemoArgumentError("--seed", args.seed, "an integer >= 0")
    if args.case_pgd_steps < 0:
        raise DemoArgumentError("--case-pgd-steps", args.case_pgd_steps, "an integer >= 0 (0: no case scope)")
    if args.initial_lr is not None and not (math.isfinite(args.initial_lr) and args.initial_lr > 0):
        raise DemoArgumentError("--initial-lr", args.initial_lr, "a learning rate > 0")
    if not 1 <= args.dataset_id <= 999:
        raise DemoArgumentError("--dataset-id", args.dataset_id, "an nnU-Net dataset id from 1 to 999")
    for flag in ("--eps-max", "--delta", "--sat-eps"):
        value = getattr(args, _dest(flag))
        if not (math.isfinite(value) and value > 0):
            raise DemoArgumentError(flag, value, "a number > 0")
    if args.delta > args.eps_max:
        raise DemoArgumentError("--delta", args.delta, f"a margin step <= --eps-max ({args.eps_max:g})")
    if any(not (math.isfinite(e) and e >= 0) for e in args.eps) or not any(e > 0 for e in args.eps):
        raise DemoArgumentError("--eps", args.eps, "noise levels >= 0, at least one of them > 0")
    if len(args.features) < 2 or any(f < 1 for f in args.features):
        raise DemoArgumentError("--features", args.features, "at least two feature counts, each >= 1")
    check_template_cut(args.resolution, args.slab)


def check_template_cut(resolution: float, slab: int) -> None:
    """The MNI152 template (1 mm) must be cut into enough axial slabs for nnU-Net's 5-fold split."""
    if not (math.isfinite(resolution) and resolution >= 1):
        raise DemoArgumentError("--resolution", resolution, "a resampling in mm >= 1 (the template's own 1 mm)")
    slabs = int(TEMPLATE_Z_MM // resolution) // slab
    if slabs < MIN_SLABS:
        raise DemoArgumentError(
            "--resolution", resolution, f"a value that cuts the template's {TEMPLATE_Z_MM} mm into at least "
            f"{MIN_SLABS} slabs of --slab {slab} slices (this gives {slabs})")


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def _at_least_one(flag: str, value: int) -> None:
    if value < 1:
        raise DemoArgumentError(flag, value, "an integer >= 1")


def check_paths(args, environ) -> None:
    """The working folder and any nnUNet_* folder set in the environment can be created or written,
    and no other dataset holds ``--dataset-id`` there (nnU-Net would refuse the id later)."""
    base = Path(args.output).expanduser().resolve()
    folders = {var: (Path(environ[var]), f"${var}") if environ.get(var) else (base / var, "--output")
               for var in NNUNET_VARS}
    if any(flag == "--output" for _, flag in folders.values()):
        _writable_folder(base, "--output")
    for path, flag in folders.values():
        _writable_folder(path, flag)
    prefix = f"Dataset{args.dataset_id:03d}_"
    for path, flag in folders.values():
        other = sorted(p.name for p in path.glob(prefix + "*") if p.name != prefix + DATASET_NAME) \
            if path.is_dir() else []
        if other:
            raise DemoArgumentError("--dataset-id", args.dataset_id,
                                    f"an id no other dataset uses ({path} already holds {other[0]})")


def _writable_folder(path: Path, flag: str) -> None:
    """The one output-folder check (:func:`nnunet_ima.ui.check_writable`: a probe file in an existing folder)."""
    if path.exists():
        if not path.is_dir():
            raise DemoArgumentError(flag, path, "a folder, not a file")
        try:
            check_writable(path, flag)
        except UsageError as e:
            raise DemoArgumentError(flag, path, f"a folder you can write to ({str(e).rpartition('(')[2].rstrip(')')})") from None
        return
    parent = next(p for p in path.parents if p.exists())
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise DemoArgumentError(flag, path, f"a folder that can be created (cannot write to {parent})")


def check_device(device: str | None) -> str:
    """The project's one device rule (:func:`nnunet_ima.ui.resolve_device`: cpu, cuda or cuda:N, the
    default cuda when PyTorch sees a GPU, else cpu); returns the device to use."""
    try:
        return resolve_device(device)
    except UsageError as e:
        raise DemoArgumentError("--device", device, str(e).partition(": expected ")[2]) from None
