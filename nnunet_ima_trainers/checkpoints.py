"""Reading nnU-Net checkpoints without unpickling arbitrary objects, and saying clearly what a
checkpoint holds when it does not fit the trainer that reads it.

A checkpoint written by stock ``nnUNetTrainer.save_checkpoint`` (nnU-Net 2.8.1) holds, besides
tensors, dicts, lists, strings and a ``torch.device``, numpy scalars: ``_best_ema`` and the logger's
``mean_fg_dice`` / ``ema_fg_dice`` / ``dice_per_class_or_region`` / ``train_losses`` / ``val_losses``
are ``np.float32``. ``torch.load(weights_only=True)`` refuses those unless numpy's scalar
constructor and dtypes are allow-listed; :func:`read_checkpoint` allows exactly these (and plain
numpy arrays) and nothing else, so a checkpoint that holds any other object is refused, not run.
"""
from __future__ import annotations

import hashlib
import os
import re

import numpy as np
import torch

from .config import ConfigError


def numpy_safe_globals() -> list:
    """The numpy names a stock nnU-Net checkpoint needs: the scalar constructor, ``np.dtype`` and its
    per-type classes (numpy >= 1.25 pickles ``np.float32`` scalars with ``Float32DType``), plus the
    plain-array constructor. None of them can call arbitrary code."""
    core = getattr(np, "_core", None) or np.core  # numpy 2 / numpy 1
    names = [core.multiarray.scalar, core.multiarray._reconstruct, np.ndarray, np.dtype]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        names += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType")]
    return names


def read_checkpoint(path: str, setting: str = "init_weights", map_location="cpu") -> dict:
    """The checkpoint dict at ``path``, loaded with ``torch.load(weights_only=True)`` plus
    :func:`numpy_safe_globals`. Anything that is not a readable nnU-Net checkpoint (no such file, a
    text file, a damaged file, a pickle of other objects, a dict without ``network_weights``) is one
    :class:`ConfigError` naming ``setting`` and the path."""
    where = f"{setting}={path}"
    if os.path.isdir(path):
        raise ConfigError(f"{where}: a directory, not a checkpoint file")
    if not os.path.isfile(path):
        raise ConfigError(f"{where}: no such file")
    try:
        with torch.serialization.safe_globals(numpy_safe_globals()):
            checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises UnpicklingError, RuntimeError, EOFError, KeyError, OSError ...
        raise ConfigError(f"{where}: not an nnU-Net checkpoint ({_why_unreadable(e)})") from None
    if not isinstance(checkpoint, dict) or "network_weights" not in checkpoint:
        held = sorted(map(str, checkpoint))[:5] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ConfigError(f"{where}: not an nnU-Net checkpoint (no 'network_weights' entry; it holds {held})")
    return checkpoint


def _why_unreadable(error: Exception) -> str:
    """One short reason for a failed ``torch.load``, without PyTorch's ``weights_only=False`` advice."""
    text = str(error)
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text) or re.search(
        r"got <class '([\w.]+)'>", text)
    if found:
        return f"it contains a {found[1]} object, which an nnU-Net checkpoint never holds; not unpickled"
    if isinstance(error, (EOFError, KeyError, OSError)) or "zip archive" in text or "invalid load key" in text:
        return "not a file written by torch.save, or a truncated one"
    line = next((s.strip() for s in text.splitlines() if s.strip() and "weights_only" not in s), "")
    return f"{type(error).__name__}: {line[:200]}" if line else type(error).__name__


def describe_checkpoint(checkpoint: dict) -> str:
    """'trainer T, dataset D, configuration C, plans P' from a checkpoint's ``init_args``."""
    args = checkpoint.get("init_args") or {}
    plans = args.get("plans") or {}
    return (f"trainer {checkpoint.get('trainer_name', '?')}, dataset {plans.get('dataset_name', '?')}, "
            f"configuration {args.get('configuration', '?')}, plans {plans.get('plans_name', '?')}")


