"""Training loop shared by every method: data order, optimisation step, checkpoints, resume, DDP.

Determinism: the data order of epoch e is a fixed permutation (DistributedSampler seeded with the
run's seed, ``set_epoch(e)``), and the global RNGs are re-seeded from (seed, epoch, rank) at the
start of every epoch, so a run resumed from the checkpoint of epoch k repeats epochs k+1.. exactly
(same weights and margins as an uninterrupted run on CPU). RNG states are saved as well.

Checkpoints (``<out>/checkpoint.pt``, rank 0, every epoch) hold the model, the optimiser, the
method state (IMA's margins via ``MarginStore.state_dict``), RNG states, the epoch and the history;
they are written to a temporary file and moved into place with ``os.replace`` (atomic).
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

from . import distributed as ddp
from .datasets import Splits, collate
from .methods import Method, MethodConfig, Std, build_method
from .models import build_model

CHECKPOINT = "checkpoint.pt"


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
    init_from: str | None = None     # start from these weights (e.g. a pretrained STD checkpoint)
    std_warmup_epochs: int = 0       # clean epochs before the method starts (later paper, CIFAR-10)
    stop_after_epoch: int | None = None  # stop once this epoch (1-based) is done, as if killed
    progress: bool = True
    method_cfg: MethodConfig = field(default_factory=MethodConfig)


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


def save_atomic(obj, path: Path) -> None:
    """torch.save to ``path`` via a temporary file in the same folder and os.replace (atomic)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


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


def train(cfg: TrainConfig, splits: Splits) -> TrainResult:
    """Train ``cfg.method`` on ``splits.train``; checkpoint every epoch into ``cfg.out``.

    >>> result = train(TrainConfig(method="ima", epochs=5), load_dataset("moons"))
    >>> result.method.store.summary()
    """
    rank, world = ddp.init_from_env(cfg.device)
    device = torch.device(cfg.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / CHECKPOINT

    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, splits.num_classes, splits.in_shape).to(device)
    mcfg = replace(cfg.method_cfg, clip=splits.clip if cfg.method_cfg.clip is None else cfg.method_cfg.clip)
    method = build_method(cfg.method, mcfg)
    warm = Std(mcfg)
    opt = build_optimizer(cfg.optimizer, model.parameters(), cfg.lr, cfg.weight_decay)
    history: list = []
    start = 0
    if cfg.resume and ckpt_path.is_file():
        ck = load_checkpoint(ckpt_path, map_location=device)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        method.load_state_dict(ck["method"])
        set_rng_state(ck["rng"])
        history = ck["history"]
        start = ck["epoch"] + 1
        _say(cfg, f"resumed from {ckpt_path} after epoch {start}")
    elif cfg.init_from:
        ck = load_checkpoint(cfg.init_from, map_location=device)
        model.load_state_dict(ck["model"] if "model" in ck else ck)
        _say(cfg, f"initial weights from {cfg.init_from}")
    ddp.broadcast_model(model)

    sampler = DistributedSampler(splits.train, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed)
    loader = DataLoader(splits.train, batch_size=cfg.batch_size, sampler=sampler, num_workers=0, collate_fn=collate)
    meta = {"model": cfg.model, "num_classes": splits.num_classes, "in_shape": tuple(splits.in_shape),
            "dataset": splits.name, "method": cfg.method, "clip": splits.clip, "config": _plain(asdict(cfg))}
    for epoch in range(start, cfg.epochs):
        sampler.set_epoch(epoch)
        seed_epoch(cfg.seed, epoch, rank)
        active = warm if epoch < cfg.std_warmup_epochs else method
        active.start_epoch(epoch, cfg.epochs)
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
        active.end_epoch()
        ddp.average_buffers(model)
        if method.uses_margins and ddp.active():
            ddp.check_equal(margins_by_key(method.store), "IMA margins")
        rec = {"epoch": epoch + 1, "method": active.name, "loss": tot_loss / max(n, 1),
               "train_acc": tot_correct / max(n, 1), "seconds": time.perf_counter() - t0}
        if active.uses_margins:
            rec["margins"] = method.store.summary()
        history.append(rec)
        _say(cfg, f"[{cfg.method}] epoch {epoch + 1}/{cfg.epochs} loss {rec['loss']:.4f} "
                  f"train acc {rec['train_acc']:.4f} ({rec['seconds']:.1f}s)"
             + (f"; {method.summary()}" if active.uses_margins else ""))
        if ddp.is_main():
            state = {"epoch": epoch, "model": model.state_dict(), "optimizer": opt.state_dict(),
                     "method": method.state_dict(), "rng": rng_state(), "history": history, "meta": meta}
            save_atomic(state, ckpt_path)
            with open(out / "train_log.jsonl", "a") as f:
                f.write(json.dumps(_plain(rec)) + "\n")
        ddp.barrier()
        if cfg.stop_after_epoch is not None and epoch + 1 >= cfg.stop_after_epoch:
            break
    if ddp.active() and method.uses_margins:  # each rank's copy, for checking that they agree
        torch.save(method.store.state_dict(), out / f"margins_rank{rank}.pt")
    model.eval()
    return TrainResult(model, method, history, ckpt_path)


def _say(cfg: TrainConfig, msg: str) -> None:
    if ddp.is_main() and cfg.progress:
        tqdm.write(msg)


def _plain(obj):
    """JSON-friendly copy (tuples -> lists, tensors -> lists, NaN kept)."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    return obj
