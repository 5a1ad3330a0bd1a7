"""Checkpoint I/O of the project's trainers, apart from the step: nnU-Net's checkpoint plus our extra
state, atomic and ``weights_only``-loadable, restored with nnU-Net's rules; the starting weights of a
fine-tuning (``NNUNET_IMA_INIT_WEIGHTS``).

:class:`CheckpointIO` is a mixin for a subclass of nnU-Net's ``nnUNetTrainer`` (it reads the trainer's
network, optimiser, logger, grad scaler and ``ima_config``); it replaces nnU-Net's ``save_checkpoint``
and ``load_checkpoint``. The keys nnU-Net writes are listed in :meth:`CheckpointIO.save_checkpoint`;
``tests/test_trainers_inprocess.py`` holds them against the installed nnU-Net's own ``save_checkpoint``.

>>> class nnUNetTrainerX(CheckpointIO, MixedPrecision, nnUNetTrainer): ...
"""
from __future__ import annotations

import os
from typing import Union

from nnunet_ima.plumbing import atomic_torch_save, to_plain

from .checkpoints import (SETTINGS_KEY, bare_keys, describe_checkpoint, read_checkpoint, refuse_unfitting,
                          state_digest, training_digest)
from .config import KEYS


class CheckpointIO:
    """Checkpoints with extra state (hooks :meth:`extra_checkpoint_state` / :meth:`load_extra_checkpoint_state`
    / :meth:`on_checkpoint_saved`), the run's settings, digests in the log; and the starting weights."""

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
