"""Seeded training (NNUNET_IMA_SEED): reproducible runs, and SAT / IMA fed identical batches.

Tiny in-process trainings on the session's planned dataset (one epoch of two or three iterations).
"""
from __future__ import annotations

import pytest
import torch
from batchgenerators.dataloading.multi_threaded_augmenter import MultiThreadedAugmenter
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgenerators.utilities.file_and_folder_operations import load_json

from nnunet_ima_trainers import nnUNetTrainerIMA, nnUNetTrainerSAT, nnUNetTrainerSTD
from nnunet_ima_trainers.checkpoints import read_checkpoint, training_digest

SHORT = {"NNUNET_IMA_EPOCHS": "1", "NNUNET_IMA_ITERS": "2", "NNUNET_IMA_VAL_ITERS": "1", "NNUNET_IMA_K": "2",
         "NNUNET_IMA_N": "2", "NNUNET_IMA_DICE_THRESHOLD": "0.01"}


@pytest.fixture
def tiny_env(nnunet_environ, monkeypatch, tmp_path, one_thread):
    """The tiny dataset, results in this test's folder, a short schedule; afterwards torch's
    deterministic-algorithm flags and the variables a seeded run sets are as before."""
    monkeypatch.setenv("NNUNET_IMA_SEED", "")  # build() sets it; monkeypatch puts the old state back
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # a seeded run sets it; restored afterwards
    for k, v in SHORT.items():
        monkeypatch.setenv(k, v)
    flags = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    cudnn = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    yield nnunet_environ
    torch.use_deterministic_algorithms(flags[0], warn_only=flags[1])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn


def build(tiny, cls, seed):
    """A trainer as nnUNetv2_train builds it, with NNUNET_IMA_SEED = seed (None: unset; the fixture's
    monkeypatch restores the variable). No RNG is seeded here: whatever is equal between two runs is
    the seed's doing."""
    import os

    os.environ.pop("NNUNET_IMA_SEED", None)
    if seed is not None:
        os.environ["NNUNET_IMA_SEED"] = str(seed)
    plans = load_json(str(tiny.preprocessed / "nnUNetPlans.json"))
    plans["continue_training"] = False
    dataset_json = load_json(str(tiny.preprocessed / "dataset.json"))
    return cls(plans, "2d", 0, dataset_json, device=torch.device("cpu"))


def train(tiny, cls, seed, record=None):
    """One short in-process training; returns (training digest, margins or None) of checkpoint_final."""
    trainer = build(tiny, cls, seed)
    if record is not None:
        step = trainer.train_step

        def spy(batch):
            record.append((list(batch["keys"]), batch["data"].clone(), [t.clone() for t in batch["target"]]))
            return step(batch)

        trainer.train_step = spy
    trainer.run_training()
    ckpt = read_checkpoint(f"{trainer.output_folder}/checkpoint_final.pth", "checkpoint")
    assert ckpt["nnunet_ima_settings"]["seed"] == seed  # the seed is stored with the model
    margins = ckpt.get("ima_margins")
    return training_digest(ckpt), (None if margins is None else (margins["keys"], margins["margins"]))


def test_same_seed_same_model_and_margins_other_seed_differs(tiny_env):
    a = train(tiny_env, nnUNetTrainerIMA, 11)
    b = train(tiny_env, nnUNetTrainerIMA, 11)
    c = train(tiny_env, nnUNetTrainerIMA, 12)
    assert a[0] == b[0]  # weights, optimizer state, losses, margins: one digest
    assert a[1][0] == b[1][0] and torch.equal(a[1][1], b[1][1])
    assert len(a[1][0]) > 0 and not torch.all(a[1][1] == a[1][1][0])  # margins that moved, not all at their start
    assert c[0] != a[0]
    assert c[1][0] != a[1][0] or not torch.equal(c[1][1], a[1][1])


def test_sat_and_ima_with_one_seed_see_identical_batches(tiny_env, monkeypatch):
    """The attacks draw from the training process's RNG (SAT: a random start for every sample; IMA: for
    the correctly segmented ones), yet the data stream does not move: same keys, same augmented data
    and targets, iteration by iteration."""
    monkeypatch.setenv("NNUNET_IMA_ITERS", "3")
    sat, ima = [], []
    train(tiny_env, nnUNetTrainerSAT, 5, record=sat)
    after_sat = torch.get_rng_state()
    train(tiny_env, nnUNetTrainerIMA, 5, record=ima)
    assert not torch.equal(after_sat, torch.get_rng_state())  # the two runs drew differently in between batches
    assert len(sat) == len(ima) == 3
    for (keys_s, x_s, y_s), (keys_i, x_i, y_i) in zip(sat, ima):
        assert keys_s == keys_i
        assert torch.equal(x_s, x_i)
        assert all(torch.equal(u, v) for u, v in zip(y_s, y_i))
    assert not torch.equal(sat[0][1], sat[1][1])  # and the batches are not one batch repeated


def batches(trainer, n=3):
    train_gen, val_gen = trainer.get_dataloaders()
    try:
        return type(train_gen), [next(train_gen) for _ in range(n)], next(val_gen)
    finally:
        for gen in (train_gen, val_gen):
            if hasattr(gen, "_finish"):
                gen._finish()


def test_seeded_batches_do_not_depend_on_the_number_of_augmentation_workers(tiny_env, monkeypatch):
    """Seeded: the batches made in the training process equal those of two worker processes (order
    kept). Unseeded: nnU-Net's own NonDetMultiThreadedAugmenter, as before."""
    trainer = build(tiny_env, nnUNetTrainerSTD, 3)
    trainer.initialize()
    kind0, in_process, val0 = batches(trainer)
    monkeypatch.setenv("nnUNet_n_proc_DA", "2")
    kind2, workers, val2 = batches(trainer)
    assert kind2 is MultiThreadedAugmenter
    for a, b in zip(in_process, workers):
        assert a["keys"] == b["keys"] and torch.equal(a["data"], b["data"])
    assert val0["keys"] == val2["keys"] and torch.equal(val0["data"], val2["data"])
    unseeded = build(tiny_env, nnUNetTrainerSTD, None)
    unseeded.initialize()
    assert batches(unseeded, 1)[0] is NonDetMultiThreadedAugmenter


def _worker_threads(queue) -> None:
    from threadpoolctl import threadpool_info

    from nnunet_ima_trainers import SampleKeyDataLoader

    loader = SampleKeyDataLoader.__new__(SampleKeyDataLoader)  # set_thread_id needs no dataset
    loader.set_thread_id(1)  # what batchgenerators' producer calls first in each worker process
    queue.put((torch.get_num_threads(), sorted({p["num_threads"] for p in threadpool_info()})))


def test_an_augmentation_worker_runs_on_one_thread():
    """A seeded run's workers (batchgenerators' ordered MultiThreadedAugmenter, forked from a training
    process on several threads) run on one thread as nnU-Net's own workers do: a forked worker entering
    the parent's OpenMP pool can hang in its first augmentation."""
    import multiprocessing

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        ctx = multiprocessing.get_context("fork")
        queue = ctx.Queue()
        proc = ctx.Process(target=_worker_threads, args=(queue,))
        proc.start()
        got = queue.get(timeout=120)
        proc.join(timeout=60)
    finally:
        torch.set_num_threads(before)
    assert got == (1, [1])
