"""Two processes (gloo, CPU) run the IMA trainer's real adversarial step under DDP (issue 11 item 2).

The trainer is nnUNetTrainerIMA built from the tiny dataset's 2d plan, then switched to DDP the way
nnU-Net does it on GPUs, minus CUDA: the network wrapped in DistributedDataParallel and the loss
rebuilt by nnU-Net's ``_build_loss`` with ``is_ddp`` True (``ddp=True`` with the plan's
``batch_dice``: its Dice terms are all-gathered across ranks). Rank 0 segments 3 of its 4 samples
correctly and attacks them; rank 1 segments none and attacks nothing. A collective inside the
attack (e.g. the attack calling the gathering loss) would gather tensors of different sizes or
leave rank 1 waiting (the process group's timeout turns that into an error), and in any case makes
rank 0 call more collectives than rank 1: the test records every Python-level collective call of
each rank and requires the same sequence. After the epoch's margin merge both ranks must hold
identical margins and identical weights.
"""
from __future__ import annotations

import datetime
import os
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

WORLD = 2
BATCH = 4
CORRECT = {0: 3, 1: 0}  # correctly segmented samples per rank
ITERATIONS = 2
PG_TIMEOUT_S = 60  # a rank waiting this long in a collective raises (a hang becomes an error)
JOIN_TIMEOUT_S = 240  # generous: spawning and importing two processes is slow on a loaded machine


def _to_ddp(trainer, rank: int):
    """What nnUNetTrainer.__init__/initialize do under DDP, on the CPU (nnU-Net's own DDP set-up
    insists on CUDA): rank, DDP wrapper, loss built in DDP mode."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    trainer.is_ddp, trainer.local_rank = True, rank
    trainer.network = DDP(trainer.network)
    trainer.loss = trainer._build_loss()
    dice = trainer.loss.loss.dc
    assert dice.ddp and dice.batch_dice  # the training loss gathers across ranks


def _batch(trainer, rank: int, it: int) -> dict:
    """4 samples; the first CORRECT[rank] targets are the network's own clean prediction (Dice 1:
    correct), the others that prediction shifted by one class (Dice 0: wrong)."""
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(100 * rank + it)
    data = torch.randn(BATCH, 1, *trainer.configuration_manager.patch_size, generator=g)
    with torch.no_grad():
        pred = trainer.network.module(data)[0].argmax(1, keepdim=True).float()
    pred[CORRECT[rank]:] = (pred[CORRECT[rank]:] + 1) % trainer.label_manager.num_segmentation_heads
    scales = trainer._get_deep_supervision_scales()
    target = [F.interpolate(pred, scale_factor=tuple(float(f) for f in s), mode="nearest") for s in scales]
    return {"data": data, "target": target, "keys": [f"case_{rank}/slice_{it}_{i}" for i in range(BATCH)]}


def _record_collectives(log: list) -> None:
    """Wrap the Python-level collectives (nnU-Net's Dice gather and its backward, nnU-Net's and the
    margin store's object gathers) so that each call appends (name, shape)."""
    import torch.distributed as dist

    for name in ("all_gather", "all_reduce", "all_gather_object", "broadcast", "all_to_all", "reduce_scatter"):
        original = getattr(dist, name)

        def wrapped(*args, _original=original, _name=name, **kwargs):
            shapes = [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]
            log.append(f"{_name}{shapes}")
            return _original(*args, **kwargs)

        setattr(dist, name, wrapped)


def _rank_main(rank: int, init_file: str, env: dict, out: str):
    os.environ.update(env)
    os.environ["nnUNet_results"] = str(Path(out) / f"results_{rank}")
    torch.set_num_threads(1)
    import torch.distributed as dist
    from batchgenerators.utilities.file_and_folder_operations import load_json

    from nnunet_ima_trainers import nnUNetTrainerIMA
    from nnunet_ima_trainers.adversarial import margin_digest

    pre = Path(env["nnUNet_preprocessed"]) / "Dataset999_Tiny"
    plans = load_json(str(pre / "nnUNetPlans.json"))
    plans["continue_training"] = False
    torch.manual_seed(0)  # the same initial weights on both ranks, as DDP's broadcast would make them
    trainer = nnUNetTrainerIMA(plans, "2d", 0, load_json(str(pre / "dataset.json")), device=torch.device("cpu"))
    trainer.initialize()
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=PG_TIMEOUT_S))
    try:
        _to_ddp(trainer, rank)
        trainer.on_train_epoch_start()
        calls, outputs = [], []
        _record_collectives(calls)
        for it in range(ITERATIONS):
            batch = _batch(trainer, rank, it)
            calls.append(f"iteration {it}")
            outputs.append(trainer.train_step(batch))
        attacked = trainer.epoch_stats.attacked
        trainer.on_train_epoch_end(outputs)  # merges the margins across ranks (a collective)
        weights = torch.cat([p.detach().flatten() for p in trainer.network.parameters()])
        torch.save({"attacked": attacked, "collectives": calls, "keys": list(trainer.margins.keys()),
                    "margins": trainer.margins.margins.clone(), "digest": margin_digest(trainer.margins),
                    "weights": weights}, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ima_step_under_ddp_makes_no_collective_in_the_attack(nnunet_tiny, tmp_path):
    env = {k: v for k, v in nnunet_tiny.env.items() if k.startswith("nnUNet_")}
    env.update(NNUNET_IMA_K="2", NNUNET_IMA_N="2", NNUNET_IMA_EPOCHS="1", NNUNET_IMA_ITERS=str(ITERATIONS),
               OMP_NUM_THREADS="1")
    ctx = mp.start_processes(_rank_main, args=(str(tmp_path / "pg"), env, str(tmp_path)), nprocs=WORLD,
                             join=False, start_method="spawn")
    try:
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        for proc in ctx.processes:
            proc.join(max(0.0, deadline - time.monotonic()))
        assert all(p.exitcode is not None for p in ctx.processes), "a rank hung (a collective inside the attack?)"
        assert ctx.join(0), "a rank failed"
    finally:
        for proc in ctx.processes:
            if proc.is_alive():
                proc.kill()
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD))
    assert r0["collectives"] == r1["collectives"]  # the same collective calls, same shapes, in the same order
    assert any(c.startswith("all_gather[") for c in r0["collectives"])  # the training loss did gather
    assert (r0["attacked"], r1["attacked"]) == (CORRECT[0] * ITERATIONS, 0)
    assert sorted(r0["keys"]) == sorted(r1["keys"]) and len(r0["keys"]) == WORLD * BATCH * ITERATIONS
    assert r0["digest"] == r1["digest"]
    order = [r1["keys"].index(k) for k in r0["keys"]]
    assert torch.equal(r0["margins"], r1["margins"][order])
    assert torch.equal(r0["weights"], r1["weights"])  # the gradient all-reduce kept the ranks in step
