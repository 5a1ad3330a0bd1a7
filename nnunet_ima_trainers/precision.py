"""nnU-Net's mixed precision and optimiser step, and the network behind its wrappers, as one mixin:
autocast + GradScaler on CUDA only (as ``nnUNetTrainer.train_step``), gradient norm clipped at 12; the
plain module under DDP and torch.compile (what the attacks and the checkpoints use).
"""
from __future__ import annotations

import torch
from torch import autocast
from torch._dynamo import OptimizedModule

from nnunetv2.utilities.helpers import dummy_context


class MixedPrecision:
    """For a subclass of ``nnUNetTrainer`` (reads ``device``, ``grad_scaler``, ``optimizer``, ``network``,
    ``is_ddp``)."""

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
