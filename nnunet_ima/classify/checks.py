"""Checks of the command line, all run before the first expensive step (loading data, training).

Every failure is one :class:`ArgError` whose message names the argument, the value given and what
is expected: ``--epochs 0: expected an integer >= 1 (training epochs)``. The CLI prints it as one
line on stderr (``python -m nnunet_ima.classify train: error: ...``, :func:`nnunet_ima.ui.report_error`)
and exits with code 2; nothing has been trained or written by then. ``--device`` is checked by the
shared :func:`nnunet_ima.ui.check_device`, noise levels by :func:`nnunet_ima.ui.eps_value`.
"""
from __future__ import annotations

from pathlib import Path

import torch

from nnunet_ima.eps_scale import MAX_EPS, scale_problems
from nnunet_ima.ui import UsageError, spelling, usage_error, warn

from .datasets import has_train_test
from .evaluate import ATTACKS
from .methods import METHODS
from .methods.base import method_params

#: (argument dest, what a valid value is): numbers that the CLI checks before anything runs.
NUMBER_RULES = {
    "epochs": (lambda v: v >= 1, "an integer >= 1 (training epochs)"),
    "batch_size": (lambda v: v >= 1, "an integer >= 1"),
    "lr": (lambda v: v > 0, "a learning rate > 0"),
    "eps_max": (lambda v: 0 < v < MAX_EPS, f"a training bound > 0 that float32 can hold (< {MAX_EPS:.3g})"),
    "delta": (lambda v: v > 0, "IMA's margin step > 0 (and <= --eps-max)"),
    "std_warmup_epochs": (lambda v: v >= 0, "an integer >= 0"),
    "k": (lambda v: v >= 1, "an integer >= 1 (K, PGD steps in training)"),
    "n": (lambda v: v >= 0, "an integer >= 0 (N, binary-search steps)"),
    "pgd_steps": (lambda v: v >= 1, "an integer >= 1"),
    "ifgsm_steps": (lambda v: v >= 1, "an integer >= 1"),
    "aa_queries": (lambda v: v >= 1, "an integer >= 1"),
    "limit_train": (lambda v: v >= 1, "an integer >= 1"),
    "limit_test": (lambda v: v >= 1, "an integer >= 1"),
    "image_size": (lambda v: v >= 1, "a size in pixels >= 1"),
    "test_split": (lambda v: 0 < v < 1, "a fraction between 0 and 1, e.g. 0.2"),
    "val_split": (lambda v: 0 <= v < 1, "a fraction in [0, 1), e.g. 0.1"),
    "stop_after_epoch": (lambda v: v >= 1, "an integer >= 1"),
}
NUMBER_RULES.update({name: (p.valid, p.expected) for name, p in method_params().items() if p.choices is None})
#: MethodConfig field -> the argument (dest) that sets it: the shared ones by the vocabulary, a method's own
#: hyperparameter by its field name (``--fat-tau``)
FIELD_DESTS = {"eps": "eps_max", "delta": "delta", "steps": "k", "search_steps": "n", "norm": "norm",
               **{name: name for name in method_params()}}


PROG = "python -m nnunet_ima.classify"


class ArgError(UsageError):
    """A bad command-line value; the message is the one line the user sees."""


def flag(dest: str) -> str:
    """The flag of an argument: the shared vocabulary's spelling, else ``--dest-with-dashes``."""
    try:
        return spelling(dest)
    except KeyError:
        return "--" + dest.replace("_", "-")


#: MethodConfig field -> command-line flag (to name the argument in a MethodConfig error).
FIELD_FLAGS = {field: flag(dest) for field, dest in FIELD_DESTS.items()}


def bad(dest_or_flag: str, value, expected: str) -> ArgError:
    name = dest_or_flag if dest_or_flag.startswith("-") else flag(dest_or_flag)
    return ArgError(str(usage_error(name, value, expected)))


def check_numbers(a) -> None:
    for dest, (ok, expected) in NUMBER_RULES.items():
        v = getattr(a, dest, None)
        if v is not None and not ok(v):
            raise bad(dest, v, expected)


def check_eval_options(a) -> None:
    """--attacks: known names (--eps is parsed by :func:`nnunet_ima.ui.eps_value`: finite, >= 0)."""
    if a.attacks is not None:
        unknown = [s for s in a.attacks if s not in ATTACKS]
        if unknown:
            raise bad("--attacks", " ".join(a.attacks), f"a subset of {' '.join(ATTACKS)}, space-separated "
                      f"(unknown: {', '.join(unknown)})")


def check_checkpoint(arg: str, path: str) -> dict:
    """A checkpoint written by ``train`` (loads with weights_only=True); returns it."""
    p = Path(path)
    if not p.is_file():
        raise bad(arg, path, "an existing checkpoint file (checkpoint.pt written by train/run)")
    try:
        ck = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file is the same user error
        raise bad(arg, path, f"a checkpoint written by train/run (could not load it: {type(err).__name__})") from None
    if not isinstance(ck, dict):
        raise bad(arg, path, "a checkpoint written by train/run (a dict of weights)")
    return ck


