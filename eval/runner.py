"""Attack every sample of every test case and count TP / FP / FN, for each model x attack x eps.

Data and model are loaded once per model; batches are built once and reused by every attack and
noise level. The attacks are the kernel's registry (:data:`nnunet_ima.seg_attacks.SEG_ATTACKS`: PGD
with a random start, IFGSM without, SegPGD, CosPGD, APGD with several objectives), run in the
network's input space (nnU-Net's z-scored, preprocessed images: eps is the L2 (or Linf) norm of the
perturbation of one whole sample).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm import tqdm

from nnunet_ima import seg_attacks
from nnunet_ima.losses import first
from nnunet_ima.predicates import tp_fp_fn

from .data import Batch, Case, SampleRef, make_batches, sample_refs
from .metrics import DEFAULT_ADI, Counts, sample_dice, summarize
from .model import LoadedModel, attack_loss

CLEAN = "clean"
CHECK_SAMPLES = 4  # slices (2d) / patches (3d) the attack-strength sanity checks run on
WORST = "worst"  # not an attack: per sample, the lowest Dice over the attacks run at that eps
PAPER_ATTACKS = ("pgd", "ifgsm")
# Croce, Singh & Hein (ECCV 2024) style ensemble: APGD on three objectives, SegPGD, CosPGD; PGD kept
# so the paper's figure stands beside the strong one; "worst" takes each sample at its lowest Dice.
STRONG_APGD_STEPS = 300  # --suite strong: the masked losses need many iterations (SEA runs APGD for hundreds)
SUITES = {"paper": [*PAPER_ATTACKS], "strong": ["pgd", "segpgd", "cospgd", "apgd-mce", "apgd-bmce", "apgd-js", WORST]}


@dataclass
class AttackSettings:
    """How samples are attacked. Defaults are the papers': L2, PGD-100 (random start), IFGSM-10,
    the model's own Dice+CE loss."""

    norm: str = "l2"          # "l2" or "linf"
    loss: str = "dicece"      # "dicece" (the trainer's DC_and_CE_loss, per sample) or "ce"
    pgd_steps: int = 100      # PGD iterations (random start in the eps-ball)
    ifgsm_steps: int = 10     # IFGSM iterations (no random start)
    steps_other: int = 100    # iterations of SegPGD, CosPGD and any other attack
    apgd_steps: int = 100     # iterations of APGD (apgd, apgd-mce, apgd-bmce, apgd-js)
    batch_size: int = 32      # samples per forward/backward
    seed: int = 0             # seeds random starts (one generator per (attack, eps) run)
    convention: str = DEFAULT_ADI  # ADI convention of the sanity checks' figures

    def steps(self, attack: str) -> int:
        if attack in (CLEAN, WORST):
            return 0
        if attack.startswith("apgd"):
            return self.apgd_steps
        return {"pgd": self.pgd_steps, "ifgsm": self.ifgsm_steps}.get(attack, self.steps_other)


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
    """Counts of one (model, attack, eps) run, its figures, timing and kept examples."""

    attack: str
    eps: float
    counts: Counts
    seconds: float
    examples: list = field(default_factory=list)

    @property
    def summary(self) -> dict:
        return summarize(self.counts)


