"""Training loop shared by every method: data order, optimisation step, checkpoints, resume, DDP.

Determinism: the data order of epoch e is a fixed permutation (DistributedSampler seeded with the
run's seed, ``set_epoch(e)``), and the global RNGs are re-seeded from (seed, epoch, rank) at the
start of every epoch, so a run resumed from the checkpoint of epoch k repeats epochs k+1.. exactly
(same weights and margins as an uninterrupted run on CPU). RNG states are saved as well.

Checkpoints (``<out>/checkpoint.pt``, rank 0, every epoch) hold the model, the optimiser, the
method state (IMA's margins via ``MarginStore.state_dict``), RNG states, the epoch and the history;
they are written atomically (``nnunet_ima.plumbing``). ``train_log.jsonl`` is rewritten from the
checkpoint's history at every save, so the two always agree; a folder with an old run is never
appended to (resume it, overwrite it, or get :class:`RunExistsError`).
"""
from __future__ import annotations

import json
import os
import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler
from tqdm.auto import tqdm

from nnunet_ima.plumbing import atomic_torch_save, atomic_write_text, to_plain

from . import distributed as ddp
from .datasets import Splits, collate
from .methods import Method, MethodConfig, Std, build_method
from .models import build_model

CHECKPOINT = "checkpoint.pt"
LOG = "train_log.jsonl"


@dataclass
class TrainConfig:
    method: str = "ima"
    model: str = "moons_mlp"
    epochs: int = 30
    batch_size: int = 128
    optimizer: str = "adam"          # "adam" | "adamw" | "sgd" (momentum 0.9)
    lr: float = 1e-3
    weight_decay: float = 0.0
    seed: int = 0
    device: str = "cpu"
    out: str = "runs/classify"
    resume: bool = False             # continue from <out>/checkpoint.pt if present
    overwrite: bool = False          # remove an old run's checkpoint and log in <out> and start again
    init_from: str | None = None     # start from these weights (e.g. a pretrained STD checkpoint)
    std_warmup_epochs: int = 0       # clean epochs before the method starts (later paper, CIFAR-10)
    stop_after_epoch: int | None = None  # stop once this epoch (1-based) is done, as if killed
    progress: bool = True
    method_cfg: MethodConfig = field(default_factory=MethodConfig)
    data: dict = field(default_factory=dict)  # how the data was loaded (saved in the checkpoint for eval)


@dataclass
class TrainResult:
    model: torch.nn.Module
    method: Method
    history: list
    checkpoint: Path


