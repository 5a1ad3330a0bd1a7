"""One IMA batch step (later paper, Algorithm 1 lines 5-19 for one mini-batch), written once for every
front end: the nnU-Net trainer (:class:`nnunet_ima_trainers.nnUNetTrainerIMA`) and the
classification method (:class:`nnunet_ima.classify.methods.ima.Ima`).

    >>> noisy, update = ima_step(model, x, y, ids, clean_output, predicate, store, settings, loss=loss)
    >>> noisy_output = model(noisy)            # the front end's own noisy forward (it trains on it)
    >>> stats = update.finish(noisy_output)    # lines 13-19: the margin update, with one expand rule

The step: the predicate on the clean output (line 5, g(z) = y); BPGD inside each selected sample's
margin E(i) (Algorithm 2 "boundary" or Algorithm 3 "augment"); the noisy batch, holding the clean
sample in every row that was not attacked or whose attack went non-finite ("fell back", e.g. an fp16
overflow under autocast). :meth:`IMAUpdate.finish` then moves the margins:

* ``expand_rule="prediction"`` (Algorithm 1 line 13, default): E(i) grows when the noisy forward's
  prediction is still correct, g(z~) = y, else shrinks to (||x - x~|| + E(i)) / 2;
* ``expand_rule="no_crossing"``: E(i) grows exactly when BPGD found no crossing (the earlier paper).

Which samples are attacked (``attack_samples``): ``"correct"`` (Algorithm 1: only clean-correct
samples; the others shrink to E(i) / 2) or ``"all"`` (the authors' nnU-Net code: every sample, and
only the noisy sample's correctness moves its margin). Fallen-back samples keep their margin.
Nothing is kept between calls except in the returned update object.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .bpgd import VARIANTS, bpgd
from .losses import LossFn, first
from .margins import MarginStore
from .norms import NORMS
from .validation import batch_index, keep_finite

EXPAND_RULES = ("prediction", "no_crossing")
ATTACK_SAMPLES = ("correct", "all")


@dataclass(frozen=True)
class IMAStepSettings:
    """Settings of one IMA step. ``steps`` = K PGD steps, ``search_steps`` = N binary-search forwards."""

    steps: int = 20
    search_steps: int = 10
    norm: str = "l2"
    variant: str = "augment"           # "boundary" (Algorithm 2) | "augment" (Algorithm 3, with data augmentation)
    expand_rule: str = "prediction"    # "prediction" (Algorithm 1 line 13) | "no_crossing"
    attack_samples: str = "correct"    # "correct" (Algorithm 1) | "all" (authors' nnU-Net code)
    clip: tuple | None = None          # valid input range (min, max); None = unbounded

    def __post_init__(self):
        checks = [("steps", self.steps >= 0, ">= 0"), ("search_steps", self.search_steps >= 0, ">= 0"),
                  ("norm", self.norm in NORMS, f"one of {tuple(NORMS)}"),
                  ("variant", self.variant in VARIANTS, f"one of {VARIANTS}"),
                  ("expand_rule", self.expand_rule in EXPAND_RULES, f"one of {EXPAND_RULES}"),
                  ("attack_samples", self.attack_samples in ATTACK_SAMPLES, f"one of {ATTACK_SAMPLES}")]
        for name, ok, want in checks:
            if not ok:
                raise ValueError(f"IMA step: {name} must be {want}, got {getattr(self, name)!r}")


@dataclass
class IMAStepStats:
    """Counts of one step (or, summed with ``+``, of an epoch). ``attacked``: samples attacked with a
    finite result; ``crossed``: of those, the ones BPGD found the boundary for; ``fell_back``: samples
    whose attack went non-finite and that train on the clean sample (margin not updated);
    ``clean_correct``: samples whose clean prediction was correct (g(z) = y)."""

    samples: int = 0
    attacked: int = 0
    crossed: int = 0
    fell_back: int = 0
    clean_correct: int = 0

    def __add__(self, other: "IMAStepStats") -> "IMAStepStats":
        return IMAStepStats(**{k: v + getattr(other, k) for k, v in asdict(self).items()})

    def fell_back_share(self) -> float:
        """Share of the attempted attacks that fell back (0 when none was attempted)."""
        tried = self.attacked + self.fell_back
        return self.fell_back / tried if tried else 0.0


class IMAUpdate:
    """The margin update of one step, applied once by :meth:`finish` after the noisy forward.

    ``rows``: (A,) long, the batch rows that were attacked (on the batch's device); the noisy output
    given to :meth:`finish` covers either the whole batch (B, ...) or exactly these rows (A, ...).
    """

    def __init__(self, store: MarginStore, ids: list, predicate, settings: IMAStepSettings, clean_correct, rows,
                 y_rows, crossed, distance, finite):
        self.store, self.ids, self.predicate, self.settings = store, ids, predicate, settings
        self.clean_correct, self.rows, self.y_rows = clean_correct, rows, y_rows
        self.rows_cpu = rows.cpu()  # once: indexing the CPU bookkeeping must not sync the device each time
        self.crossed, self.distance, self.finite = crossed, distance, finite  # (B,) on the CPU
        self.done = False

    def finish(self, noisy_output=None) -> IMAStepStats:
        """Apply Algorithm 1's margin update; return this step's counts. ``noisy_output``: logits of
        the noisy forward (or a deep-supervision list), needed by ``expand_rule="prediction"`` when
        some sample was attacked; ignored otherwise."""
        if self.done:
            raise RuntimeError("IMA step: finish() was already called for this batch")
        self.done = True
        b, rows = len(self.ids), self.rows_cpu
        noisy_correct = torch.zeros(b, dtype=torch.bool)
        if rows.numel():
            noisy_correct[rows] = self._noisy_correct(noisy_output)
        attempted = torch.zeros(b, dtype=torch.bool)
        attempted[rows] = True
        # "all": every sample was attacked, and only the noisy sample's correctness moves its margin
        clean = self.clean_correct if self.settings.attack_samples == "correct" else torch.ones(b, dtype=torch.bool)
        self.store.update(self.ids, clean, noisy_correct, self.distance, self.finite)
        return IMAStepStats(samples=b, attacked=int((attempted & self.finite).sum()),
                            crossed=int((self.crossed & self.finite).sum()),
                            fell_back=int((attempted & ~self.finite).sum()),
                            clean_correct=int(self.clean_correct.sum()))

    def _noisy_correct(self, noisy_output) -> torch.Tensor:
        """g(z~) = y of the attacked rows (A,) on the CPU, by the settings' expand rule."""
        if self.settings.expand_rule == "no_crossing":
            return ~self.crossed[self.rows_cpu]
        if noisy_output is None:
            raise ValueError("IMA step: expand_rule 'prediction' reads g(z~) = y off the noisy forward; "
                             "pass its output to finish()")
        out = first(noisy_output)
        n, b = out.shape[0], len(self.ids)
        if n == b:
            out = out[self.rows.to(out.device)]
        elif n != self.rows.numel():
            raise ValueError(f"IMA step: noisy output has {n} rows; expected the batch ({b}) or the attacked rows "
                             f"({self.rows.numel()})")
        return self.predicate(out.detach(), self.y_rows).cpu().bool()


def ima_step(model, x: torch.Tensor, y, ids, clean_output, predicate, store: MarginStore,
             settings: IMAStepSettings, *, loss: str | LossFn = "ce") -> tuple[torch.Tensor | None, IMAUpdate]:
    """Attack the selected samples of one batch inside their margins (Algorithm 1 lines 5-12).

    Shapes: ``x`` (B, C, *S); ``y`` what ``loss`` takes (labels (B,) or (B, *S), or a deep-supervision
    list whose element 0 the predicate reads); ``ids`` B sample ids; ``clean_output`` the detached
    clean logits (B, K, ...) or a list; ``predicate(output, y) -> bool (B,)``. Returns the noisy
    batch (B, C, *S), with clean rows where no attack was made or it fell back, or None when no
    sample was attacked, and the :class:`IMAUpdate` to finish after the noisy forward.
    """
    ids = list(ids)
    b = x.shape[0]
    if len(ids) != b:
        raise ValueError(f"ids: expected {b} sample ids, got {len(ids)}")
    eps = store.get(ids, device=x.device)  # registers every id of the batch, in batch order
    y_full = first(y)
    clean_correct = predicate(first(clean_output).detach(), y_full).cpu().bool().reshape(-1)
    select = clean_correct if settings.attack_samples == "correct" else torch.ones(b, dtype=torch.bool)
    rows_cpu = torch.nonzero(select).flatten()
    rows = rows_cpu.to(x.device)
    y_rows = batch_index(y, rows)  # the attacked rows' targets, sliced once (BPGD and the margin update)
    crossed = torch.zeros(b, dtype=torch.bool)
    distance = torch.zeros(b, dtype=torch.float64)
    finite = torch.ones(b, dtype=torch.bool)
    noisy = None
    if rows.numel():
        noisy, crossed[rows_cpu], distance[rows_cpu], finite[rows_cpu] = _attack(
            model, x, y_rows, eps, rows, predicate, settings, loss)
    update = IMAUpdate(store, ids, predicate, settings, clean_correct, rows, first(y_rows), crossed, distance, finite)
    return noisy, update


def _attack(model, x, y_rows, eps, rows, predicate, settings: IMAStepSettings, loss):
    """BPGD on ``rows`` (``y_rows``: their targets); returns (noisy batch (B, ...), crossed, distance, finite),
    the last three (A,) on the CPU. Rows whose result is non-finite get the clean sample back (finite False)."""
    res = bpgd(model, x[rows], y_rows, eps[rows], norm=settings.norm, steps=settings.steps,
               search_steps=settings.search_steps, variant=settings.variant, is_correct=predicate, loss=loss,
               clip=settings.clip)
    x_adv, finite = keep_finite(res.x_adv.detach(), x[rows], res.valid & torch.isfinite(res.distance))
    noisy = x.detach().clone()
    noisy[rows] = x_adv.to(x.dtype)
    return noisy, res.crossed.cpu(), res.distance.detach().double().cpu(), finite.cpu()
