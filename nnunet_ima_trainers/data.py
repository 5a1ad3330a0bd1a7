"""Sample ids for the per-sample margins: nnU-Net's data loader, keeping which slice it drew.

nnU-Net's 2d loader picks a slice of a case (``bbox_lbs[0]`` of the pseudo-3d crop) and returns
only the case id. IMA needs one margin per training sample, so :class:`SampleKeyDataLoader`
records the crop of every sample it draws and names 2d samples ``"<case>/slice_<k>"``. The
augmentations that follow (rotation, scaling, intensity, mirroring) do not change which slice a
sample is, so the key is stable across epochs.

3d configurations keep the case id: a 3d crop is placed at random (or around a random foreground
voxel) every time, so a key made of the crop position would name a new "sample" on almost every
draw and its margin would never grow past delta.

Seeded runs (setting ``seed``): :func:`seeded_augmenters` gives each loader a stream of its own
(:meth:`SampleKeyDataLoader.use_stream`): batch ``i`` is drawn and augmented under RNG states derived
from (seed, rank, loader, i) only (:func:`~nnunet_ima_trainers.seeding.rng_scope`), and batches come
back in order (``SingleThreadedAugmenter`` or batchgenerators' ``MultiThreadedAugmenter``, whose
worker ``w`` of ``n`` makes batches ``w, w + n, ...`` and whose batches are handed out round-robin).
"""
from __future__ import annotations

import contextlib
import math

import torch
from batchgenerators.dataloading.multi_threaded_augmenter import MultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from threadpoolctl import threadpool_limits

from .seeding import derived_seeds, rng_scope


def one_thread_worker() -> None:
    """One thread for torch and the BLAS/OpenMP pools in this (forked) augmentation worker, as nnU-Net's
    ``NonDetMultiThreadedAugmenter`` workers run. batchgenerators' ordered ``MultiThreadedAugmenter`` (a
    seeded run's) does not do it, and a forked worker that enters the OpenMP pool the training process
    had started (libgomp is not fork-safe) can wait forever in its first augmentation (seen: a seeded
    ``nnunet-ima demo`` stuck before its first batch)."""
    torch.set_num_threads(1)
    threadpool_limits(1)


def slice_key(case: str, slice_index: int) -> str:
    """Margin key of one 2d training sample."""
    return f"{case}/slice_{int(slice_index)}"


class SampleKeyDataLoader(nnUNetDataLoader):
    """nnU-Net's loader whose batch ``keys`` are sample ids: ``case/slice_k`` (2d) or ``case`` (3d).

    ``stream``: None (nnU-Net's global RNGs) or the (seed, rank, loader) entropy of a seeded run's
    batches; ``next_batch`` / ``stride``: the index of the next batch this copy makes and the step to
    the one after (the number of augmentation workers)."""

    stream: tuple | None = None
    first_batch: int = 0
    next_batch: int = 0
    stride: int = 1

    def use_stream(self, stream: tuple, first_batch: int = 0, stride: int = 1) -> None:
        """Draw batch ``i`` (counted from ``first_batch``) under RNG states derived from ``stream + (i,)``."""
        self.stream, self.first_batch, self.next_batch, self.stride = tuple(stream), first_batch, first_batch, stride

    def set_thread_id(self, thread_id):
        """Called by batchgenerators in each augmentation worker process, never in the training process:
        the worker runs on one thread (:func:`one_thread_worker`); worker ``thread_id`` makes batches
        first + thread_id, first + thread_id + stride, ..."""
        one_thread_worker()
        super().set_thread_id(thread_id)
        if self.stream is not None:
            self.next_batch = self.first_batch + thread_id

    def get_bbox(self, *args, **kwargs):
        lbs, ubs = super().get_bbox(*args, **kwargs)
        self._drawn.append(lbs)  # called exactly once per sample, in batch order
        return lbs, ubs

    def generate_train_batch(self):
        if self.stream is None:
            return self._keyed_batch()
        with rng_scope(*self.stream, self.next_batch):
            batch = self._keyed_batch()
        self.next_batch += self.stride
        return batch

    def _keyed_batch(self):
        self._drawn = []
        batch = super().generate_train_batch()
        keys = [str(k) for k in batch["keys"]]
        if self.patch_size_was_2d:
            keys = [slice_key(k, lbs[0]) for k, lbs in zip(keys, self._drawn)]
        batch["keys"] = keys
        return batch


@contextlib.contextmanager
def sample_key_loader():
    """Make ``nnUNetTrainer.get_dataloaders`` build :class:`SampleKeyDataLoader` instead of nnU-Net's
    loader (it refers to the class by its module-level name), without copying that 60-line method."""
    from nnunetv2.training.nnUNetTrainer import nnUNetTrainer as module

    original = module.nnUNetDataLoader
    module.nnUNetDataLoader = SampleKeyDataLoader
    try:
        yield
    finally:
        module.nnUNetDataLoader = original


@contextlib.contextmanager
def seeded_augmenters(seed: int | None, rank: int = 0, first_batches: tuple[int, int] = (0, 0)):
    """Inside, ``nnUNetTrainer.get_dataloaders`` builds seeded, order-preserving augmenters (seed None:
    nothing changes). Its training loader (built first) gets stream (seed, rank, 0), the validation
    loader (seed, rank, 1); ``first_batches``: their first batch indices (a run continued with ``--c``
    at epoch e goes on with the batches of epoch e). With ``nnUNet_n_proc_DA=0`` batches are made in the
    training process (``SingleThreadedAugmenter``), otherwise by ``MultiThreadedAugmenter`` workers
    instead of nnU-Net's ``NonDetMultiThreadedAugmenter`` (same number of workers, same pinning)."""
    if seed is None:
        yield
        return
    from nnunetv2.training.nnUNetTrainer import nnUNetTrainer as module

    made = []

    def stream(loader, stride: int) -> tuple:
        """The next loader's stream (0: training, 1: validation), set on ``loader``."""
        entropy = (seed, rank, len(made))
        loader.use_stream(entropy, first_batches[min(len(made), 1)], stride)
        made.append(loader)
        return entropy

    def single(data_loader, transform):
        stream(data_loader, 1)
        return SingleThreadedAugmenter(data_loader, transform)

    def multi(data_loader, transform, num_processes, num_cached, seeds=None, pin_memory=False, wait_time=0.02):
        entropy = stream(data_loader, num_processes)  # every batch is re-seeded: the worker seeds only pin the rest
        return MultiThreadedAugmenter(data_loader, transform, num_processes,
                                      num_cached_per_queue=max(2, math.ceil(num_cached / num_processes)),
                                      seeds=[derived_seeds(*entropy, w)[0] for w in range(num_processes)],
                                      pin_memory=pin_memory, wait_time=wait_time)

    original = module.SingleThreadedAugmenter, module.NonDetMultiThreadedAugmenter
    module.SingleThreadedAugmenter, module.NonDetMultiThreadedAugmenter = single, multi
    try:
        yield
    finally:
        module.SingleThreadedAugmenter, module.NonDetMultiThreadedAugmenter = original
