"""The shared trainer: nnU-Net's trainer plus settings, sample keys and one optimisation step, with
atomic, ``weights_only`` checkpoints (:mod:`.checkpoint_io`) and nnU-Net's mixed precision
(:mod:`.precision`) as mixins. :class:`nnUNetTrainerSTD` is plain nnU-Net training with it.

The optimisation step (:meth:`nnUNetTrainerSTD.train_step`) is written once:

    clean forward -> L0 -> backward(L0 * w)            (w = 1/2 for adversarial trainers, else 1)
    x~, finish = make_adversarial_batch(x, y, keys, clean)    (the one seam; STD makes none)
    noisy forward -> L1 -> backward(L1 / 2) -> finish(z~)
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

import numpy as np
import torch

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunet_ima.losses import first

from .checkpoint_io import CheckpointIO
from .checkpoints import fitting_init_weights
from .config import IMAConfig, load_config
from .data import sample_key_loader, seeded_augmenters
from .local_loss import rank_local_loss
from .precision import MixedPrecision
from .seeding import deterministic_algorithms, seed_run


class nnUNetTrainerSTD(CheckpointIO, MixedPrecision, nnUNetTrainer):
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