class Evaluator:
    """Evaluate one loaded model on fixed cases.

    >>> ev = Evaluator(model, cases, AttackSettings(pgd_steps=10))
    >>> clean = ev.run("clean", 0.0)
    >>> adv = ev.run("pgd", 2.0)
    >>> adv.summary["adi"]["mean"]
    """

    def __init__(self, model: LoadedModel, cases: list[Case], settings: AttackSettings,
                 max_samples: int | None = None, progress: bool = True):
        self.model = model
        self.cases = cases
        self.settings = settings
        self.progress = progress
        self.dim = len(model.patch_size)
        self.refs = sample_refs(cases, self.dim, model.patch_size, max_samples)
        self.batches = make_batches(cases, self.refs, self.dim, model.pool_factor, model.patch_size,
                                    settings.batch_size)
        self.attacked = MaskedInput(model.network).eval()
        self.loss = attack_loss(model, settings.loss)
        self.ignore_label = model.label_manager.ignore_label
        self.registry = dict(seg_attacks.SEG_ATTACKS)

    def _attack(self, attack: str, b: Batch, eps: float, steps: int | None, gen, custom=None) -> torch.Tensor:
        s = self.settings
        n = s.steps(attack) if steps is None else steps
        if custom is not None:
            return custom(b, eps, gen)
        if attack == CLEAN or eps == 0:  # the 0-ball holds x alone: every attack returns x, so skip its steps
            return b.x
        return self._registry_attack(attack, b, eps, n, gen)

    def _registry_attack(self, attack: str, b: Batch, eps: float, steps: int, gen) -> torch.Tensor:
        if attack not in self.registry:
            raise ValueError(f"unknown attack {attack!r}; known: {', '.join(self.registry)}")
        return self.registry[attack](self.attacked, b.x, b.y, eps, norm=self.settings.norm, steps=steps,
                                     loss=self.loss, generator=gen)

    def counts_of(self, b: Batch, x: torch.Tensor):
        """Predict ``x`` (a batch's clean or adversarial input): (pred (B, *S), tp, fp, fn) of foreground."""
        with torch.no_grad():
            pred = self.attacked(x).argmax(1)
        gt = b.y[:, 0]
        ignore = b.pad.clone()
        if self.ignore_label is not None:
            ignore |= gt == self.ignore_label
            gt = torch.where(gt == self.ignore_label, torch.zeros_like(gt), gt)
        tp, fp, fn = tp_fp_fn(pred, gt, self.model.num_classes, ignore)
        return pred, tp[:, 1:].cpu().numpy(), fp[:, 1:].cpu().numpy(), fn[:, 1:].cpu().numpy()

    def run(self, attack: str, eps: float, *, steps: int | None = None, batches: list[Batch] | None = None,
            keep: set | None = None, custom=None) -> Evaluation:
        """Attack every batch (or ``batches``) at ``eps``; ``keep``: sample refs to return as examples;
        ``custom(batch, eps, generator) -> x_adv`` replaces the named attack (sanity checks)."""
        dev = self.model.device
        gen = torch.Generator(device=dev).manual_seed(self.settings.seed)
        counts = Counts.empty(self.model.num_classes - 1)
        examples = []
        t0 = time.perf_counter()
        todo = self.batches if batches is None else batches
        bar = tqdm(todo, desc=f"{self.model.label} {attack} eps={eps:g}", unit="batch", leave=False,
                   disable=not self.progress)
        for b in bar:
            b = b.to(dev)
            self.attacked.mask = b.mask
            self.loss.mask = b.mask
            x_adv = self._attack(attack, b, eps, steps, gen, custom)
            pred, tp, fp, fn = self.counts_of(b, x_adv)
            counts.add(tp, fp, fn, [self.cases[r.case].name for r in b.refs])
            if keep:
                for j, r in enumerate(b.refs):
                    if r in keep:
                        region = tuple(slice(0, s) for s in r.size)
                        examples.append(Example(
                            r, self.cases[r.case].name, b.x[(j, slice(None)) + region].cpu().numpy(),
                            x_adv[(j, slice(None)) + region].detach().cpu().numpy(),
                            b.y[(j, 0) + region].cpu().numpy(), pred[(j,) + region].cpu().numpy()))
        self.attacked.mask = self.loss.mask = None
        return Evaluation(attack, float(eps), counts, time.perf_counter() - t0, examples)

    # ------------------------------------------------------------------ sanity checks
    def check_eps0(self, attack: str, clean: Evaluation, n_batches: int = 2) -> dict:
        """The attack path at eps = 0 must reproduce the clean per-sample Dice exactly."""
        sub = self.batches[:n_batches]
        n = sum(len(b.refs) for b in sub)
        steps = min(2, max(self.settings.steps(attack), 1))
        # through the attack itself: run()'s eps-0 short cut would compare clean with clean
        at0 = self.run(attack, 0.0, batches=sub,
                       custom=lambda b, eps, gen: self._registry_attack(attack, b, eps, steps, gen))
        ref = Counts(clean.counts.tp[:n], clean.counts.fp[:n], clean.counts.fn[:n], clean.counts.cases[:n])
        diff = float(np.max(np.abs(sample_dice(at0.counts) - sample_dice(ref)))) if n else 0.0
        ok = diff <= 1e-9
        return check(self.model.label, f"eps0_equals_clean[{attack}]", ok,
                     f"{attack} at eps=0 vs clean prediction on {n} samples: max per-sample Dice difference {diff:.2e}"
                     + ("" if ok else " (the attack path changes clean inputs: broken attack or non-deterministic model)"))

    def large_eps(self) -> float:
        """A budget no standard model survives: per-element RMS of 10 (z-score units) for L2, 10 for Linf."""
        b = self.batches[0]
        numel = int(np.prod(b.x.shape[1:]))
        return 10.0 * math.sqrt(numel) if self.settings.norm == "l2" else 10.0

    def check_large_eps(self, clean: Evaluation, n_batches: int = 2, threshold: float = 0.1) -> dict:
        """IFGSM at a huge eps should drive a standard model's ADI near 0 (else: masked gradients?)."""
        eps = self.large_eps()
        ev = self.run("ifgsm", eps, batches=self.batches[:n_batches])
        v = ev.summary["adi"]["mean"]
        c = clean.summary["adi"]["mean"]
        ok = v <= threshold
        return check(self.model.label, "large_eps_near_zero", ok,
                     f"IFGSM-{self.settings.ifgsm_steps} at eps={eps:g} on {ev.counts.n} samples: ADI {v:.3f} "
                     f"(clean {c:.3f})" + ("" if ok else
                                          f"; above {threshold}: expected for a standard model to fall near 0 - "
                                          f"a robust model may legitimately stay higher, otherwise the attack is weak or "
                                          f"the gradient is masked"))

    # ------------------------------------------------ sanity checks of attack strength (AutoAttack's)
    def _subset(self, n_samples: int) -> tuple[list[Batch], int]:
        """The first ``n_samples`` samples (of the first batch): the strength checks run on a sample of
        slices, so that 5x the steps cost about one attack of the whole test set, not five."""
        b = self.batches[0]
        k = min(n_samples, len(b.refs))
        return [Batch(b.x[:k], b.y[:k], b.valid[:k], b.pad[:k], b.refs[:k])], k

    def _adi(self, counts: Counts) -> float:
        from .metrics import adi

        return adi(counts, self.settings.convention)["mean"]

    def check_more_steps(self, attack: str, eps: float, reported: Counts, factor: int = 5, n_samples: int = CHECK_SAMPLES,
                         tol: float = 0.03) -> dict:
        """``factor`` x the steps on the first batches must not give a clearly lower ADI than reported."""
        sub, n = self._subset(n_samples)
        steps = factor * self.settings.steps(attack)
        more = self.run(attack, eps, steps=steps, batches=sub)
        a, b = self._adi(reported.head(n)), self._adi(more.counts)
        ok = not b < a - tol
        return check(self.model.label, f"more_steps[{attack}]", ok,
                     f"{attack} eps={eps:g} on {n} samples: ADI {a:.3f} with {self.settings.steps(attack)} steps, "
                     f"{b:.3f} with {steps}" + ("" if ok else f"; more than {tol} lower: too few steps, the reported "
                                                             f"figures overstate robustness (raise the step count)"))

    def check_noise(self, eps: float, whitebox: Counts, n_samples: int = CHECK_SAMPLES, tol: float = 0.03) -> dict:
        """Random noise of the same norm must not lower the ADI more than the white-box attacks."""
        sub, n = self._subset(n_samples)
        fn = (lambda b, e, gen: seg_attacks.random_noise(self.attacked, b.x, b.y, e, norm=self.settings.norm,
                                                      generator=gen))
        noise = self.run("noise", eps, batches=sub, custom=fn)
        a, b = self._adi(whitebox.head(n)), self._adi(noise.counts)
        ok = not b < a - tol
        return check(self.model.label, "noise_weaker", ok,
                     f"eps={eps:g} on {n} samples: ADI {b:.3f} under random noise, {a:.3f} under the white-box attacks"
                     + ("" if ok else "; noise is stronger: the gradient is masked or the attack is broken"))

    def check_gradient_free(self, eps: float, whitebox: Counts, queries: int = 100, n_samples: int = CHECK_SAMPLES,
                            tol: float = 0.03) -> dict:
        """A gradient-free random search must not find lower Dice than the white-box attacks."""
        sub, n = self._subset(n_samples)

        def fn(b, e, gen):
            def score(output, y):  # maximised by the search: minus the per-sample Dice, padding left out
                pred = first(output)
                gt = y.reshape(pred.shape[:1] + pred.shape[2:])
                ignore = b.pad if self.ignore_label is None else b.pad | (gt == self.ignore_label)
                tp, fp, fn_ = tp_fp_fn(pred.argmax(1), gt, self.model.num_classes, ignore)
                d = sample_dice(Counts(tp[:, 1:].cpu().numpy(), fp[:, 1:].cpu().numpy(), fn_[:, 1:].cpu().numpy()))
                return -torch.as_tensor(d, device=pred.device, dtype=pred.dtype)
            return seg_attacks.random_search(self.attacked, b.x, b.y, e, norm=self.settings.norm, queries=queries,
                                             score=score, generator=gen)

        found = self.run("random_search", eps, batches=sub, custom=fn)
        a, b = self._adi(whitebox.head(n)), self._adi(found.counts)
        ok = not b < a - tol
        return check(self.model.label, "gradient_free_weaker", ok,
                     f"eps={eps:g} on {n} samples: ADI {b:.3f} under random search ({queries} queries), {a:.3f} under "
                     f"the white-box attacks" + ("" if ok else "; the blind search wins: gradient masking (obfuscated "
                                                               "gradients); the white-box figures overstate robustness"))


