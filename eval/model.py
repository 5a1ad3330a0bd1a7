"""Load a trained nnU-Net model through nnU-Net's own predictor, and build its attack loss.

The model folder is nnU-Net's: ``$nnUNet_results/DatasetXXX/<trainer>__<plans>__<configuration>/fold_F/<checkpoint>``.
The network is taken from :class:`nnUNetPredictor` (its prediction methods run under
``torch.inference_mode`` and cannot give gradients) and called directly, in eval mode.

Any trainer nnU-Net can find works (stock ``nnUNetTrainer`` and its variants, this project's
trainers, anything in ``nnUNet_extTrainer``). ``nnUNetPredictor`` loads the checkpoint with
``torch.load(weights_only=False)``, so stock checkpoints, which hold numpy scalars (``_best_ema``,
values in ``logging``), load as they are; the e2e tests attack a stock-trained model and rewrite
its checkpoint through ``torch.save`` with those scalars.
"""
from __future__ import annotations

import contextlib
import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from nnunet_ima.losses import first, valid_pixels

from .errors import EvalError


def ensure_trainer_search_path() -> str:
    """Let nnU-Net find the trainer classes of nnUNetTrainerIMA / SAT checkpoints: the one helper of
    :mod:`nnunet_ima_trainers` (its ext folder first in ``nnUNet_extTrainer``, other folders kept).
    Returns the new value."""
    from nnunet_ima_trainers import register_ext_trainers

    return register_ext_trainers()


def dataset_name(dataset: str) -> str:
    """nnU-Net's dataset name (DatasetXXX_Name) for an id or a name; EvalError if unknown."""
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        if not os.environ.get(var):
            raise EvalError(f"{var} is not set: export the nnU-Net path variables (see nnU-Net's setting_up_paths.md)")
    try:
        return maybe_convert_to_dataset_name(dataset)
    except (RuntimeError, ValueError, FileNotFoundError) as e:
        raise EvalError(f"unknown dataset {dataset!r}: not found in nnUNet_raw, nnUNet_preprocessed or "
                        f"nnUNet_results ({e.__class__.__name__}: {str(e).splitlines()[0]})") from None


@dataclass
class LoadedModel:
    """A trained model ready for attacks. ``label`` names it in tables (the trainer name)."""

    label: str
    trainer: str
    plans: str
    configuration: str
    fold: str
    checkpoint: str
    folder: Path
    predictor: object  # nnUNetPredictor
    device: torch.device

    @property
    def network(self) -> torch.nn.Module:
        return self.predictor.network

    @property
    def configuration_manager(self):
        return self.predictor.configuration_manager

    @property
    def plans_manager(self):
        return self.predictor.plans_manager

    @property
    def label_manager(self):
        return self.predictor.label_manager

    @property
    def dataset_json(self) -> dict:
        return self.predictor.dataset_json

    @property
    def num_classes(self) -> int:
        """Network output channels = labels incl. background (the ignore label is not a head)."""
        return self.label_manager.num_segmentation_heads

    @property
    def class_names(self) -> dict:
        """{label value: name} of the foreground classes."""
        names = {int(v): k for k, v in self.dataset_json["labels"].items() if not isinstance(v, (list, tuple))}
        return {c: names.get(c, str(c)) for c in range(1, self.num_classes)}

    @property
    def patch_size(self) -> tuple:
        return tuple(int(p) for p in self.configuration_manager.patch_size)

    @property
    def pool_factor(self) -> tuple:
        """Product of the pooling strides per spatial axis: input sizes must be multiples of it."""
        k = np.array(self.configuration_manager.pool_op_kernel_sizes, dtype=np.int64)
        return tuple(int(v) for v in k.prod(0))


def model_folder(dataset: str, trainer: str, plans: str, configuration: str) -> Path:
    from nnunetv2.utilities.file_path_utilities import get_output_folder

    return Path(get_output_folder(dataset_name(dataset), trainer, plans, configuration))


def is_trained(folder: Path) -> bool:
    """Whether ``folder`` holds a trained model: a ``fold_*`` folder with a checkpoint (a training run refused
    or stopped before its first checkpoint leaves none)."""
    return folder.is_dir() and any(folder.glob("fold_*/*.pth"))


def locate(dataset: str, configuration: str, fold: str, trainer: str, plans: str = "nnUNetPlans",
           checkpoint: str = "checkpoint_final.pth") -> Path:
    """The checkpoint file of a trained model; EvalError naming what is missing (checked for every
    model before any attack runs)."""
    name = dataset_name(dataset)
    folder = model_folder(name, trainer, plans, configuration)
    if not folder.is_dir():
        parent = folder.parent
        have = sorted(p.name for p in parent.iterdir() if is_trained(p)) if parent.is_dir() else []
        raise EvalError(f"unknown trainer {trainer!r} (plans {plans!r}, configuration {configuration!r}) for {name}: "
                        f"no folder {folder}" + (f"; trained models there: {', '.join(have)}" if have else
                                                 f"; nothing trained for {name} in nnUNet_results"))
    fold_dir = folder / f"fold_{fold}"
    if not fold_dir.is_dir():
        have = sorted(p.name for p in folder.iterdir() if p.name.startswith("fold_"))
        raise EvalError(f"unknown fold {fold!r} for {folder.name}: no {fold_dir.name}"
                        + (f" (available: {', '.join(have)})" if have else ""))
    ckpt = fold_dir / checkpoint
    if not ckpt.is_file():
        have = sorted(p.name for p in fold_dir.glob("*.pth"))
        raise EvalError(f"missing checkpoint {ckpt}" + (f" (found: {', '.join(have)}; choose one with -chk)" if have
                                                       else " (training not finished?)"))
    return ckpt


