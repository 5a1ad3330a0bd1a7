"""One spelling per concept in every command line of the project (README, "One vocabulary").

:data:`VOCABULARY` maps an argparse ``dest`` to its :class:`Term`: the flags every command spells it
with, how its value is parsed (one rule for all commands), and per command the old spellings that
still work as hidden aliases printing one deprecation line. A command declares a shared option with
:func:`add_option`, so it cannot drift from the table; ``tests/test_cli_vocabulary.py`` holds every
command against it.

>>> add_option(group, "classify", "k", help="K, PGD steps of the training attacks (20)")
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .args import DeprecatedAlias, SpaceList, eps_value


@dataclass(frozen=True)
class Term:
    concept: str                     # what it is, in words (README's table)
    flags: tuple                     # its spelling in every command; the last one is the long form
    parse: dict = field(default_factory=dict)   # argparse settings shared by every command (type, action...)
    old: dict = field(default_factory=dict)     # command -> old spellings (hidden, one deprecation line)

    @property
    def flag(self) -> str:
        """The long form, e.g. ``--output``."""
        return self.flags[-1]


_INT, _FLOAT, _SWITCH = {"type": int}, {"type": float}, {"action": "store_true"}

#: argparse dest -> Term. Commands (keys of ``old``): "classify" (python -m nnunet_ima.classify run/train/eval),
#: "attack" (nnunet-ima-attack), "demo" (nnunet-ima demo). An old spelling listed under several terms of one
#: command (the attack command's ``--steps``) sets all of them.
VOCABULARY: dict[str, Term] = {
    "k": Term("K, PGD steps of BPGD, SAT and the other training attacks", ("--k",), _INT,
              {"classify": ("--steps",)}),
    "n": Term("N, binary-search steps of BPGD", ("--n",), _INT, {"classify": ("--search-steps",)}),
    "eps_max": Term("eps_max, the training bound", ("--eps-max",), _FLOAT, {"classify": ("--eps-train",)}),
    "delta": Term("Delta, IMA's margin expansion step", ("--delta",), _FLOAT),
    "sat_eps": Term("SAT's fixed eps", ("--sat-eps",), _FLOAT),
    "eps": Term("evaluation noise levels (0 = the clean row)", ("--eps",),
                {"action": SpaceList, "item": eps_value, "metavar": "E"}),
    "attacks": Term("attacks to evaluate", ("--attacks",), {"action": SpaceList, "metavar": "NAME"}),
    "methods": Term("methods to compare", ("--methods",), {"action": SpaceList, "metavar": "METHOD"}),
    "pgd_steps": Term("PGD steps of the evaluation", ("--pgd-steps",), _INT,
                      {"classify": ("--steps-pgd",), "attack": ("--steps-pgd",)}),
    "ifgsm_steps": Term("IFGSM steps of the evaluation", ("--ifgsm-steps",), _INT, {"attack": ("--steps-ifgsm",)}),
    "segpgd_steps": Term("SegPGD steps of the evaluation", ("--segpgd-steps",), _INT, {"attack": ("--steps",)}),
    "cospgd_steps": Term("CosPGD steps of the evaluation", ("--cospgd-steps",), _INT, {"attack": ("--steps",)}),
    "apgd_steps": Term("APGD steps of the evaluation (every apgd attack)", ("--apgd-steps",), _INT),
    "output": Term("output folder", ("-o", "--output"), {"metavar": "DIR"},
                   {"classify": ("--out",), "demo": ("--workdir",)}),
    "quiet": Term("no progress bars", ("--quiet",), _SWITCH, {"classify": ("--no-progress",)}),
    "device": Term("device: cpu, cuda or cuda:N (default: cuda if available, else cpu)", ("--device",)),
    "num_gpus": Term("GPUs to run on, one process each (nnU-Net's -num_gpus)", ("--num-gpus",), _INT),
    "seed": Term("seed", ("--seed",), _INT),
    "overwrite": Term("redo everything in the output folder", ("--overwrite",), _SWITCH),
    "batch_size": Term("batch size", ("--batch-size",), _INT),
    "norm": Term("norm of the perturbations", ("--norm",), {"choices": ("l2", "linf")}),
    "scope": Term("what is attacked and scored: sample (each 2d slice / 3d patch tile on its own), case (whole "
                  "cases through nnU-Net's sliding-window predictor, scored as deployed)", ("--scope",),
                  {"action": SpaceList, "metavar": "SCOPE"}),
}


def spelling(dest: str) -> str:
    """The long flag of a shared concept: ``spelling("eps_max") == "--eps-max"``."""
    return VOCABULARY[dest].flag


def add_option(container, command: str, dest: str, **kwargs):
    """Add the shared option ``dest`` to an argparse parser or group with the table's flags and parsing
    (``kwargs``: help, default, ...), and ``command``'s old spellings as hidden deprecated aliases.
    Returns the option's action."""
    term = VOCABULARY[dest]
    action = container.add_argument(*term.flags, dest=dest, **{**term.parse, **kwargs})
    for old in term.old.get(command, ()):
        alias = container._option_string_actions.get(old)  # the same old spelling of another term: one alias
        if isinstance(alias, DeprecatedAlias):
            alias.targets.append(action)
        else:
            container.add_argument(old, action=DeprecatedAlias, target=action)
    return action
