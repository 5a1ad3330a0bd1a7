"""Trainer pieces that need no dataset: settings, registry, checkpoint writing, console helpers."""
from __future__ import annotations

import importlib.util
import json
import re

import numpy as np
import pytest
import torch

import nnunet_ima_trainers as trainers
from nnunet_ima_trainers import cli
from nnunet_ima.plumbing import atomic_torch_save, to_plain as plain
from nnunet_ima_trainers.config import ConfigError, generic_eps_max, load_config, paper_task


def cfg(name="Dataset999_Tiny", elements=32 * 32, is_2d=True, **env):
    return load_config(name, elements, is_2d, environ={f"NNUNET_IMA_{k.upper()}": str(v) for k, v in env.items()})


# ---------------------------------------------------------------------- settings
@pytest.mark.parametrize("name,delta,eps_max", [("Dataset002_Heart", 5, 20), ("Dataset004_Hippocampus", 2, 15),
                                                ("Dataset005_Prostate", 10, 40)])
def test_paper_defaults_per_task(name, delta, eps_max):
    c = cfg(name)
    assert (c.delta, c.eps_max, c.k, c.n, c.dice_threshold, c.norm) == (delta, eps_max, 20, 10, 0.6, "l2")
    assert c.expand_rule == "prediction"  # Algorithm 1 line 13: g(z~) = y
    assert c.attack_samples == "correct" and c.dice_reduction == "mean"  # Algorithm 1 attacks clean-correct samples
    assert c.sat_eps == eps_max and "paper" in c.sources["eps_max"]


def test_generic_default_and_3d():
    c = cfg("Dataset999_Tiny", elements=3072)
    assert c.eps_max == 3.0 and c.delta == 0.75  # CIFAR-10's eps on a CIFAR-sized patch, delta = eps_max / 4
    assert cfg("Dataset002_Heart", elements=8 * 32 * 32, is_2d=False).eps_max == generic_eps_max(8 * 32 * 32)
    assert paper_task("Dataset002_Heart") == "heart" and paper_task("Dataset999_Tiny") is None
    # eps_max set by the user: delta follows it instead of the task's paper value
    assert cfg("Dataset002_Heart", eps_max=40).delta == 10


def test_env_overrides_file_and_file_is_read(tmp_path):
    f = tmp_path / "ima.json"
    f.write_text(json.dumps({"eps_max": 8, "delta": 1, "k": 3, "norm": "linf", "epochs": 7}))
    c = load_config("Dataset999_Tiny", 1024, True, environ={"NNUNET_IMA_CONFIG": str(f), "NNUNET_IMA_K": "5"})
    assert (c.eps_max, c.delta, c.k, c.norm, c.epochs) == (8, 1, 5, "linf", 7)
    assert c.sources["k"] == "env NNUNET_IMA_K" and c.sources["eps_max"].startswith("file")
    assert "eps_max" in c.describe() and "env NNUNET_IMA_K" in c.describe()


def test_seed_and_initial_lr_are_read_and_unset_by_default():
    assert (cfg().seed, cfg().initial_lr) == (None, None)  # nnU-Net's behaviour: unseeded, its own 0.01
    c = cfg(seed=0, initial_lr="1e-3")
    assert (c.seed, c.initial_lr) == (0, 1e-3)


def test_trainer_defaults_lose_to_env():
    c = load_config("Dataset999_Tiny", 1024, True, trainer_defaults={"epochs": 50, "iters": 50},
                    environ={"NNUNET_IMA_EPOCHS": "2"})
    assert (c.epochs, c.iters) == (2, 50)