def weight_mismatches(own: dict, loaded: dict) -> list[str]:
    """What differs between two state dicts (bare keys): missing / unexpected keys and shapes."""
    missing = [f"{k} missing" for k in own if k not in loaded]
    extra = [f"{k} not in this network" for k in loaded if k not in own]
    shapes = [f"{k} {tuple(loaded[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in loaded and tuple(loaded[k].shape) != tuple(own[k].shape)]
    return shapes + missing + extra


def state_digest(state) -> str:
    """16-hex fingerprint of plain checkpoint state (dicts, lists, tuples, tensors, numbers, strings,
    None): equal digests = equal state, exactly (tensor dtype, shape and bytes; float reprs)."""
    h = hashlib.sha1()
    _feed(h, state)
    return h.hexdigest()[:16]


def _feed(h, obj) -> None:
    if isinstance(obj, dict):
        h.update(b"{")
        for k in sorted(obj, key=str):
            _feed(h, str(k))
            _feed(h, obj[k])
        h.update(b"}")
    elif isinstance(obj, (list, tuple)):
        h.update(b"[" if isinstance(obj, list) else b"(")
        for v in obj:
            _feed(h, v)
        h.update(b"]")
    elif isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.flatten().view(torch.uint8).numpy().tobytes())
    else:
        h.update(f"{type(obj).__name__}:{obj!r};".encode())


TIMESTAMPS = ("epoch_start_timestamps", "epoch_end_timestamps")  # the logger's wall-clock entries
SETTINGS_KEY = "nnunet_ima_settings"  # the run's settings (seed included), as its training log states them


def training_digest(checkpoint: dict) -> str:
    """Fingerprint of what a training run produced, as a checkpoint holds it: network weights, optimizer
    and GradScaler state, epoch, the logger's losses, learning rates and Dice (its wall-clock timestamps
    left out) and every extra entry (IMA's margins). Two runs with one seed on one machine give one
    digest; ``init_args`` and the settings record are left out (they hold paths, not results)."""
    skip = {"init_args", "trainer_name", SETTINGS_KEY, "inference_allowed_mirroring_axes", "logging"}
    state = {k: v for k, v in checkpoint.items() if k not in skip}
    state["logging"] = {k: v for k, v in (checkpoint.get("logging") or {}).items() if k not in TIMESTAMPS}
    return state_digest(state)


def bare_keys(weights: dict) -> dict:
    """State-dict keys without the DDP ("module.") and torch.compile ("_orig_mod.") prefixes."""
    return {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in weights.items()}


def refuse_unfitting(path: str, checkpoint: dict, own: dict, builds: str) -> None:
    """ConfigError unless the weights of ``checkpoint`` (setting init_weights=``path``) fit the state dict
    ``own`` of the network this run builds (described as ``builds``)."""
    problems = weight_mismatches(own, bare_keys(checkpoint["network_weights"]))
    if problems:
        raise ConfigError(
            f"init_weights={path}: not a checkpoint of this network. The checkpoint holds "
            f"{describe_checkpoint(checkpoint)}; this run builds {builds} ({len(problems)} mismatched "
            f"weights, e.g. {'; '.join(problems[:3])}). Same plans, configuration and architecture needed; to "
            "transfer between datasets use nnU-Net's -pretrained_weights instead")


def fitting_init_weights(trainer_cls, path: str | None, plans: dict, configuration: str, dataset_json: dict):
    """The checkpoint ``init_weights`` names (read on the CPU), or None when unset; ConfigError unless its
    weights fit the network ``trainer_cls`` builds from ``plans`` (built here once with the trainer's own
    ``build_network_architecture``), so a trainer can refuse it before nnU-Net creates its output folder.

    >>> checkpoint = fitting_init_weights(nnUNetTrainerIMA, "std/checkpoint_final.pth", plans, "2d", dataset_json)
    """
    if not path:
        return None
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    checkpoint = read_checkpoint(path, "init_weights", map_location="cpu")
    pm = PlansManager(plans)
    cm = pm.get_configuration(configuration)
    net = trainer_cls.build_network_architecture(pm, cm, determine_num_input_channels(pm, cm, dataset_json),
                                                 pm.get_label_manager(dataset_json).num_segmentation_heads, True)
    builds = f"trainer {trainer_cls.__name__}, dataset {pm.dataset_name}, configuration {configuration}, plans " \
             f"{pm.plans_name}"
    refuse_unfitting(path, checkpoint, net.state_dict(), builds)
    return checkpoint
