"""``nnunet-ima-attack --scope case``: attack whole cases through nnU-Net's sliding-window predictor and
score them as deployed.

Per model and case (the preprocessed case, the space the network and eps live in):

1. **Attack**: every attack of the registry (:data:`nnunet_ima_eval.attacks.ATTACKS`) runs on the whole
   case through :class:`~.case_predictor.CasePredictor` (nnU-Net's windows, Gaussian blending and
   mirroring, differentiable, window-by-window backward), with a case-level objective: the model's
   Dice+CE over the blended logits (``--loss``), or the attack's own pixel objective (SegPGD, CosPGD,
   SEA's losses) over them. The budget (:data:`BUDGETS`, ``--case-budget``): ``blocks`` (default) keeps
   eps's meaning of the sample scope: for a 2d model each slice's perturbation in its own eps-ball, for
   a 3d model each tile of the patch-size grid from the origin (the sample scope's tiles), a product of
   balls (:class:`nnunet_ima.block_norm.BlockNorm`); ``whole``: one ball over the whole case, L2 radius
   eps * sqrt(number of blocks), Linf radius eps (the same set as ``blocks`` for Linf).
2. **Score as deployed**: the adversarial case goes through nnU-Net's own, untouched predictor
   (``nnUNetPredictor.predict_logits_from_preprocessed_data``: sliding window with ``--tile-step``,
   Gaussian, mirroring unless ``--no-mirroring``, fp16 accumulation) and nnU-Net's export
   (``convert_predicted_logits_to_segmentation_with_correct_shape``: back to the original spacing, crop
   and axis order), and the segmentation is compared with the raw label file (``-l``, or the dataset's
   ``gt_segmentations`` for the fold's cases) with nnU-Net's ``compute_tp_fp_fn_tn`` (ignore label left
   out). Figures: :mod:`.case_metrics` (nnU-Net's empty-class rules).

So the figures are what ``nnUNetv2_predict`` gives for that image: the differentiable predictor can make
the attack weaker (fp32 vs fp16, a different objective), never the score better.

Several processes (:mod:`.units`): the unit of the case scope is one case of one run, a task too (one
case per pack, weighted by its windows x mirrored passes x network passes); :func:`work_order` is rank 0's
share-out, :class:`CaseWork` a rank's computation. Each case's random start comes from its own generator
seeded from (seed, attack, eps, case) (:func:`~.runner.sample_seed`), so a case's result does not depend
on the other cases nor on the number of processes.

>>> cev = CaseEvaluator(evaluator, CaseSettings(tile_step=0.5, mirroring=True))
>>> cev.run("pgd", 2.0).counts         # per-case TP/FP/FN in the original geometry
"""
from __future__ import annotations

import contextlib
import io
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from nnunet_ima.block_norm import BlockNorm
from nnunet_ima.losses import scored_labels
from nnunet_ima.norms import get_norm

from .case_metrics import CASE, SAMPLE, SCOPES, scope_of  # noqa: F401 (the scope names, re-exported)
from .case_predictor import CasePredictor, sliding_window_slicers
from . import units
from .metrics import Counts
from .runner import CLEAN, Evaluation, Evaluator, sample_seed

#: what the case scope's results depend on in its code besides CODE_VERSION (2: one random start per case)
CASE_CODE_VERSION = 2
#: a case-scope unit's one "sample" (the whole case), as the shards record a unit's samples
WHOLE = (0,)


@dataclass(frozen=True)
class CaseSettings:
    """How whole cases are predicted (attack and scoring alike) and how eps bounds them."""

    tile_step: float = 0.5   # nnU-Net's tile_step_size (nnUNetv2_predict -step_size)
    mirroring: bool = True   # test-time mirroring over the checkpoint's axes (off: nnUNetv2_predict --disable_tta)
    budget: str = "blocks"   # "blocks" (each slice / patch tile in its eps-ball) or "whole" (one ball, see BUDGETS)


def describe(case: CaseSettings) -> str:
    """The line printed under the tables."""
    budget = ("each slice / patch tile" if case.budget == "blocks" else
              "the whole case (L2: eps x sqrt(number of slices / patch tiles))")
    return (f"Case scope: whole cases through nnU-Net's predictor (tile step {case.tile_step:g}, mirroring "
            f"{'on' if case.mirroring else 'off'}), scored in their original geometry with nnU-Net's rules (ADI = "
            f"3D Dice: a sample is a case); eps bounds {budget}")


