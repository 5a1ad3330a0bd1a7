"""Attack every sample of every test case and count TP / FP / FN, for each model x attack x eps.

Data and model are loaded once per model; batches are built once and reused by every attack and
noise level. The attacks are the evaluation's registry (:data:`nnunet_ima_eval.attacks.ATTACKS`: PGD
with a random start, IFGSM without, SegPGD, CosPGD, APGD with several objectives, all on the kernel), run in the
network's input space (nnU-Net's z-scored, preprocessed images: eps is the L2 (or Linf) norm of the
perturbation of one whole sample).

Which pixels count is decided once per batch by the kernel's one rule
(:func:`nnunet_ima.losses.scored_labels`: padding and nnU-Net's ignore label become ``NOT_SCORED``):
the attacks' objectives, the Dice an attack keeps its best iterate by, and the TP/FP/FN counts all
read those labels. The perturbation itself stays on the real image (``region`` = the padding mask:
its random start and steps never spend budget on padding, which :class:`MaskedInput` zeroes anyway).
The sanity checks live in :mod:`.sanity`.

Several processes (:mod:`.units`) give the numbers of one: a sample's result never depends on which
process attacks it. Its batch is fixed by the test set alone: consecutive whole cases of one padded
shape are packed until a pack fills :data:`PACK_BATCHES` batches (:func:`pack_cases`; a case is never
split), and batches never cross packs, so every process batches a sample with the same others (the
network's float arithmetic, hence an iterative attack's path, depends on the batch). Each sample's
random start comes from its own generator, seeded from (seed, attack, eps, case, position)
(:func:`sample_seed`).
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from itertools import groupby

import numpy as np
import torch
from tqdm import tqdm

from nnunet_ima.losses import first, scored_labels, valid_pixels
from nnunet_ima.norms import get_norm
from nnunet_ima.predicates import tp_fp_fn
from nnunet_ima.rng import SampleGenerators

from .attacks import ATTACKS
from .data import Batch, Case, SampleRef, make_batches, padded_shape, sample_refs
from .metrics import DEFAULT_ADI, Counts, sample_dice_of, summarize
from .model import LoadedModel, attack_loss

CLEAN = "clean"
WORST = "worst"  # not an attack: per sample, the lowest Dice over clean and the attacks run at that eps
PAPER_ATTACKS = ("pgd", "ifgsm")
# Croce, Singh & Hein (ECCV 2024) style ensemble: APGD on three objectives, SegPGD, CosPGD; PGD kept
# so the paper's figure stands beside the strong one; "worst" takes each sample at its lowest Dice.
STRONG_APGD_STEPS = 300  # --suite strong: the masked losses need many iterations (SEA runs APGD for hundreds)
SUITES = {"paper": [*PAPER_ATTACKS], "strong": ["pgd", "segpgd", "cospgd", "apgd-mce", "apgd-bmce", "apgd-js", WORST]}
ITERATES = ("final", "best")  # --iterate: the point of a PGD-type attack a sample is counted at
PACK_BATCHES = 4  # a pack of whole cases is closed once it holds this many batches (fewer part-filled batches)


@dataclass
class AttackSettings:
    """How samples are attacked. Defaults are the papers': L2, PGD-100 (random start), IFGSM-10,
    the model's own Dice+CE loss, each attack's final point."""

    norm: str = "l2"          # "l2" or "linf"
    loss: str = "dicece"      # "dicece" (the trainer's DC_and_CE_loss, per sample) or "ce"
    pgd_steps: int = 100      # PGD iterations (random start in the eps-ball)
    ifgsm_steps: int = 10     # IFGSM iterations (no random start)
    segpgd_steps: int = 100   # SegPGD iterations
    cospgd_steps: int = 100   # CosPGD iterations
    apgd_steps: int = 100     # iterations of APGD (apgd, apgd-mce, apgd-bmce, apgd-js)
    batch_size: int = 32      # samples per forward/backward
    seed: int = 0             # seeds random starts (one generator per sample: :func:`sample_seed`)
    convention: str = DEFAULT_ADI  # ADI convention of the figures, the sanity checks and the best iterate
    iterate: str = "final"    # "final" (the papers') or "best": PGD-type attacks keep per sample their lowest-Dice iterate

    def steps(self, attack: str) -> int:
        """Iterations of ``attack``: the settings field its registry entry names (0 for clean and worst)."""
        return 0 if attack in (CLEAN, WORST) else getattr(self, ATTACKS[attack].steps)

    def keeps_best(self, attack: str) -> bool:
        """Whether ``attack`` returns per sample its lowest-Dice iterate (APGD always does, as SEA's)."""
        return (attack in ATTACKS and ATTACKS[attack].keeps_best) or (self.iterate == "best" and attack not in (CLEAN, WORST))

    def iterate_of(self, attack: str) -> str:
        """What a stored result of ``attack`` depends on besides its settings: "final", or "best-<convention>"
        (the lowest Dice is the convention's, so another ``--adi`` is another point)."""
        return f"best-{self.convention}" if self.keeps_best(attack) else "final"


def pack_cases(refs: list[SampleRef], dim: int, pool_factor: tuple, patch_size: tuple,
               batch_size: int) -> list[list[SampleRef]]:
    """The samples ``refs`` (case after case) in packs of consecutive whole cases of one padded shape
    (shapes in order of appearance, cases in order within a shape, as :func:`~.data.make_batches` groups
    them), each closed once it holds ``PACK_BATCHES * batch_size`` samples: the atoms of the work and of
    the batching, fixed by the test set and the batch size alone.

    >>> [len(p) for p in pack_cases(refs_of_five_cases_of_20_slices, 2, (8, 8), (64, 64), 16)]
    [80, 20]
    """
    by_shape: dict[tuple, list] = {}
    for _, rs in groupby(refs, key=lambda r: r.case):
        rs = list(rs)
        by_shape.setdefault(padded_shape(rs[0], dim, pool_factor, patch_size), []).append(rs)
    packs = []
    for shape_cases in by_shape.values():
        current: list = []
        for rs in shape_cases:
            current += rs
            if len(current) >= PACK_BATCHES * batch_size:
                packs.append(current)
                current = []
        if current:
            packs.append(current)
    return packs


def sample_seed(seed: int, attack: str, eps: float, case: str, start: tuple) -> int:
    """The seed of one sample's random start (a 63-bit int) from the run's ``seed``, the attack, the
    noise level and the sample's identity (case id, start of its slice / tile): the same whatever the
    batch, the batch size or the number of processes.

    >>> sample_seed(0, "pgd", 2.0, "case_007", (3, 0, 0)) == sample_seed(0, "pgd", 2.0, "case_007", (3, 0, 0))
    True
    """
    text = json.dumps([int(seed), str(attack), float(eps), str(case), [int(v) for v in start]])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


class MaskedInput(torch.nn.Module):
    """The network seen by the attack: padding pixels are zeroed before the network, so they get no
    gradient and cannot carry adversarial signal (their value equals nnU-Net's zero padding)."""

    def __init__(self, network: torch.nn.Module):
        super().__init__()
        self.network = network
        self.mask: torch.Tensor | None = None

    def forward(self, x):
        return self.network(x if self.mask is None else x * self.mask)


@dataclass
class Example:
    """One sample kept for --save-examples: image, adversarial image, label, predictions (numpy)."""

    ref: SampleRef
    case: str
    image: np.ndarray
    adversarial: np.ndarray
    label: np.ndarray
    pred: np.ndarray
    pred_clean: np.ndarray | None = None


@dataclass
class Evaluation:
    """Counts of one (model, attack, eps) run, its figures (in ``convention``), timing, kept examples,
    and per sample the perturbation's norm on the whole input (``distance``) and on padding (``on_pad``)."""

    attack: str
    eps: float
    counts: Counts
    seconds: float
    examples: list = field(default_factory=list)
    convention: str = DEFAULT_ADI
    distance: np.ndarray = field(default_factory=lambda: np.zeros(0))
    on_pad: np.ndarray = field(default_factory=lambda: np.zeros(0))

    @property
    def summary(self) -> dict:
        return summarize(self.counts, self.convention)


class Evaluator:
    """Evaluate one loaded model on fixed cases.

    >>> ev = Evaluator(model, cases, AttackSettings(pgd_steps=10))
    >>> clean = ev.run("clean", 0.0)
    >>> adv = ev.run("pgd", 2.0)
    >>> adv.summary["adi"]["mean"]

    ``packs``: pack id -> the batches of a pack of whole cases (:func:`pack_cases`; the atoms several
    processes share); ``pack_cases``: pack id -> its case ids; ``batches``: all of them, pack after pack,
    and ``refs`` their samples in that order (the evaluation's order). Default: every slice / tile of
    ``cases`` (the first ``max_samples`` of them), packed; a rank's share: ``packs`` {id: its samples}.
    """

    def __init__(self, model: LoadedModel, cases: list[Case], settings: AttackSettings,
                 max_samples: int | None = None, progress: bool = True, packs: dict | None = None):
        self.model = model
        self.cases = cases
        self.settings = settings
        self.progress = progress
        self.dim = len(model.patch_size)
        if packs is None:
            refs = sample_refs(cases, self.dim, model.patch_size, max_samples)
            packs = dict(enumerate(pack_cases(refs, self.dim, model.pool_factor, model.patch_size,
                                              settings.batch_size)))
        self.packs = {i: make_batches(cases, p, self.dim, model.pool_factor, model.patch_size, settings.batch_size)
                      for i, p in packs.items()}
        self.pack_cases = {i: list(dict.fromkeys(cases[r.case].name for r in p)) for i, p in packs.items()}
        self.batches = [b for i in sorted(self.packs) for b in self.packs[i]]
        self.refs = [r for b in self.batches for r in b.refs]
        self.attacked = MaskedInput(model.network).eval()
        self.loss = attack_loss(model, settings.loss)
        self.ignore_label = model.label_manager.ignore_label
        self.registry = {name: a.run for name, a in ATTACKS.items()}

    def labels(self, b: Batch) -> torch.Tensor:
        """The batch's labels (B, 1, *S) with padding and the ignore label marked ``NOT_SCORED``: what the
        attacks, their Dice and the counts read (the kernel's one rule)."""
        return scored_labels(b.y, ignore_label=self.ignore_label, pad=b.pad)

    def counts(self, pred: torch.Tensor, y: torch.Tensor):
        """Foreground (tp, fp, fn) numpy (B, K) of a prediction (B, *S) against scored labels (B, 1, *S)."""
        keep = valid_pixels(y[:, 0])
        gt = torch.where(keep, y[:, 0], torch.zeros_like(y[:, 0]))
        tp, fp, fn = tp_fp_fn(pred, gt, self.model.num_classes, ~keep)
        return tp[:, 1:].cpu().numpy(), fp[:, 1:].cpu().numpy(), fn[:, 1:].cpu().numpy()

    def dice(self, output, y) -> torch.Tensor:
        """Per-sample Dice (B,) of an output against scored labels, as the figures count it (this run's
        ADI convention): the score the attacks that keep their best iterate minimise."""
        pred = first(output)
        d = sample_dice_of(Counts(*self.counts(pred.argmax(1), y)), self.settings.convention)
        return torch.as_tensor(d, device=pred.device)

    def attack(self, attack: str, b: Batch, y: torch.Tensor, eps: float, steps: int, gen) -> torch.Tensor:
        """One registry attack on one batch (scored labels ``y``), through its steps (also at eps 0)."""
        if attack not in self.registry:
            raise ValueError(f"unknown attack {attack!r}; known: {', '.join(self.registry)}")
        s = self.settings
        return self.registry[attack](self.attacked, b.x, y, eps, norm=s.norm, steps=steps, loss=self.loss,
                                     generator=gen, region=b.mask, best=s.keeps_best(attack), score=self.dice)

    def generators(self, attack: str, eps: float, b: Batch) -> SampleGenerators:
        """One CPU generator per sample of ``b``, seeded by :func:`sample_seed` (random starts that do not
        depend on the batch, its size, the device or the process)."""
        s = self.settings.seed
        return SampleGenerators.seeded([sample_seed(s, attack, eps, self.cases[r.case].name, r.start) for r in b.refs])

    def _attack(self, attack: str, b: Batch, y, eps: float, steps: int | None, gen, custom=None) -> torch.Tensor:
        if custom is not None:
            return custom(b, y, eps, gen)
        if attack == CLEAN or eps == 0:  # the 0-ball holds x alone: every attack returns x, so skip its steps
            return b.x
        return self.attack(attack, b, y, eps, self.settings.steps(attack) if steps is None else steps,
                           self.generators(attack, eps, b))

    def run(self, attack: str, eps: float, *, steps: int | None = None, batches: list[Batch] | None = None,
            keep: set | None = None, custom=None, on_batch=None) -> Evaluation:
        """Attack every batch (or ``batches``) at ``eps``; ``keep``: sample refs to return as examples;
        ``custom(batch, labels, eps, generator) -> x_adv`` replaces the named attack (sanity checks; one
        generator for the run, seeded with the settings' seed; the named attacks draw each sample's random
        start from its own, :meth:`generators`). ``on_batch(batch)``: called after each batch (the caller
        shows the progress then: no bar of this run's own)."""
        dev = self.model.device
        gen = torch.Generator(device=dev).manual_seed(self.settings.seed)
        counts, examples, dist, on_pad = Counts.empty(self.model.num_classes - 1), [], [], []
        norm = get_norm(self.settings.norm)
        t0 = time.perf_counter()
        todo = self.batches if batches is None else batches
        bar = tqdm(todo, desc=f"{self.model.label} {attack} eps={eps:g}", unit="batch", leave=False,
                   disable=not self.progress or on_batch is not None)
        for b in bar:
            b = b.to(dev)
            self.attacked.mask = b.mask
            y = self.labels(b)
            x_adv = self._attack(attack, b, y, eps, steps, gen, custom)
            with torch.no_grad():
                pred = self.attacked(x_adv).argmax(1)
            counts.add(*self.counts(pred, y), [self.cases[r.case].name for r in b.refs])
            d = (x_adv - b.x).detach()
            dist.append(norm.measure(d).cpu().numpy())
            on_pad.append(norm.measure(d * (1 - b.mask)).cpu().numpy())
            if keep:
                examples += self._examples(b, x_adv, pred, keep)
            if on_batch is not None:
                on_batch(b)
        self.attacked.mask = None
        return Evaluation(attack, float(eps), counts, time.perf_counter() - t0, examples, self.settings.convention,
                          np.concatenate(dist) if dist else np.zeros(0), np.concatenate(on_pad) if on_pad else np.zeros(0))

    def _examples(self, b: Batch, x_adv, pred, keep: set) -> list[Example]:
        out = []
        for j, r in enumerate(b.refs):
            if r in keep:
                region = tuple(slice(0, s) for s in r.size)
                out.append(Example(
                    r, self.cases[r.case].name, b.x[(j, slice(None)) + region].cpu().numpy(),
                    x_adv[(j, slice(None)) + region].detach().cpu().numpy(),
                    b.y[(j, 0) + region].cpu().numpy(), pred[(j,) + region].cpu().numpy()))
        return out

    def subset(self, n_samples: int) -> tuple[list[Batch], int]:
        """The first ``n_samples`` samples (of the first batch): the strength checks run on a sample of
        slices, so that 5x the steps cost about one attack of the whole test set, not five."""
        b = self.batches[0]
        k = min(n_samples, len(b.refs))
        return [Batch(b.x[:k], b.y[:k], b.valid[:k], b.pad[:k], b.refs[:k])], k
