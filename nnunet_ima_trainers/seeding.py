"""Reproducible training runs: what the setting ``seed`` (``NNUNET_IMA_SEED``) reaches.

With a seed, a training run is reproducible on one machine and one set of library versions (the
same number of CPU threads; a GPU's kernels as far as torch makes them deterministic):

* the training process: torch (CPU and CUDA), numpy and Python RNGs are seeded once, before the
  network is built (:func:`seed_process`): weight initialisation, dropout, the attacks' random starts;
* the data: each batch of the training and of the validation loader is drawn (case, slice, patch
  position) and augmented under RNG states derived from (seed, rank, loader, batch index) alone
  (:func:`rng_scope`, used by :class:`~nnunet_ima_trainers.data.SampleKeyDataLoader`). So batches do
  not depend on anything else the process draws: SAT and IMA fine-tuned with one seed see the same
  batches and augmentations whatever their attacks draw, and the batches are the same whether the
  augmentation runs in the training process (``nnUNet_n_proc_DA=0``) or in any number of
  batchgenerators' order-preserving ``MultiThreadedAugmenter`` workers (nnU-Net's
  ``NonDetMultiThreadedAugmenter`` hands batches out in arrival order, so it is not used then);
* torch's deterministic algorithms where it has them (``warn_only``: an operation without one warns
  instead of failing), cuDNN in deterministic mode without benchmarking (nnU-Net's ``run_training``
  turns benchmarking on after the trainer is built; :func:`deterministic_algorithms` runs again when
  training starts), and ``CUBLAS_WORKSPACE_CONFIG`` for deterministic cuBLAS (unless already set).

Without a seed nothing here runs: nnU-Net's own behaviour, unseeded.

>>> with rng_scope(7, 0, 0, 3):
...     a = float(np.random.uniform())
>>> with rng_scope(7, 0, 0, 3):
...     b = float(np.random.uniform())
>>> a == b
True
"""
from __future__ import annotations

import contextlib
import os
import random

import numpy as np
import torch


def derived_seeds(*entropy: int) -> tuple[int, int, int]:
    """Three independent 32-bit seeds (numpy, torch, Python) from non-negative integers ``entropy``."""
    a, b, c = np.random.SeedSequence([int(e) for e in entropy]).generate_state(3)
    return int(a), int(b), int(c)


def seed_process(seed: int, rank: int = 0) -> None:
    """Seed this process's global RNGs (numpy, torch CPU and CUDA, Python) from (seed, rank)."""
    np_seed, torch_seed, py_seed = derived_seeds(seed, rank)
    np.random.seed(np_seed)
    torch.manual_seed(torch_seed)
    random.seed(py_seed)


@contextlib.contextmanager
def rng_scope(*entropy: int):
    """Run the body with numpy's global RNG, torch's default CPU generator and Python's ``random``
    seeded from ``entropy`` alone; their previous states come back afterwards, so what the body draws
    neither depends on nor changes what the rest of the process draws."""
    saved = np.random.get_state(), torch.get_rng_state(), random.getstate()
    np_seed, torch_seed, py_seed = derived_seeds(*entropy)
    np.random.seed(np_seed)
    torch.default_generator.manual_seed(torch_seed)
    random.seed(py_seed)
    try:
        yield
    finally:
        np.random.set_state(saved[0])
        torch.set_rng_state(saved[1])
        random.setstate(saved[2])


def seed_run(seed: int | None, rank: int = 0) -> str:
    """Seed the process (:func:`seed_process`) and turn on :func:`deterministic_algorithms` when
    ``seed`` is set; returns the log line that says what was done (nothing when ``seed`` is None)."""
    if seed is None:
        return "seed: none (nnU-Net's unseeded data loading, augmentation and initialisation)"
    seed_process(seed, rank)
    deterministic_algorithms()
    return (f"seed: {seed} (rank {rank}): torch, numpy and Python RNGs seeded; data loading and augmentation on "
            "streams of their own (seed, rank, loader, batch); deterministic algorithms")


def deterministic_algorithms() -> None:
    """torch's deterministic algorithms (warn where none exists), cuDNN deterministic, no benchmark."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read when cuBLAS starts: before any GPU matmul
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