# ------------------------------------------------------------------------------------------------ budget
def block_shape(patch_size: tuple) -> tuple:
    """The blocks eps bounds, as the sample scope's samples: a 2d model's slices ``(1, None, None)`` (None =
    the whole axis), a 3d model's patch-size tiles."""
    return (1, None, None) if len(patch_size) == 2 else tuple(int(p) for p in patch_size)


def _per_block(norm: str, block: tuple, spatial: tuple):
    return BlockNorm(norm, block), 1.0


def _whole(norm: str, block: tuple, spatial: tuple):
    return get_norm(norm), math.sqrt(BlockNorm(norm, block).count(spatial)) if norm == "l2" else 1.0


#: --case-budget -> (norm name, blocks, case spatial shape) -> (the attack's Norm, factor: its radius / eps)
BUDGETS = {"blocks": _per_block, "whole": _whole}


def case_budget(norm: str, budget: str, patch_size: tuple, spatial: tuple):
    """(Norm, radius factor) of a case of spatial shape ``spatial`` (Z, Y, X)."""
    return BUDGETS[budget](norm, block_shape(patch_size), tuple(spatial))


# ------------------------------------------------------------------------------------------------ keys
def case_settings_key(case: CaseSettings) -> dict:
    """What a case-scope result or check depends on besides the sample scope's settings."""
    return {"scope": CASE, "tile_step": case.tile_step, "mirroring": case.mirroring, "budget": case.budget}


def case_keys(common: dict, settings, case: CaseSettings, attacks: list, eps_list: list) -> list[dict]:
    """The clean run and every (attack, eps) run of the case scope: the sample scope's settings plus the
    scope, the predictor's (tile step, mirroring) and the budget; no batch size (one case at a time)."""
    base = {**common, "batch_size": settings.batch_size, **case_settings_key(case)}
    keys = [{**base, "attack": CLEAN, "eps": 0.0, "norm": settings.norm, "loss": "-", "steps": 0, "seed": "-",
             "iterate": "-", "budget": "-"}]
    keys += [{**base, "attack": a, "eps": e, "norm": settings.norm, "loss": settings.loss, "steps": settings.steps(a),
              "seed": settings.seed, "iterate": settings.iterate_of(a), "budget": case.budget}
             for a in attacks for e in eps_list]
    return keys


# ------------------------------------------------------------------------------------------------ evaluator
@dataclass
class CaseResult:
    """One case of one run: its adversarial input (1, C, *S) and its exported segmentation (original geometry)."""

    index: int
    adversarial: torch.Tensor
    segmentation: np.ndarray


