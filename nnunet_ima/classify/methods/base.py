"""The shared seam of every training method: ``loss(model, x, y, ids) -> StepOutput``.

The trainer owns the optimisation step (zero_grad, backward, gradient all-reduce, optimiser step);
a method only says how to build its loss from a batch, and keeps its own state (IMA's margins).
Hyperparameters live in :class:`MethodConfig`, one field each, validated once.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class MethodConfig:
    eps: float = 0.3                # training bound: IMA eps_max, SAT/TRADES/FAT/rand eps, MMA d_max
    norm: str = "l2"                # "l2" | "linf"
    steps: int = 20                 # K: PGD iterations of every method's inner attack (papers: 20)
    search_steps: int = 10          # N: binary-search steps (IMA, MMA)
    delta: float = 0.01             # IMA margin expansion step
    clip: tuple | None = None       # valid input range, e.g. (0, 1); None = unbounded
    augment: bool = False           # data augmentation on -> IMA uses Algorithm 3
    ima_loss: str = "mean"          # "mean": later paper (L0+L1)/2; "beta": earlier paper's beta loss
    ima_beta: float = 0.5           # beta of the earlier paper's loss
    ima_rule: str = "later"         # margin rule set: "later" (IMA step expand_rule "prediction", shrink by
    #                                 averaging) | "earlier" (expand_rule "no_crossing", reinit/replace/clip at delta)
    trades_beta: float = 6.0        # TRADES regularisation weight (Zhang et al. 2019 default)
    fat_tau: int | None = None      # FAT early-stop tau; None = FAT's dynamic schedule (0 -> 1 -> 2)
    mma_clean_weight: float = 1 / 3  # MMA: weight of the clean CE term (Ding et al.: 1/3 clean, 2/3 MMA)

    def __post_init__(self):
        checks = [("eps", self.eps > 0, "> 0"), ("norm", self.norm in ("l2", "linf"), "'l2' or 'linf'"),
                  ("steps", self.steps >= 1, ">= 1"), ("search_steps", self.search_steps >= 0, ">= 0"),
                  ("delta", self.delta > 0, "> 0"),  # IMA's MarginStore also checks delta <= eps
                  ("ima_loss", self.ima_loss in ("mean", "beta"), "'mean' or 'beta'"),
                  ("ima_beta", 0 <= self.ima_beta <= 1, "in [0, 1]"),
                  ("ima_rule", self.ima_rule in ("later", "earlier"), "'later' or 'earlier'"),
                  ("trades_beta", self.trades_beta >= 0, ">= 0"),
                  ("fat_tau", self.fat_tau is None or self.fat_tau >= 0, ">= 0 or None"),
                  ("mma_clean_weight", 0 <= self.mma_clean_weight <= 1, "in [0, 1]")]
        for name, ok, want in checks:
            if not ok:
                raise ValueError(f"{name} must be {want}, got {getattr(self, name)!r}")


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
