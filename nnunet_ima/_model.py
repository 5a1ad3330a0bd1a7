"""Context manager that prepares a model for an attack and restores it afterwards."""
from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def attack_mode(model: torch.nn.Module, mode: str = "eval"):
    """Freeze parameters (no .grad accumulates, no weight-gradient work) and set train/eval mode.

    ``mode``: "eval" (default, like robustness libraries: batch-norm statistics are not updated by
    attack forwards), "train", or "keep" (leave as is). Everything is restored on exit, also on error.
    """
    if mode not in ("eval", "train", "keep"):
        raise ValueError(f"model_mode must be 'eval', 'train' or 'keep', got {mode!r}")
    was_training = model.training
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    if mode != "keep":
        model.train(mode == "train")
    try:
        with torch.enable_grad():
            yield model
    finally:
        for p in frozen:
            p.requires_grad_(True)
        model.train(was_training)