class CaseEvaluator:
    """Attack and score whole cases of one loaded model (the sample scope's :class:`~.runner.Evaluator`
    gives the model, cases, loss, Dice and settings). ``cases``: indices into ``ev.cases`` (default: the
    cases of the sample scope's samples, so that ``--max-samples`` selects the same cases)."""

    def __init__(self, ev: Evaluator, settings: CaseSettings, cases: list[int] | None = None):
        self.ev, self.model, self.settings = ev, ev.model, settings
        self.indices = sorted({r.case for r in ev.refs}) if cases is None else list(cases)
        self.predictor = CasePredictor.from_model(ev.model, settings.tile_step, settings.mirroring,
                                                  window_batch=ev.settings.batch_size)  # --batch-size windows a call
        self.progress = ev.progress

    @property
    def cases(self) -> list:
        return [self.ev.cases[i] for i in self.indices]

    def windows(self) -> int:
        """Sliding windows over all cases (one pass, without mirroring)."""
        return sum(self.case_windows(case) for case in self.cases)

    def case_windows(self, case) -> int:
        """Sliding windows over one case (one pass, without mirroring)."""
        from acvl_utils.cropping_and_padding.padding import pad_nd_image

        shape = pad_nd_image(case.image, self.model.patch_size).shape[1:]
        return len(sliding_window_slicers(shape, self.model.patch_size, self.settings.tile_step))

    def budget(self, case) -> tuple:
        """(Norm, radius factor) of one case."""
        return case_budget(self.ev.settings.norm, self.settings.budget, self.model.patch_size, case.label.shape)

    def inputs(self, case) -> tuple[torch.Tensor, torch.Tensor]:
        """(x (1, C, *S), scored labels (1, 1, *S)) of a case on the model's device."""
        dev = self.model.device
        x = torch.from_numpy(np.ascontiguousarray(case.image))[None].to(dev)
        y = torch.from_numpy(case.label.astype(np.int64))[None, None].to(dev)
        return x, scored_labels(y, ignore_label=self.ev.ignore_label)

    def attack(self, attack: str, case, x, y, eps: float, steps: int, gen) -> torch.Tensor:
        """One registry attack on one whole case, through its steps (also at eps 0)."""
        s = self.ev.settings
        norm, factor = self.budget(case)
        return self.ev.registry[attack](self.predictor, x, y, eps * factor, norm=norm, steps=steps, loss=self.ev.loss,
                                       generator=gen, region=None, best=s.keeps_best(attack), score=self.ev.dice)

    def deployed(self, x_adv: torch.Tensor, case) -> np.ndarray:
        """nnU-Net's own prediction and export of a (1, C, *S) input: the segmentation ``nnUNetv2_predict``
        writes for it (original geometry)."""
        from nnunetv2.inference.export_prediction import convert_predicted_logits_to_segmentation_with_correct_shape

        p = self.model.predictor
        p.tile_step_size, p.use_mirroring = self.settings.tile_step, self.settings.mirroring
        with contextlib.redirect_stdout(io.StringIO()):
            logits = p.predict_logits_from_preprocessed_data(x_adv[0].detach().float().cpu())
        return convert_predicted_logits_to_segmentation_with_correct_shape(
            logits.cpu(), p.plans_manager, p.configuration_manager, p.label_manager, case.properties,
            num_threads_torch=torch.get_num_threads())

    def count(self, seg: np.ndarray, case) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(tp, fp, fn) (1, K) of a segmentation against the case's raw label file, by nnU-Net's
        ``compute_tp_fp_fn_tn`` (the ignore label left out)."""
        from nnunetv2.evaluation.evaluate_predictions import compute_tp_fp_fn_tn

        ref = self.reference(case)
        if ref.shape != seg.shape:
            raise ValueError(f"case {case.name}: label {case.label_file} has shape {ref.shape}, nnU-Net's exported "
                             f"segmentation {seg.shape}")
        ignore = self.model.label_manager.ignore_label
        mask = None if ignore is None else ref == ignore
        counts = [compute_tp_fp_fn_tn(ref == c, seg == c, mask)[:3] for c in range(1, self.model.num_classes)]
        return tuple(np.array([[int(v[i]) for v in counts]], np.int64) for i in range(3))

    def reference(self, case) -> np.ndarray:
        """The raw label of a case, read with the plans' reader (nnU-Net's axis order)."""
        if not hasattr(self, "_refs"):
            self._refs = {}
        if case.name not in self._refs:
            seg, _ = self.model.plans_manager.image_reader_writer_class().read_seg(case.label_file)
            self._refs[case.name] = np.asarray(seg[0])
        return self._refs[case.name]

    def run(self, attack: str, eps: float, *, steps: int | None = None, cases: list[int] | None = None,
            keep: set | None = None, custom=None) -> Evaluation:
        """Attack every case (or ``cases``, indices into ``ev.cases``) at ``eps`` and score it as deployed.
        ``keep``: case indices whose :class:`CaseResult` is returned (``examples``); ``custom(case, x, y,
        eps, gen) -> x_adv`` replaces the named attack (sanity checks). ``distance``: per case the
        perturbation's norm in units of eps (the largest block's, or the whole case's / its factor). Each
        case's random draws come from its own generator (:meth:`generator`)."""
        counts, examples, dist = Counts.empty(self.model.num_classes - 1), [], []
        t0 = time.perf_counter()
        todo = self.indices if cases is None else cases
        for i in tqdm(todo, desc=f"{self.model.label} {attack} eps={eps:g} (cases)", unit="case", leave=False,
                      disable=not self.progress):
            case = self.ev.cases[i]
            x, y = self.inputs(case)
            x_adv = self._point(attack, case, x, y, eps, steps, self.generator(attack, eps, case), custom)
            seg = self.deployed(x_adv, case)
            counts.add(*self.count(seg, case), [case.name])
            norm, factor = self.budget(case)
            dist.append(float(norm.measure((x_adv - x).detach())[0]) / factor)
            if keep and i in keep:
                examples.append(CaseResult(i, x_adv.detach().cpu(), seg))
        return Evaluation(attack, float(eps), counts, time.perf_counter() - t0, examples, "nnunet",
                          np.array(dist), np.zeros(len(dist)))

    def generator(self, attack: str, eps: float, case) -> torch.Generator:
        """The generator of one case's random draws in a run, seeded from (seed, attack, eps, case)."""
        seed = sample_seed(self.ev.settings.seed, attack, eps, case.name, WHOLE)
        return torch.Generator(device=self.model.device).manual_seed(seed)

    def _point(self, attack, case, x, y, eps, steps, gen, custom) -> torch.Tensor:
        if custom is not None:
            return custom(case, x, y, eps, gen)
        if attack == CLEAN or eps == 0:  # the 0-ball holds x alone
            return x
        return self.attack(attack, case, x, y, eps, self.ev.settings.steps(attack) if steps is None else steps, gen)