def load_model(dataset: str, configuration: str, fold: str, trainer: str, plans: str = "nnUNetPlans",
               checkpoint: str = "checkpoint_final.pth", device: str = "cpu") -> LoadedModel:
    """Load ``trainer``'s model through ``nnUNetPredictor.initialize_from_trained_model_folder``.

    Raises :class:`EvalError` with one clear sentence for an unknown dataset / trainer / fold, a
    missing checkpoint, a trainer class nnU-Net cannot find, or a configuration this tool cannot attack.
    """
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    ensure_trainer_search_path()
    ckpt = locate(dataset, configuration, fold, trainer, plans, checkpoint)
    folder = ckpt.parent.parent
    dev = torch.device(device)
    with contextlib.redirect_stdout(io.StringIO()):  # "perform_everything_on_device ... only for cuda"
        predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False, device=dev,
                                    verbose=False, verbose_preprocessing=False, allow_tqdm=False)
    chatter = io.StringIO()  # nnU-Net prints its trainer search; keep the command's output readable
    try:
        with contextlib.redirect_stdout(chatter), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            predictor.initialize_from_trained_model_folder(str(folder), (fold if fold == "all" else int(fold),),
                                                           checkpoint)
    except RuntimeError as e:
        if "Could not find requested nnunet trainer" in str(e):
            raise EvalError(f"nnU-Net cannot find the trainer class of {ckpt} (searched nnunetv2 and "
                            f"nnUNet_extTrainer={os.environ.get('nnUNet_extTrainer', '')!r}): install the package "
                            f"that defines it or add its folder to nnUNet_extTrainer") from None
        raise
    lm = predictor.label_manager
    if lm.has_regions:
        raise EvalError(f"{folder.name} is region-based (dataset.json 'regions_class_order'): not supported; "
                        f"this tool evaluates label-based models")
    if predictor.configuration_manager.previous_stage_name is not None:
        raise EvalError(f"{configuration!r} is a cascade stage (needs the previous stage's segmentation): not supported")
    net = predictor.network
    net = getattr(net, "_orig_mod", net)  # attack the plain module, never a torch.compile wrapper
    predictor.network = net.to(dev).eval()
    return LoadedModel(label=trainer, trainer=trainer, plans=plans, configuration=configuration, fold=str(fold),
                       checkpoint=checkpoint, folder=folder, predictor=predictor, device=dev)


class PerSampleLoss(torch.nn.Module):
    """The trainer's loss evaluated on each sample separately: returns (B,).

    ``dicece`` is nnU-Net's ``DC_and_CE_loss`` as ``nnUNetTrainer._build_loss`` builds it (soft Dice
    of the softmax without background, smooth 1e-5, CE weight 1, Dice weight 1, the ignore label),
    without the deep-supervision wrapper (the network runs without deep supervision at inference),
    computed for each sample as if it were a batch of its own: a sample's attack never depends on the
    other samples of its batch (with one sample the plans' ``batch_dice`` makes no difference). It is
    vectorised over the batch; tests/test_eval_runner.py checks it against the literal loop over
    nnU-Net's own ``DC_and_CE_loss``. ``ce`` is per-pixel cross-entropy
    averaged per sample.

    Pixels that do not count (the kernel's one rule, :func:`nnunet_ima.losses.valid_pixels`: labelled
    ``NOT_SCORED``, as the evaluation marks padding and the ignore label, or labelled ``ignore_label``)
    are left out of every sum (the same as cutting padding away before the loss), so they never drive
    the attack, whatever their logits.
    """

    def __init__(self, kind: str, batch_dice: bool, ignore_label: int | None, smooth: float = 1e-5):
        super().__init__()
        if kind not in ("dicece", "ce"):
            raise EvalError(f"unknown loss {kind!r}: use dicece or ce")
        self.kind = kind
        self.batch_dice = batch_dice
        self.ignore_label = ignore_label
        self.smooth = smooth

    def forward(self, output, y):
        logits = first(output)
        keep_b = valid_pixels(y.long(), ignore_label=self.ignore_label)
        keep = keep_b.to(logits.dtype)
        t = torch.where(keep_b, y.long(), torch.zeros_like(y, dtype=torch.long))
        axes = tuple(range(2, logits.ndim))
        n = keep.sum(axes).squeeze(1)
        ce = torch.nn.functional.cross_entropy(logits, t[:, 0], reduction="none").unsqueeze(1)
        ce = torch.where(keep_b, ce, torch.zeros_like(ce)).sum(axes).squeeze(1) / n.clamp_min(1)
        if self.kind == "ce":
            return ce
        p = torch.where(keep_b, torch.softmax(logits, 1), torch.zeros_like(logits))[:, 1:]
        onehot = torch.zeros_like(logits).scatter_(1, t, 1.0)[:, 1:] * keep
        intersect = (p * onehot).sum(axes)
        dc = (2 * intersect + self.smooth) / (onehot.sum(axes) + p.sum(axes) + self.smooth).clamp_min(1e-8)
        return ce - dc.mean(1)


def attack_loss(model: LoadedModel, kind: str = "dicece") -> PerSampleLoss:
    return PerSampleLoss(kind, bool(model.configuration_manager.batch_dice), model.label_manager.ignore_label)