def build_optimizer(name: str, params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    raise ValueError(f"optimizer: unknown optimizer {name!r}; use adam, adamw or sgd")


def seed_epoch(seed: int, epoch: int, rank: int = 0) -> None:
    s = (seed * 1_000_003 + epoch * 7_919 + rank * 104_729) % (2**31)
    torch.manual_seed(s)
    np.random.seed(s)
    random.seed(s)


def rng_state() -> dict:
    """RNG states as tensors, lists and numbers only (so checkpoints load with weights_only=True)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_py = random.getstate()
    return {"torch": torch.get_rng_state(),
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
            "python": [version, list(internal), gauss_py]}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_py = state["python"]
    random.setstate((version, tuple(internal), gauss_py))


def load_checkpoint(path, map_location="cpu") -> dict:
    """Checkpoints hold tensors, numbers, strings, lists and dicts only: loaded with weights_only=True."""
    return torch.load(path, map_location=map_location, weights_only=True)


def model_from_checkpoint(path, device="cpu") -> tuple[torch.nn.Module, dict]:
    """Rebuild the model of a checkpoint written by :func:`train`; returns (model in eval mode, meta)."""
    ck = load_checkpoint(path)
    meta = ck["meta"]
    model = build_model(meta["model"], meta["num_classes"], meta["in_shape"])
    model.load_state_dict(ck["model"])
    return model.to(device).eval(), ck


def margins_by_key(store) -> torch.Tensor:
    """Margins ordered by sample id (a store's own order depends on which ids it saw first)."""
    keys = store.keys()
    order = sorted(range(len(keys)), key=lambda i: (isinstance(keys[i], str), keys[i]))
    return store.margins[torch.tensor(order, dtype=torch.long)] if keys else store.margins


class RunExistsError(FileExistsError):
    """``out`` already holds a training run and neither ``resume`` nor ``overwrite`` was asked for."""


def existing_run_files(out) -> list[str]:
    """Names of the files of a training run already in ``out`` (checkpoint, log)."""
    return [n for n in (CHECKPOINT, LOG) if (Path(out) / n).is_file()]


def _guard_out(cfg: TrainConfig, out: Path) -> None:
    """Refuse to mix a new run with an old one in ``out``: continue it (resume), start again
    (overwrite: the old checkpoint and log are removed first) or stop with :class:`RunExistsError`."""
    found = existing_run_files(out)
    if not found or (cfg.resume and CHECKPOINT in found):
        return
    if not cfg.overwrite and not cfg.resume:
        raise RunExistsError(f"{out} already holds a training run ({', '.join(found)}); pass resume=True "
                             "(--resume) to continue it or overwrite=True (--overwrite) to start again")
    ddp.barrier()  # every rank has looked before rank 0 removes anything
    if ddp.is_main():
        for n in found:
            (out / n).unlink()
    ddp.barrier()


def _device(cfg: TrainConfig) -> tuple[int, int, torch.device]:
    rank, world = ddp.init_from_env(cfg.device)
    device = torch.device(cfg.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return rank, world, device


def _build(cfg: TrainConfig, splits: Splits, device) -> tuple:
    """(model, method, clean warm-up method, optimiser), the model seeded with ``cfg.seed``."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, splits.num_classes, splits.in_shape).to(device)
    mcfg = replace(cfg.method_cfg, clip=splits.clip if cfg.method_cfg.clip is None else cfg.method_cfg.clip)
    method = build_method(cfg.method, mcfg)
    opt = build_optimizer(cfg.optimizer, model.parameters(), cfg.lr, cfg.weight_decay)
    return model, method, Std(mcfg), opt


def _restore(cfg: TrainConfig, ckpt_path: Path, model, opt, method, device) -> tuple[list, int]:
    """Resume from ``ckpt_path`` or load ``cfg.init_from`` weights; returns (history, first epoch)."""
    if cfg.resume and ckpt_path.is_file():
        ck = load_checkpoint(ckpt_path, map_location=device)
        if ck["meta"]["method"] != cfg.method:
            raise RunExistsError(f"{ckpt_path} is a {ck['meta']['method']!r} run, not {cfg.method!r}; "
                                 "choose another output folder")
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        method.load_state_dict(ck["method"])
        set_rng_state(ck["rng"])
        _say(cfg, f"resumed from {ckpt_path} after epoch {ck['epoch'] + 1}")
        return ck["history"], ck["epoch"] + 1
    if cfg.init_from:
        ck = load_checkpoint(cfg.init_from, map_location=device)
        model.load_state_dict(ck["model"] if "model" in ck else ck)
        _say(cfg, f"initial weights from {cfg.init_from}")
    return [], 0


def _run_epoch(cfg: TrainConfig, epoch: int, model, active: Method, opt, loader, device) -> dict:
    """One pass over ``loader`` with ``active``'s loss; returns the epoch record (summed over ranks)."""
    model.train()
    t0, tot_loss, tot_correct, n = time.perf_counter(), 0.0, 0, 0
    bar = tqdm(loader, desc=f"{cfg.method} epoch {epoch + 1}/{cfg.epochs}", leave=False,
               disable=not (cfg.progress and ddp.is_main()))
    for x, y, ids in bar:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        res = active.loss(model, x, y, ids)
        opt.zero_grad(set_to_none=True)
        res.loss.backward()
        ddp.average_gradients(model)
        opt.step()
        b = y.shape[0]
        tot_loss += float(res.loss.detach()) * b
        tot_correct += int((res.logits.detach().argmax(1) == y).sum())
        n += b
        bar.set_postfix(loss=f"{tot_loss / n:.4f}", acc=f"{tot_correct / n:.3f}")
    if ddp.active():  # epoch statistics over all ranks
        t = torch.tensor([tot_loss, tot_correct, n], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(t)
        tot_loss, tot_correct, n = float(t[0]), int(t[1]), int(t[2])
    return {"epoch": epoch + 1, "method": active.name, "loss": tot_loss / max(n, 1),
            "train_acc": tot_correct / max(n, 1), "seconds": time.perf_counter() - t0}


def _end_epoch(cfg: TrainConfig, rec: dict, model, active: Method, method: Method) -> None:
    """Merge per-rank state (margins, buffers), check the ranks agree, add margins to the record, log."""
    active.end_epoch()
    ddp.average_buffers(model)
    if method.uses_margins and ddp.active():
        ddp.check_equal(margins_by_key(method.store), "IMA margins")
    if active.uses_margins:
        rec["margins"] = method.store.summary()
    _say(cfg, f"[{cfg.method}] epoch {rec['epoch']}/{cfg.epochs} loss {rec['loss']:.4f} "
              f"train acc {rec['train_acc']:.4f} ({rec['seconds']:.1f}s)"
         + (f"; {method.summary()}" if active.uses_margins else ""))


def _save(out: Path, epoch: int, model, opt, method: Method, history: list, meta: dict) -> None:
    """Checkpoint and log (rewritten from the history, so they always agree; both atomic)."""
    out.mkdir(parents=True, exist_ok=True)
    state = {"epoch": epoch, "model": model.state_dict(), "optimizer": opt.state_dict(),
             "method": method.state_dict(), "rng": rng_state(), "history": history, "meta": meta}
    atomic_torch_save(state, out / CHECKPOINT)
    atomic_write_text(out / LOG, "".join(json.dumps(to_plain(r, for_json=True)) + "\n" for r in history))


def train(cfg: TrainConfig, splits: Splits) -> TrainResult:
    """Train ``cfg.method`` on ``splits.train``; checkpoint every epoch into ``cfg.out``.

    An ``out`` that already holds a run is continued (``resume``), started again (``overwrite``) or
    refused (:class:`RunExistsError`), never appended to.

    >>> result = train(TrainConfig(method="ima", epochs=5), load_dataset("moons"))
    >>> result.method.store.summary()
    """
    rank, world, device = _device(cfg)
    out = Path(cfg.out)
    _guard_out(cfg, out)
    model, method, warm, opt = _build(cfg, splits, device)
    history, start = _restore(cfg, out / CHECKPOINT, model, opt, method, device)
    ddp.broadcast_model(model)
    sampler = DistributedSampler(splits.train, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed)
    loader = DataLoader(splits.train, batch_size=cfg.batch_size, sampler=sampler, num_workers=0, collate_fn=collate)
    meta = {"model": cfg.model, "num_classes": splits.num_classes, "in_shape": tuple(splits.in_shape),
            "dataset": splits.name, "method": cfg.method, "clip": splits.clip, "split_digest": splits.split_digest,
            "data": to_plain(cfg.data, for_json=True), "config": to_plain(asdict(cfg), for_json=True)}
    for epoch in range(start, cfg.epochs):
        sampler.set_epoch(epoch)
        seed_epoch(cfg.seed, epoch, rank)
        active = warm if epoch < cfg.std_warmup_epochs else method
        active.start_epoch(epoch, cfg.epochs)
        rec = _run_epoch(cfg, epoch, model, active, opt, loader, device)
        _end_epoch(cfg, rec, model, active, method)
        history.append(rec)
        if ddp.is_main():
            _save(out, epoch, model, opt, method, history, meta)
        ddp.barrier()
        if cfg.stop_after_epoch is not None and epoch + 1 >= cfg.stop_after_epoch:
            break
    if ddp.active() and method.uses_margins:  # each rank's copy, for checking that they agree
        out.mkdir(parents=True, exist_ok=True)
        torch.save(method.store.state_dict(), out / f"margins_rank{rank}.pt")
    model.eval()
    return TrainResult(model, method, history, out / CHECKPOINT)


def _say(cfg: TrainConfig, msg: str) -> None:
    if ddp.is_main() and cfg.progress:
        tqdm.write(msg)