# ------------------------------------------------------------------------------------------------ one model
def gt_folder(plan):
    """Where the fold's raw labels are (nnU-Net copies them there when it preprocesses; its own validation
    scores against them)."""
    import os
    from pathlib import Path

    return Path(os.environ["nnUNet_preprocessed"]) / plan.name / "gt_segmentations"


def check_case_scope(plan) -> None:
    """Before anything is computed: the case scope of the fold's cases needs their raw labels."""
    from .errors import EvalError

    if CASE in plan.scopes and plan.source == "fold" and not gt_folder(plan).is_dir():
        raise EvalError(f"--scope case scores the fold's cases against their raw labels in {gt_folder(plan)}, "
                        f"which does not exist: preprocess the dataset again (nnUNetv2_plan_and_preprocess), or give "
                        f"raw test cases with -i/-l")


def case_inputs(plan, inputs: dict) -> dict:
    """What a case-scope result depends on besides the sample scope's inputs: the case scope's code version
    and, for the fold's cases, the raw labels they are scored against (``gt_segmentations``); ``-l`` is in
    ``inputs`` already."""
    inputs = {**inputs, "case_code": CASE_CODE_VERSION}
    if plan.source != "fold":
        return inputs
    from .provenance import files_digest

    gt = gt_folder(plan)
    files = sorted(p for p in gt.iterdir() if p.is_file()) if gt.is_dir() else []
    return {**inputs, "raw_labels": files_digest(files, gt)}


def job_name(tr: str) -> str:
    """The case scope's name in a job's work orders and progress (the sample scope's is the trainer's)."""
    return f"{tr} (case scope)"


def work_order(world, cev: CaseEvaluator, model: str, runs: list[dict], inputs: dict, shards, reuse: bool = True,
               keep: set = frozenset()) -> "units.WorkOrder":
    """Rank 0: the case scope's units of ``runs`` still to compute (finished ones on disk kept when ``reuse``),
    one task per (run, case), shared out over the ranks like the sample scope's packs; ``keep``: case indices
    whose examples are saved."""
    import uuid

    names = [cev.ev.cases[i].name for i in cev.indices]
    weight = {c.name: cev.case_windows(c) * len(cev.predictor.flips) for c in cev.cases}  # network passes
    all_units = {n: [WHOLE] for n in names}
    tasks, finished = [], 0
    for r, key in enumerate(runs):
        done = set(shards.finished(key, inputs, all_units)) if reuse else set()
        finished += len(done)
        tasks += [units.Task(r, p, (n,), weight[n] * units.passes(cev.ev, key))
                  for p, n in enumerate(names) if n not in done]
    kept = frozenset((cev.ev.cases[i].name, WHOLE) for i in keep)
    return units.WorkOrder(model, uuid.uuid4().hex[:8], runs, inputs, all_units, [[n] for n in names],
                           units.assign(tasks, world.size), finished, kept)


class CaseWork:
    """A rank's case-scope tasks (:func:`.units.compute_share`): one case of one run through
    :meth:`CaseEvaluator.run`; a kept case's example saved through ``save_examples(cev, key, evaluation,
    index)``."""

    def __init__(self, cev: CaseEvaluator, save_examples=None):
        self.cev, self.save_examples = cev, save_examples
        cev.progress = False  # the job's one progress bar counts the cases
        self.index = {cev.ev.cases[i].name: i for i in cev.indices}

    def compute(self, order, task, progress) -> Evaluation:
        key, (name,) = order.runs[task.run], order.packs[task.pack]
        i = self.index[name]
        keep = {i} if (name, WHOLE) in order.keep else set()
        evaluation = self.cev.run(key["attack"], key["eps"], cases=[i], keep=keep)
        if evaluation.examples and self.save_examples is not None:
            self.save_examples(self.cev, key, evaluation, i)
        progress(task.weight)
        return evaluation
