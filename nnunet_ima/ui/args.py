"""argparse pieces every command line of the project shares: a parser whose errors are one line,
space-separated lists (the old comma form still works, with one deprecation line), noise levels,
hidden old spellings, and the one device rule.

>>> p = OneLineParser(prog="demo")
>>> p.add_argument("--eps", action=SpaceList, item=eps_value)
>>> p.parse_args(["--eps", "0", "2", "5"]).eps
[0.0, 2.0, 5.0]
"""
from __future__ import annotations

import argparse
import math
import re

from nnunet_ima.eps_scale import MAX_EPS

from .errors import report_error, usage_error, warn

DEVICES = "cpu, cuda or cuda:N"


class OneLineParser(argparse.ArgumentParser):
    """argparse without the usage block on errors: ``prog: error: argument --k: ... (see prog --help)``,
    exit code 2 (through :func:`~nnunet_ima.ui.errors.report_error`, like every other usage error)."""

    def error(self, message: str):
        raise SystemExit(report_error(self.prog, f"{message} (see {self.prog} --help)"))


def eps_value(text: str) -> float:
    """One noise level: a finite number >= 0 (0 = the clean row) that float32 can hold (< ``MAX_EPS``)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"expected noise levels that are finite and >= 0, got {text}")
    if value >= MAX_EPS:
        raise argparse.ArgumentTypeError(f"{text}: a perturbation that large cannot be represented in float32 "
                                         f"(its squared norm overflows); expected eps < {MAX_EPS:.3g}")
    return value


class SpaceList(argparse.Action):
    """One or more values, space-separated (``--attacks pgd ifgsm``), each converted by ``item``. The
    old comma form (``--attacks pgd,ifgsm``) still works and prints one deprecation line."""

    def __init__(self, option_strings, dest, item=str, nargs="+", **kwargs):
        super().__init__(option_strings, dest, nargs=nargs, **kwargs)
        self.item = item

    def __call__(self, parser, namespace, values, option_string=None):
        tokens = values if isinstance(values, list) else [values]
        parts = [p.strip() for t in tokens for p in t.split(",") if p.strip()]
        if any("," in t for t in tokens):
            warn(parser.prog, f"{option_string} {' '.join(tokens)}: comma-separated values are deprecated; "
                              f"write {option_string} {' '.join(parts)}")
        if not parts:
            raise argparse.ArgumentError(self, "expected at least one value")
        try:
            items = [self.item(p) for p in parts]
        except (ValueError, argparse.ArgumentTypeError) as err:
            raise argparse.ArgumentError(self, str(err)) from None
        setattr(namespace, self.dest, items)


class DeprecatedAlias(argparse.Action):
    """A hidden old spelling of ``target`` (an option of the same parser): prints one deprecation line
    naming the new spelling, then does exactly what ``target`` does. An old spelling that stood for
    several of today's options (``--steps`` = ``--segpgd-steps`` and ``--cospgd-steps``) has them all in
    ``targets`` (:func:`~nnunet_ima.ui.vocabulary.add_option` appends them) and sets each."""

    def __init__(self, option_strings, dest, target: argparse.Action = None, **_):
        super().__init__(option_strings, target.dest, nargs=target.nargs, const=target.const, type=target.type,
                         choices=target.choices, default=argparse.SUPPRESS, help=argparse.SUPPRESS,
                         metavar=target.metavar)
        self.targets, self.said = [target], False

    def __call__(self, parser, namespace, values, option_string=None):
        news = [t.option_strings[-1] for t in self.targets]
        if not self.said:
            warn(parser.prog, f"{option_string} is deprecated; use {' and '.join(news)}")
            self.said = True
        for target, new in zip(self.targets, news):
            target(parser, namespace, values, new)


def default_device() -> str:
    """The one default rule: cuda if PyTorch sees a GPU, else cpu."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(value: str) -> str:
    """``--device``: cpu, cuda or cuda:N with N below the number of GPUs; returns the value unchanged,
    else raises :class:`~nnunet_ima.ui.errors.UsageError` naming what is expected."""
    import torch

    m = re.fullmatch(r"cpu|cuda(?::(\d+))?", str(value))
    if m is None:
        raise usage_error("--device", value, DEVICES)
    if value != "cpu":
        if not torch.cuda.is_available():
            raise usage_error("--device", value, "a device this machine has: no CUDA GPU is available here "
                                                 "(use --device cpu)")
        count = torch.cuda.device_count()
        if m.group(1) is not None and int(m.group(1)) >= count:
            raise usage_error("--device", value, f"a GPU index below {count} (the GPUs PyTorch sees here)")
    return value


def resolve_device(value: str | None) -> str:
    """``--device`` after parsing: the default rule where it was not given, then :func:`check_device`."""
    return check_device(default_device() if value is None else value)