def check(model: str, name: str, ok: bool, message: str) -> dict:
    return {"model": model, "check": name, "status": "ok" if ok else "warning", "message": message}


def monotonicity_checks(rows: list[dict], tol: float = 0.02) -> list[dict]:
    """Per model and attack: ADI / TVDI (over classes) must not rise with eps by more than ``tol``
    (absolute Dice; PGD's random start and argmax ties make small rises possible)."""
    out = []
    means = [r for r in rows if r["class"] == "mean"]
    models = list(dict.fromkeys(r["model"] for r in means))
    for m in models:
        clean = [r for r in means if r["model"] == m and r["attack"] == CLEAN]
        for attack in dict.fromkeys(r["attack"] for r in means if r["model"] == m and r["attack"] != CLEAN):
            seq = sorted((r for r in means if r["model"] == m and r["attack"] == attack), key=lambda r: r["eps"])
            seq = clean[:1] + [r for r in seq if r["eps"] > 0 or not clean]
            bad = []
            for metric in ("adi", "tvdi"):
                lowest = math.inf
                for r in seq:
                    if r[metric] > lowest + tol:
                        bad.append(f"{metric} rises to {r[metric]:.3f} at eps={r['eps']:g} (lower before: {lowest:.3f})")
                    lowest = min(lowest, r[metric])
            out.append(check(m, f"non_increasing[{attack}]", not bad,
                             f"{attack}: figures do not rise with eps (tolerance {tol})" if not bad else
                             f"{attack}: " + "; ".join(bad) + " - too few steps, or a masked gradient?"))
    return out