def check_paths(a, command: str) -> None:
    """--data-root, --init-from and (eval) the checkpoints exist; 'std' for --init-from only in run."""
    if a.data_root is not None and not Path(a.data_root).exists():
        raise bad("--data-root", a.data_root, "an existing folder with the dataset's files")
    if a.init_from == "std" and command != "run":
        raise bad("--init-from", "std", "a checkpoint.pt ('std' means this run's STD model, only in 'run')")
    if a.init_from and a.init_from != "std":
        check_checkpoint("--init-from", a.init_from)


def check_data_options(a) -> None:
    """--image-size, --test-split, --val-split: only where they mean something."""
    if a.image_size is not None and a.dataset not in ("imagefolder", "covid"):
        raise bad("--image-size", a.image_size, f"no value for --dataset {a.dataset} (only imagefolder and covid "
                  "images are resized)")
    for dest in ("test_split", "val_split"):
        v = getattr(a, dest, None)
        if v is None:
            continue
        if a.dataset != "imagefolder":
            raise bad(dest, v, f"no value for --dataset {a.dataset} (it has a fixed split; only imagefolder is split)")
        if has_train_test(a.data_root):
            raise bad(dest, v, f"no value: {a.data_root} has its own train/ and test/ folders")
    if (a.test_split or 0) + (a.val_split or 0) >= 1:
        raise bad("--test-split", a.test_split, "a fraction that leaves images for training (with --val-split "
                  f"{a.val_split})")
    if a.resume and a.overwrite:
        raise ArgError("--resume and --overwrite: expected one of them (continue the old run, or start again)")


def parse_methods(specs, arg: str = "--methods") -> tuple:
    """['std', 'sat:0.1', 'ima'] -> ('std', 'sat:0.1', 'ima') after checking names and eps values."""
    out, spec = [], " ".join(specs)
    for s in (s.strip() for s in specs):
        name, colon, eps = s.partition(":")
        if name not in METHODS:
            raise bad(arg, spec, f"methods from {' '.join(sorted(METHODS))} (unknown: {name!r})")
        if colon:
            try:
                ok = float(eps) > 0
            except ValueError:
                ok = False
            if not ok:
                raise bad(arg, spec, f"name:eps with eps a number > 0 (got {s!r})")
        if s.replace(":", "") in [o.replace(":", "") for o in out]:
            raise bad(arg, spec, f"each method once ({s!r} twice)")
        out.append(s)
    return tuple(out)


def check_schedule(p, specs: tuple, given_init: str | None, resolved_methods) -> None:
    """Preset-level rules once the command line is merged in: Delta <= eps_max (IMA), warm-up shorter
    than training, --init-from std after std, and every method's settings valid."""
    names = [s.partition(":")[0] for s in specs]
    if "ima" in names and p.delta > p.eps_train:
        raise bad("--delta", f"{p.delta:g}", f"IMA's margin step <= --eps-max ({p.eps_train:g})")
    if any(n != "std" for n in names) and p.std_warmup_epochs >= p.epochs:
        raise bad("--std-warmup-epochs", p.std_warmup_epochs, f"fewer clean epochs than --epochs ({p.epochs})")
    if given_init == "std" and ("std" not in names or names.index("std") > min(
            (i for i, n in enumerate(names) if n != "std"), default=len(names))):
        raise bad("--init-from", "std", "'std' first in --methods (the other methods start from its weights)")
    for make in resolved_methods:
        try:
            make()
        except ValueError as err:
            field = str(err).split()[0]
            raise ArgError(f"{FIELD_FLAGS.get(field, field)}: {err}") from None


def check_eps_scale(preset, splits) -> None:
    """The training bound (--eps-max) and the noise levels (--eps) against the data
    (:func:`nnunet_ima.eps_scale.scale_problems`): a warning where the size per pixel exceeds the images'
    whole range (bounded inputs) or the inputs' standard deviation (unbounded ones, e.g. Moons), an
    :class:`ArgError` where float32 cannot represent the perturbation."""
    numel = int(torch.tensor(splits.in_shape).prod())
    if splits.clip is not None:
        lo, hi = splits.clip
        scale, what = hi - lo, f"the images' whole range [{lo:g}, {hi:g}]"
    else:
        scale, what = float(splits.train.tensors()[0].std()), "the inputs' standard deviation"
    unit = "pixel" if len(splits.in_shape) == 3 else "feature"
    for flag, levels in ((spelling("eps_max"), [preset.eps_train]), (spelling("eps"), preset.eval_eps)):
        warnings, refusals = scale_problems(levels, preset.norm, numel, scale, what, flag, unit)
        if refusals:
            raise ArgError(refusals[0])
        for w in warnings:
            warn(PROG, w)
