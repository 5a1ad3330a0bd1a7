"""The trainer's loss without DDP gathering, for attacks (issue 11, item 2).

Under DDP nnU-Net builds its Dice loss with ``ddp=True``; with ``batch_dice`` (2d plans) the Dice
terms of every rank are gathered (``AllGatherGrad``) inside the loss. An attack calls its loss on
this rank's own (sub-)batch only - IMA on the correctly segmented samples, whose number differs
between ranks, and nothing at all on a rank without any - so a gathering loss inside an attack
would hang or mix ranks. :func:`rank_local_loss` builds the same Dice + CE with deep supervision the
way the trainer builds it (its own ``_build_loss``, so trainer subclasses with another loss are
honoured) but with ``is_ddp`` False, and then switches off every remaining ``ddp`` flag. The
training losses L0 and L1 still use the trainer's DDP loss, called by every rank on same-shaped
full batches.
"""
from __future__ import annotations

import torch


def rank_local_loss(trainer) -> torch.nn.Module:
    """The trainer's loss as it would be built in a single process: no collective in forward or
    backward. Outside DDP this is ``trainer.loss`` itself. Under DDP the deep-supervision weights are
    copied from the training loss (nnU-Net gives the lowest output 1e-6 instead of 0 under DDP), so
    the value is the training loss's on one rank's batch, summed over that rank only."""
    if not trainer.is_ddp:
        return trainer.loss
    trainer.is_ddp = False
    try:
        loss = trainer._build_loss()
    finally:
        trainer.is_ddp = True
    for module in loss.modules():
        if getattr(module, "ddp", False):
            module.ddp = False  # a subclass that hard-codes ddp=True
    if hasattr(loss, "weight_factors") and hasattr(trainer.loss, "weight_factors"):
        loss.weight_factors = tuple(trainer.loss.weight_factors)
    return loss.to(trainer.device) if isinstance(loss, torch.nn.Module) else loss