@pytest.mark.parametrize("env,message", [
    ({"eps_max": 0}, "eps_max must be > 0"),
    ({"eps_max": -1, "delta": 0.1}, "eps_max must be > 0"),
    ({"eps_max": 2, "delta": 3}, "delta must be <= eps_max"),
    ({"dice_threshold": 1.0}, "dice_threshold must be in (0, 1)"),
    ({"dice_threshold": 0}, "dice_threshold must be in (0, 1)"),
    ({"norm": "l3"}, "unknown norm 'l3'"),
    ({"expand_rule": "crossed"}, "unknown expand_rule 'crossed'"),
    ({"dice_reduction": "min"}, "unknown dice_reduction 'min'"),
    ({"attack_samples": "wrong"}, "unknown attack_samples 'wrong'"),
    ({"k": "abc"}, "NNUNET_IMA_K='abc' is not an integer"),
    ({"iters": 0}, "iters must be >= 1"),
    ({"seed": -1}, "seed must be an integer >= 0"),
    ({"seed": "1.5"}, "NNUNET_IMA_SEED='1.5' is not an integer"),
    ({"initial_lr": 0}, "initial_lr must be > 0"),
])
def test_bad_settings_one_clear_error(env, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        cfg(**env)


def test_all_problems_in_one_message(tmp_path):
    with pytest.raises(ConfigError) as e:
        cfg(eps_max=1, delta=2, dice_threshold=2, norm="l1")
    text = str(e.value)
    assert text.count(";") == 2 and "delta" in text and "dice_threshold" in text and "norm" in text
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"eps": 3}))
    with pytest.raises(ConfigError, match="unknown keys \\['eps'\\]"):
        load_config("x", 1, True, environ={"NNUNET_IMA_CONFIG": str(bad)})


# ---------------------------------------------------------------------- registry
@pytest.mark.parametrize("name", sorted(trainers.TRAINERS))
def test_every_trainer_is_an_nnunet_trainer_named_after_its_schedule(name):
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    cls = trainers.TRAINERS[name]
    assert issubclass(cls, nnUNetTrainer) and cls.__name__ == name
    m = re.fullmatch(r"nnUNetTrainer(STD|SAT|IMA)(?:_(\d+)epochs?)?(?:_(\d+)iters)?", name)
    assert m, name
    assert cls.epochs == (int(m[2]) if m[2] else None) and cls.iterations == (int(m[3]) if m[3] else None)
    assert cls.adversarial == (m[1] != "STD")
    assert "__init__" not in vars(cls) or cls is trainers.nnUNetTrainerSTD  # the signature is declared once


def test_ext_folder_reexports_every_trainer():
    import os

    files = [f for f in os.listdir(cli.EXT_DIR) if f.endswith(".py") and f != "__init__.py"]
    assert files == ["nnunet_ima_ext_trainers.py"]  # nnU-Net imports every module there
    spec = importlib.util.spec_from_file_location("nnunet_ima_ext_trainers", os.path.join(cli.EXT_DIR, files[0]))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for name, cls in trainers.TRAINERS.items():
        assert getattr(mod, name) is cls


def test_ext_path_and_print_env(monkeypatch, capsys):
    assert cli.ext_trainer_path(None) == cli.EXT_DIR
    assert cli.ext_trainer_path(f"/a:{cli.EXT_DIR}:/b") == f"{cli.EXT_DIR}:/a:/b"
    monkeypatch.setenv("nnUNet_extTrainer", "/mine")
    cli.print_env()
    assert capsys.readouterr().out.strip() == f"export nnUNet_extTrainer={cli.EXT_DIR}:/mine"


# ---------------------------------------------------------------------- checkpoint writing
def test_plain_checkpoint_loads_with_weights_only(tmp_path):
    ckpt = {"logging": {"mean_fg_dice": [np.float64(0.5)], "dice": [[np.float32(0.25)]]}, "_best_ema": np.float64(1),
            "device": torch.device("cpu"), "w": torch.ones(2), "axes": (0, 1)}
    path = str(tmp_path / "c.pth")
    atomic_torch_save(plain(ckpt), path)
    back = torch.load(path, weights_only=True)
    assert back["logging"]["dice"] == [[0.25]] and back["_best_ema"] == 1.0 and back["axes"] == (0, 1)
    assert type(back["logging"]["mean_fg_dice"][0]) is float


def test_crash_mid_save_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint_final.pth"
    atomic_torch_save({"v": 1}, str(path))

    def broken_save(obj, f):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        atomic_torch_save({"v": 2}, str(path))
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint_final.pth"]  # no temporary file left
