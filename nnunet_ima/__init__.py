"""nnunet-ima: Increasing-Margin Adversarial (IMA) training for nnU-Net and classifiers.

The kernel (attacks, BPGD, margin bookkeeping) lives here once and serves the nnU-Net trainers
(:mod:`nnunet_ima_trainers`), the classification module (:mod:`nnunet_ima.classify`) and the
evaluation package (:mod:`nnunet_ima_eval`).
"""
from .apgd import apgd
from .baselines import random_noise, random_search
from .attacks import IFGSM, PGD, ifgsm, perturb_iterative, pgd
from .bpgd import BPGDResult, binary_search, bpgd
from .ima_step import IMAStepSettings, IMAStepStats, IMAUpdate, ima_step
from .losses import cross_entropy, ima_beta_loss, ima_loss, logit_margin
from .margins import MarginStore
from .norms import L2, NORMS, Linf, Norm, get_norm
from .predicates import DicePredicate, argmax_correct, per_sample_dice
from .validation import NonFiniteInputWarning

__version__ = "0.1.0"

__all__ = [
    "pgd", "ifgsm", "perturb_iterative", "PGD", "IFGSM", "bpgd", "binary_search", "BPGDResult", "MarginStore",
    "ima_loss", "ima_beta_loss", "cross_entropy", "logit_margin", "Norm", "L2", "Linf", "NORMS", "get_norm",
    "DicePredicate", "argmax_correct", "per_sample_dice", "NonFiniteInputWarning",
    "apgd", "random_noise", "random_search", "ima_step", "IMAStepSettings", "IMAStepStats", "IMAUpdate",
]
