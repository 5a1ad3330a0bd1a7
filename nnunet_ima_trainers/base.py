"""The shared trainer: nnU-Net's trainer plus settings, sample keys, one optimisation step and
atomic, ``weights_only`` checkpoints. :class:`nnUNetTrainerSTD` is plain nnU-Net training with it.

The optimisation step (:meth:`nnUNetTrainerSTD.train_step`) is written once:

    clean forward -> L0 -> backward(L0 * w)            (w = 1/2 for adversarial trainers, else 1)
    x~ = make_adversarial_batch(x, y, keys, clean)     (the one seam; STD makes none)
    noisy forward -> L1 -> after_noisy_forward(z~, y) -> backward(L1 / 2)
    clip the gradient norm at 12 -> optimizer step     (GradScaler + autocast on CUDA, as nnU-Net)

so the loss is (L0 + L1) / 2 (Algorithm 1). Backpropagating L0 before the attack frees the clean
graph, so an adversarial step never holds two graphs at once.
"""
from __future__ import annotations

import os
from typing import Union

import numpy as np
import torch
from torch import autocast
from torch._dynamo import OptimizedModule

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.helpers import dummy_context
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from .config import ConfigError, IMAConfig, load_config
from .data import sample_key_loader


class nnUNetTrainerSTD(nnUNetTrainer):
    """Standard nnU-Net training that honours NNUNET_IMA_EPOCHS / _ITERS / _VAL_ITERS.

    Subclasses change class attributes, never the ``__init__`` signature (nnU-Net stores the init
    arguments in checkpoints): ``epochs`` / ``iterations`` set the schedule of a length variant.
    """

    epochs: int | None = None        # None: nnU-Net's 1000
    iterations: int | None = None    # None: nnU-Net's 250 per epoch
    adversarial: bool = False        # True: the step makes a noisy batch and averages the two losses

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        self.ima_config = self._read_config(plans, configuration, dataset_json)  # fail before any side effect
        super().__init__(plans, configuration, fold, dataset_json, device)
        cfg = self.ima_config
        self.num_epochs = cfg.epochs or self.num_epochs
        self.num_iterations_per_epoch = cfg.iters or self.num_iterations_per_epoch
        self.num_val_iterations_per_epoch = cfg.val_iters or self.num_val_iterations_per_epoch
        self.print_to_log_file(f"{type(self).__name__}: {self.num_epochs} epochs x {self.num_iterations_per_epoch} "
                               f"iterations (validation {self.num_val_iterations_per_epoch})\n{cfg.describe()}",
                               also_print_to_console=True)

    @classmethod
    def _read_config(cls, plans: dict, configuration: str, dataset_json: dict) -> IMAConfig:
        plans_manager = PlansManager(plans)
        patch = plans_manager.get_configuration(configuration).patch_size
        channels = len(dataset_json.get("channel_names", dataset_json.get("modality", {0: None})))
        return load_config(plans_manager.dataset_name, int(np.prod(patch)) * channels, len(patch) == 2,
                           trainer_defaults={"epochs": cls.epochs, "iters": cls.iterations})

    def initialize(self):
        super().initialize()
        if self.ima_config.init_weights:
            self.load_init_weights(self.ima_config.init_weights)

    def load_init_weights(self, path: str) -> None:
        """Start from every weight of an nnU-Net checkpoint of the same network (setting
        ``init_weights``), segmentation heads included: the papers start SAT and IMA from the trained
        standard model. (nnU-Net's ``-pretrained_weights`` skips the heads, as it is meant for
        transfer between datasets; a run continued with ``--c`` loads its own checkpoint after this.)"""
        checkpoint = torch.load(path, map_location=self.device, weights_only=True)
        module = self._module()
        own = module.state_dict()
        weights = bare_keys(checkpoint["network_weights"])
        problems = sorted(set(own) ^ set(weights)) + [
            k for k in own if k in weights and own[k].shape != weights[k].shape]
        if problems:
            raise ConfigError(f"init_weights={path}: not a checkpoint of this network (same plans and configuration "
                              f"needed; {len(problems)} mismatched weights, e.g. {problems[:3]}). To transfer between "
                              "datasets use nnU-Net's -pretrained_weights instead")
        module.load_state_dict(weights)
        source = f"trainer {checkpoint.get('trainer_name', '?')}, epoch {checkpoint.get('current_epoch', '?')}"
        self.print_to_log_file(f"initialised every weight (segmentation heads included) from {path} ({source})",
                               also_print_to_console=True)

    # ------------------------------------------------------------------ data
    def get_dataloaders(self):
        with sample_key_loader():  # batch["keys"] become sample ids ("case/slice_k" in 2d)
            return super().get_dataloaders()

    # ------------------------------------------------------------------ the optimisation step
    def train_step(self, batch: dict) -> dict:
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"]
        target = [t.to(self.device, non_blocking=True) for t in target] if isinstance(target, list) \
            else target.to(self.device, non_blocking=True)
        self.optimizer.zero_grad(set_to_none=True)
        weight = 0.5 if self.adversarial else 1.0
        with self.autocast():
            output = self.network(data)
            loss = self.loss(output, target)
        self._backward(loss * weight)
        if self.adversarial:
            clean = (output[0] if isinstance(output, (list, tuple)) else output).detach()
            del output
            noisy = self.make_adversarial_batch(data, target, batch["keys"], clean)
            if noisy is None and self.is_ddp:
                noisy = data  # every rank must run the same number of backward passes (gradient all-reduce)
            if noisy is None:  # no sample to perturb: L1 = L0 for all, i.e. the plain gradient of L0
                for p in self.network.parameters():
                    if p.grad is not None:
                        p.grad.mul_(2.0)
            else:
                with self.autocast():
                    noisy_output = self.network(noisy)
                    loss_noisy = self.loss(noisy_output, target)
                self.after_noisy_forward(
                    (noisy_output[0] if isinstance(noisy_output, (list, tuple)) else noisy_output).detach(), target)
                del noisy_output
                self._backward(loss_noisy * weight)
                loss = (loss.detach() + loss_noisy.detach()) / 2
        self._optimizer_step()
        return {"loss": loss.detach().cpu().numpy()}

    def after_noisy_forward(self, noisy_output: torch.Tensor, target) -> None:
        """Called after the noisy forward with its detached full-resolution logits (B, C, *S), before
        the backward pass (IMA reads g(z~) of Algorithm 1 line 13 from them)."""

    def make_adversarial_batch(self, data: torch.Tensor, target, keys, clean_output: torch.Tensor):
        """The seam. Return the noisy batch (same shape as ``data``; rows that should count with
        their clean loss hold the clean sample) or None when no sample is perturbed.
        ``clean_output``: detached full-resolution logits of the clean forward (B, C, *S)."""
        return None

    def autocast(self):
        """nnU-Net's mixed precision: autocast on CUDA only (CPU autocast is slow, MPS unsupported)."""
        return autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context()

    def _backward(self, loss: torch.Tensor) -> None:
        (self.grad_scaler.scale(loss) if self.grad_scaler is not None else loss).backward()

    def _optimizer_step(self) -> None:
        if self.grad_scaler is not None:
            self.grad_scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
            self.optimizer.step()

    def bare_network(self) -> torch.nn.Module:
        """The network without the DDP wrapper (attacks run on the rank's own copy, no gradient sync)."""
        return self.network.module if self.is_ddp else self.network

    def _module(self) -> torch.nn.Module:
        mod = self.bare_network()
        return mod._orig_mod if isinstance(mod, OptimizedModule) else mod

    # ------------------------------------------------------------------ checkpoints
    def extra_checkpoint_state(self) -> dict:
        """Extra checkpoint entries (plain tensors / lists / strings only)."""
        return {}

    def load_extra_checkpoint_state(self, checkpoint: dict) -> None:
        pass

    def save_checkpoint(self, filename: str) -> None:
        """nnU-Net's checkpoint plus :meth:`extra_checkpoint_state`, numpy scalars turned into Python
        numbers (so it loads with ``weights_only=True``), written to a temporary file and renamed."""
        if self.local_rank != 0:
            return
        if self.disable_checkpointing:
            self.print_to_log_file("No checkpoint written, checkpointing is disabled")
            return
        checkpoint = {
            "network_weights": self._module().state_dict(),
            "optimizer_state": self.optimizer.state_dict(),
            "grad_scaler_state": self.grad_scaler.state_dict() if self.grad_scaler is not None else None,
            "logging": self.logger.get_checkpoint(),
            "_best_ema": self._best_ema,
            "current_epoch": self.current_epoch + 1,
            "init_args": self.my_init_kwargs,
            "trainer_name": self.__class__.__name__,
            "inference_allowed_mirroring_axes": self.inference_allowed_mirroring_axes,
            **self.extra_checkpoint_state(),
        }
        atomic_torch_save(plain(checkpoint), filename)

    def load_checkpoint(self, filename_or_checkpoint: Union[dict, str]) -> None:
        """nnU-Net's restore, reading the file with ``torch.load(weights_only=True)``; also takes a dict."""
        if not self.was_initialized:
            self.initialize()
        checkpoint = filename_or_checkpoint
        if not isinstance(checkpoint, dict):
            checkpoint = torch.load(checkpoint, map_location=self.device, weights_only=True)
        module = self._module()
        weights = bare_keys(checkpoint["network_weights"])
        self.my_init_kwargs = checkpoint["init_args"]
        self.current_epoch = checkpoint["current_epoch"]
        self.logger.load_checkpoint(checkpoint["logging"])
        self._best_ema = checkpoint["_best_ema"]
        self.inference_allowed_mirroring_axes = checkpoint.get("inference_allowed_mirroring_axes",
                                                               self.inference_allowed_mirroring_axes)
        module.load_state_dict(weights)
        self.optimizer.load_state_dict(checkpoint["optimizer_state"])
        if self.grad_scaler is not None and checkpoint["grad_scaler_state"] is not None:
            self.grad_scaler.load_state_dict(checkpoint["grad_scaler_state"])
        self.load_extra_checkpoint_state(checkpoint)


def bare_keys(weights: dict) -> dict:
    """State-dict keys without the DDP ("module.") and torch.compile ("_orig_mod.") prefixes."""
    return {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in weights.items()}


def plain(obj):
    """Numpy scalars/arrays -> Python numbers/lists, recursively through dicts, lists and tuples."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(plain(v) for v in obj)
    return obj


def atomic_torch_save(obj, filename: str) -> None:
    """torch.save to ``filename.tmp-<pid>``, fsync, then os.replace: a crash leaves the old file intact."""
    tmp = f"{filename}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, filename)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
