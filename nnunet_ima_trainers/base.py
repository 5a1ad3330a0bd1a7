"""The shared trainer: nnU-Net's trainer plus settings, sample keys, one optimisation step and
atomic, ``weights_only`` checkpoints. :class:`nnUNetTrainerSTD` is plain nnU-Net training with it.

The optimisation step (:meth:`nnUNetTrainerSTD.train_step`) is written once:

    clean forward -> L0 -> backward(L0 * w)            (w = 1/2 for adversarial trainers, else 1)
    x~, finish = make_adversarial_batch(x, y, keys, clean)    (the one seam; STD makes none)
    noisy forward -> L1 -> finish(z~) -> backward(L1 / 2)
    clip the gradient norm at 12 -> optimizer step     (GradScaler + autocast on CUDA, as nnU-Net)

so the loss is (L0 + L1) / 2 (Algorithm 1). Backpropagating L0 before the attack frees the clean
graph, so an adversarial step never holds two graphs at once.

Multi-GPU (DDP): the attacks run on :meth:`~nnUNetTrainerSTD.attack_module` (the rank's own plain
network: no DDP hooks) with :meth:`~nnUNetTrainerSTD.attack_loss` (the same Dice + CE without DDP
gathering), so no collective runs inside an attack, whatever the number of samples a rank attacks.
The collectives of a step - the Dice gather of L0 and L1 and the two gradient all-reduces - are made
by every rank on full, same-shaped batches: a rank that perturbs nothing trains on x~ = x.
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

from nnunet_ima.losses import first
from nnunet_ima.plumbing import atomic_torch_save, to_plain

from .checkpoints import (SETTINGS_KEY, bare_keys, describe_checkpoint, fitting_init_weights, read_checkpoint,
                          refuse_unfitting, state_digest, training_digest)
from .config import KEYS, ConfigError, IMAConfig, load_config
from .data import sample_key_loader, seeded_augmenters
from .local_loss import rank_local_loss
from .seeding import deterministic_algorithms, seed_run


class nnUNetTrainerSTD(nnUNetTrainer):
    """Standard nnU-Net training that honours NNUNET_IMA_EPOCHS / _ITERS / _VAL_ITERS.

    Subclasses change class attributes, never the ``__init__`` signature (nnU-Net stores the init
    arguments in checkpoints): ``epochs`` / ``iterations`` set the schedule of a length variant.
    """

    epochs: int | None = None        # None: nnU-Net's 1000
    iterations: int | None = None    # None: nnU-Net's 250 per epoch
    adversarial: bool = False        # True: the step makes a noisy batch and averages the two losses
    attack_compiled: bool = False    # True: attacks run through the torch.compile wrapper (see attack_module)

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        self.ima_config = self._read_config(plans, configuration, dataset_json)  # fail before any side effect
        # init_weights must fit this network before nnU-Net makes the fold folder (a folder left by a refused run
        # would look like a model in training to nnunet-ima-attack and to the user)
        self._init_checkpoint = fitting_init_weights(type(self), self.ima_config.init_weights, plans, configuration,
                                                     dataset_json)
        super().__init__(plans, configuration, fold, dataset_json, device)
        cfg = self.ima_config
        self.num_epochs = cfg.epochs or self.num_epochs
        self.num_iterations_per_epoch = cfg.iters or self.num_iterations_per_epoch
        self.num_val_iterations_per_epoch = cfg.val_iters or self.num_val_iterations_per_epoch
        self.initial_lr = cfg.initial_lr or self.initial_lr
        self._rank_local_loss = None
        self.print_to_log_file(f"{type(self).__name__}: {self.num_epochs} epochs x {self.num_iterations_per_epoch} "
                               f"iterations (validation {self.num_val_iterations_per_epoch}), initial lr "
                               f"{self.initial_lr:g}\n{cfg.describe()}", also_print_to_console=True)
        self._seed()

    def _seed(self) -> None:
        """A seeded run (setting ``seed``): this process's RNGs, before the network is built, and
        deterministic algorithms (:func:`~nnunet_ima_trainers.seeding.seed_run`). Unseeded: nothing."""
        self.print_to_log_file(seed_run(self.ima_config.seed, self.local_rank),
                               also_print_to_console=self.ima_config.seed is not None)

    def on_train_start(self):
        if self.ima_config.seed is not None:
            deterministic_algorithms()  # nnU-Net's run_training switched cuDNN benchmarking on after __init__
        super().on_train_start()

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
            self.load_init_weights(self.ima_config.init_weights, self._init_checkpoint)
            self._init_checkpoint = None

    def describe(self) -> str:
        """'trainer T, dataset D, configuration C, plans P' of this trainer (as in checkpoint messages)."""
        return (f"trainer {type(self).__name__}, dataset {self.plans_manager.dataset_name}, configuration "
                f"{self.configuration_name}, plans {self.plans_manager.plans_name}")

    def load_init_weights(self, path: str, checkpoint: dict | None = None) -> None:
        """Start from every weight of an nnU-Net checkpoint of the same network (setting
        ``init_weights``), segmentation heads included: the papers start SAT and IMA from the trained
        standard model. Any nnU-Net trainer's checkpoint of the same plans and configuration works,
        stock ``nnUNetTrainer`` included (read with ``weights_only=True``, numpy scalars allowed).
        (nnU-Net's ``-pretrained_weights`` skips the heads, as it is meant for transfer between
        datasets; a run continued with ``--c`` loads its own checkpoint after this.) ``checkpoint``: the file
        already read (by ``__init__``'s check)."""
        checkpoint = checkpoint or read_checkpoint(path, "init_weights", map_location=self.device)
        module = self._module()
        weights = bare_keys(checkpoint["network_weights"])
        refuse_unfitting(path, checkpoint, module.state_dict(), self.describe())
        module.load_state_dict(weights)
        self.print_to_log_file(f"initialised every weight (segmentation heads included) from {path} "
                               f"({describe_checkpoint(checkpoint)}, epoch {checkpoint.get('current_epoch', '?')})",
                               also_print_to_console=True)

    # ------------------------------------------------------------------ data
    def get_dataloaders(self):
        """nnU-Net's loaders; batch["keys"] are sample ids ("case/slice_k" in 2d); a seeded run's batches
        come from streams of their own, continued at the current epoch's batches after ``--c``."""
        epoch = self.current_epoch
        first = (epoch * self.num_iterations_per_epoch, epoch * self.num_val_iterations_per_epoch)
        with sample_key_loader(), seeded_augmenters(self.ima_config.seed, self.local_rank, first):
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
            clean = first(output).detach()
            del output
            loss = self._adversarial_half(data, target, batch["keys"], clean, loss)
        self._optimizer_step()
        return {"loss": loss.detach().cpu().numpy()}

    def _adversarial_half(self, data, target, keys, clean: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        """Make x~, then backward(L1 / 2) on it; returns (L0 + L1) / 2. Under DDP every rank runs the
        noisy forward/backward on a full batch (x~ = x when it perturbs nothing), so all ranks make
        the same collective calls (the Dice gather and the gradient all-reduce)."""
        noisy, finish = self.make_adversarial_batch(data, target, keys, clean)
        noisy_output = None
        if noisy is None and self.is_ddp:
            noisy = data
        if noisy is None:  # no sample to perturb: L1 = L0 for all, i.e. the plain gradient of L0
            for p in self.network.parameters():
                if p.grad is not None:
                    p.grad.mul_(2.0)
        else:
            with self.autocast():
                out = self.network(noisy)
                loss_noisy = self.loss(out, target)
            noisy_output = first(out).detach()
            del out
            self._backward(loss_noisy * 0.5)
            loss = (loss.detach() + loss_noisy.detach()) / 2
        if finish is not None:
            finish(noisy_output)
        return loss

    def make_adversarial_batch(self, data: torch.Tensor, target, keys, clean_output: torch.Tensor):
        """The seam. Return ``(noisy, finish)``: ``noisy`` the noisy batch (same shape as ``data``;
        rows that should count with their clean loss hold the clean sample) or None when no sample
        is perturbed; ``finish`` None or a callable taking the detached full-resolution logits of the
        noisy forward (B, C, *S) - or None when no noisy forward ran - called once per step, after
        the noisy backward (IMA's margin update, Algorithm 1 line 13, reads g(z~) there).
        ``clean_output``: detached full-resolution logits of the clean forward (B, C, *S)."""
        return None, None

    # ------------------------------------------------------------------ what attacks run on
    def attack_module(self) -> torch.nn.Module:
        """The network an attack runs on: this rank's plain module, without the DDP wrapper (no
        gradient all-reduce, no buffer broadcast) and, by default, without the torch.compile wrapper.

        Why uncompiled (issue 11 item 4): IMA attacks only the correctly segmented samples, so the
        attack's batch size changes from one iteration to the next. Through the compiled module each
        new size costs a recompilation (after the first, dynamo falls back to a dynamic-shape graph),
        and a recompile takes seconds to minutes. The plain module runs eagerly at any batch size and
        shares the parameters, so the attack sees the very network that is trained. Not measured on a
        GPU in this project yet (``benchmarks/bench_trainers.py --device cuda --compile on`` measures
        the step with compile on); ``attack_compiled = True`` on a subclass attacks through the
        compiled module instead (still without DDP)."""
        if self.attack_compiled:
            return self.bare_network()
        return self._module()

    def attack_loss(self, output, target) -> torch.Tensor:
        """Rank-local training loss for attacks: nnU-Net's Dice + CE with deep supervision built
        without DDP gathering (:func:`~nnunet_ima_trainers.local_loss.rank_local_loss`), times the
        GradScaler's scale on CUDA so that fp16 input gradients do not underflow (the attack step
        normalises the gradient, so the factor changes nothing else). ``output``/``target`` as for
        ``self.loss`` (deep-supervision lists of (b, C, *S) / (b, 1, *S)), any sub-batch size b."""
        if self._rank_local_loss is None or self._rank_local_loss[0] is not self.loss:  # built once per self.loss
            self._rank_local_loss = (self.loss, rank_local_loss(self))
        loss = self._rank_local_loss[1](output, target)
        return loss * self.grad_scaler.get_scale() if self.grad_scaler is not None else loss

    # ------------------------------------------------------------------ mixed precision, optimiser
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
        """The network without the DDP wrapper (the torch.compile wrapper, if any, kept)."""
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

    def on_checkpoint_saved(self, filename: str) -> None:
        """Called on rank 0 right after a checkpoint was written to ``filename``."""

    def save_checkpoint(self, filename: str) -> None:
        """nnU-Net's checkpoint plus :meth:`extra_checkpoint_state`, numpy scalars turned into Python
        numbers (so it loads with plain ``weights_only=True``), written to a temporary file and renamed.
        The log gets the digest of the extra state (IMA: the margins), printed again on restore, so a
        run continued with ``--c`` shows that it got back exactly what was saved (issue 12 item 5)."""
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
        }
        extra = to_plain(self.extra_checkpoint_state())
        plain = {**to_plain(checkpoint), SETTINGS_KEY: self.settings_record(), **extra}
        atomic_torch_save(plain, filename)
        name = os.path.basename(filename)
        if extra:
            self.print_to_log_file(f"saved {name}: {', '.join(extra)} digest {state_digest(extra)}")
        self.print_to_log_file(f"saved {name}: training state digest {training_digest(plain)} "
                               f"(seed {self.ima_config.seed})")
        self.on_checkpoint_saved(filename)

    def settings_record(self) -> dict:
        """The run's settings as stored in its checkpoints (key ``nnunet_ima_settings``)."""
        return {**{k: getattr(self.ima_config, k) for k in KEYS}, "initial_lr": self.initial_lr}

    def load_checkpoint(self, filename_or_checkpoint: Union[dict, str]) -> None:
        """nnU-Net's restore, reading the file with :func:`~nnunet_ima_trainers.checkpoints.read_checkpoint`
        (``weights_only=True``, numpy scalars allowed: stock nnU-Net checkpoints load); also takes a dict."""
        if not self.was_initialized:
            self.initialize()
        checkpoint = filename_or_checkpoint
        if not isinstance(checkpoint, dict):
            checkpoint = read_checkpoint(checkpoint, "checkpoint", map_location=self.device)
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
        self._log_restored_extra_state(checkpoint, filename_or_checkpoint)

    def _log_restored_extra_state(self, checkpoint: dict, source) -> None:
        """Log the digest of the restored extra state; say so when it differs from the file's."""
        restored = to_plain(self.extra_checkpoint_state())
        if not restored:
            return
        name = os.path.basename(source) if isinstance(source, str) else "checkpoint"
        digest = state_digest(restored)
        stored = state_digest({k: checkpoint[k] for k in restored if k in checkpoint})
        note = "" if stored == digest else f" (the file held digest {stored}: changed on restore, see above)"
        self.print_to_log_file(f"restored {name}: {', '.join(restored)} digest {digest}{note}")
