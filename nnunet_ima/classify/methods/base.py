"""The shared seam of every training method: ``loss(model, x, y, ids) -> StepOutput``.

The trainer owns the optimisation step (zero_grad, backward, gradient all-reduce, optimiser step);
a method only says how to build its loss from a batch, and keeps its own state (IMA's margins).
Hyperparameters live in :class:`MethodConfig`, one field each, validated once; a method's own
hyperparameter is a :func:`method_param` field (its flag, check and help come with it).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Callable

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Param:
    """What makes a :class:`MethodConfig` field a method's own hyperparameter: the rule a value must
    follow (``valid``, described by ``expected``) and the command-line help. The command line offers
    it as ``--<field-name-with-dashes>`` (``classify.cli``), checked by ``classify.checks``."""

    valid: Callable[[object], bool]
    expected: str
    help: str
    type: type = float
    choices: tuple | None = None


def method_param(default, valid, expected: str, help: str, type=float, choices=None):
    """A :class:`MethodConfig` field that is a method's own hyperparameter (see :class:`Param`)."""
    return field(default=default, metadata={"param": Param(valid, expected, help, type, choices)})


@dataclass
class MethodConfig:
    """Every hyperparameter of every method. The shared ones (eps, norm, K, N, delta) have the shared
    vocabulary's flags; a method's own ones are :func:`method_param` fields, whose flag, check and help
    come with the field: a new one is one field here."""

    eps: float = 0.3                # training bound: IMA eps_max, SAT/TRADES/FAT/rand eps, MMA d_max
    norm: str = "l2"                # "l2" | "linf"
    steps: int = 20                 # K: PGD iterations of every method's inner attack (papers: 20)
    search_steps: int = 10          # N: binary-search steps (IMA, MMA)
    delta: float = 0.01             # IMA margin expansion step
    clip: tuple | None = None       # valid input range, e.g. (0, 1); None = unbounded
    augment: bool = False           # data augmentation on -> IMA uses Algorithm 3
    ima_loss: str = method_param("mean", lambda v: v in ("mean", "beta"), "'mean' or 'beta'",
                                 "IMA's loss: the later paper's (L0+L1)/2 or the earlier paper's beta loss",
                                 str, ("mean", "beta"))
    ima_beta: float = method_param(0.5, lambda v: 0 <= v <= 1, "a number in [0, 1]",
                                   "beta of the earlier paper's IMA loss (with --ima-loss beta)")
    ima_rule: str = method_param("later", lambda v: v in ("later", "earlier"), "'later' or 'earlier'",
                                 "IMA's margin rule set: later (expand on a correct prediction, shrink by averaging) "
                                 "or earlier (expand without crossing; re-initialise, replace, clip at delta)",
                                 str, ("later", "earlier"))
    trades_beta: float = method_param(6.0, lambda v: v >= 0, "a number >= 0",
                                      "TRADES regularisation weight (Zhang et al. 2019: 6)")
    fat_tau: int | None = method_param(None, lambda v: v is None or v >= 0, "an integer >= 0",
                                       "FAT's early-stop tau (default: FAT's dynamic schedule 0 -> 1 -> 2)", int)
    mma_clean_weight: float = method_param(1 / 3, lambda v: 0 <= v <= 1, "a number in [0, 1]",
                                           "MMA: weight of the clean CE term (Ding et al.: 1/3)")

    def __post_init__(self):
        checks = [("eps", self.eps > 0, "> 0"), ("norm", self.norm in ("l2", "linf"), "'l2' or 'linf'"),
                  ("steps", self.steps >= 1, ">= 1"), ("search_steps", self.search_steps >= 0, ">= 0"),
                  ("delta", self.delta > 0, "> 0")]  # IMA's MarginStore also checks delta <= eps
        checks += [(name, p.valid(getattr(self, name)), p.expected) for name, p in method_params().items()]
        for name, ok, want in checks:
            if not ok:
                raise ValueError(f"{name} must be {want}, got {getattr(self, name)!r}")


def method_params() -> dict[str, Param]:
    """{field name: Param} of every method's own hyperparameter, in field order."""
    return {f.name: f.metadata["param"] for f in fields(MethodConfig) if "param" in f.metadata}


@dataclass
class StepOutput:
    loss: torch.Tensor              # scalar to back-propagate
    logits: torch.Tensor            # clean logits (B, C), for training accuracy
    x_adv: torch.Tensor | None = None  # the training perturbation the loss used (None for STD)
    info: dict = field(default_factory=dict)


def ce(logits, y):
    """Per-sample cross-entropy (B,)."""
    return F.cross_entropy(logits, y, reduction="none")


def mode_dependent(model: torch.nn.Module) -> bool:
    """Whether ``model`` predicts differently in train and eval mode: it holds a norm layer with running
    statistics (BatchNorm, InstanceNorm with ``track_running_stats``) or a dropout with p > 0.
    InstanceNorm/LayerNorm/GroupNorm models without running statistics predict the same in both."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._NormBase) and m.track_running_stats:
            return True
        if isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0:
            return True
    return False


def eval_forward(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's eval-mode output for ``x`` (running statistics, no dropout), without a graph; the
    model's mode is restored."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model(x)
    finally:
        model.train(was)


class Method:
    """Base class. Subclasses set ``name`` and implement :meth:`loss`; ``settings``: the
    :class:`MethodConfig` fields its training reads (a resumed run compares them, see ``classify.resume``)."""

    name = ""
    uses_margins = False
    settings: tuple = tuple(f for f in MethodConfig.__dataclass_fields__ if f != "clip")  # clip: from the data

    def __init__(self, cfg: MethodConfig):
        self.cfg = cfg

    def loss(self, model, x, y, ids) -> StepOutput:
        raise NotImplementedError

    def start_epoch(self, epoch: int, epochs: int) -> None:
        """Called before each epoch (FAT's tau schedule, counters)."""

    def end_epoch(self) -> None:
        """Called after each epoch on every rank (IMA merges its margins here)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def summary(self) -> str:
        return ""

    def __repr__(self):
        return f"{type(self).__name__}(eps={self.cfg.eps}, norm={self.cfg.norm!r})"
