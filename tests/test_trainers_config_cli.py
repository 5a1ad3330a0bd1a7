"""Trainer settings and console plumbing: the predicate's class reduction and the attacked samples,
misspelt NNUNET_IMA_* variables, init_weights that is not a checkpoint, one trainer-path helper,
and a bad setting inside the real ``nnUNetv2_train`` printing one line without a traceback."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import nnunet_ima_trainers
from nnunet_ima_trainers import cli
from nnunet_ima_trainers.config import ENV_NAMES, ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


def cfg(environ=None, name="Dataset999_Tiny", **kw):
    return load_config(name, 32 * 32, True, environ=environ or {}, **kw)


# ---------------------------------------------------------------------- the two new settings
def test_reduction_and_attacked_samples_defaults_env_file_and_log(tmp_path):
    c = cfg()
    assert (c.dice_reduction, c.attack_samples) == ("mean", "correct")  # Algorithm 1: attack clean-correct only
    c = cfg({"NNUNET_IMA_DICE_REDUCTION": " MAX ", "NNUNET_IMA_ATTACK_SAMPLES": "All"})
    assert (c.dice_reduction, c.attack_samples) == ("max", "all")
    assert re.search(r"dice_reduction\s+= max\s+\(env NNUNET_IMA_DICE_REDUCTION\)", c.describe())
    assert re.search(r"attack_samples\s+= all\s+\(env NNUNET_IMA_ATTACK_SAMPLES\)", c.describe())
    f = tmp_path / "ima.json"
    f.write_text(json.dumps({"dice_reduction": "max", "attack_samples": "all"}))
    c = cfg({"NNUNET_IMA_CONFIG": str(f), "NNUNET_IMA_ATTACK_SAMPLES": "correct"})
    assert (c.dice_reduction, c.attack_samples) == ("max", "correct")
    assert c.sources["dice_reduction"] == f"file {f}" and c.sources["attack_samples"].startswith("env")


@pytest.mark.parametrize("var,value,message", [
    ("NNUNET_IMA_DICE_REDUCTION", "median", "unknown dice_reduction 'median' (from env NNUNET_IMA_DICE_REDUCTION), "
                                            "known: ['mean', 'max']"),
    ("NNUNET_IMA_ATTACK_SAMPLES", "wrong", "unknown attack_samples 'wrong' (from env NNUNET_IMA_ATTACK_SAMPLES), "
                                           "known: ['correct', 'all']"),
    ("NNUNET_IMA_EXPAND_RULE", "later", "unknown expand_rule 'later'"),  # the one name: prediction | no_crossing
])
def test_new_choices_are_validated(var, value, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        cfg({var: value})
    assert cfg({"NNUNET_IMA_EXPAND_RULE": "no_crossing"}).expand_rule == "no_crossing"


def test_file_beats_trainer_class():
    """The four layers in order: env > file > trainer class > default (file vs trainer was untested)."""
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({"epochs": 3}, f)
    try:
        c = cfg({"NNUNET_IMA_CONFIG": f.name}, trainer_defaults={"epochs": 50, "iters": 50})
    finally:
        os.unlink(f.name)
    assert (c.epochs, c.iters, c.k) == (3, 50, 20)
    assert c.sources["epochs"].startswith("file") and c.sources["iters"] == "trainer class" and "k" not in c.sources


# ---------------------------------------------------------------------- misspelt variables
def test_misspelt_variable_is_refused_naming_the_closest_key():
    with pytest.raises(ConfigError) as e:
        cfg({"NNUNET_IMA_EPSMAX": "3"})
    assert "unknown variable NNUNET_IMA_EPSMAX (did you mean NNUNET_IMA_EPS_MAX?)" in str(e.value)
    with pytest.raises(ConfigError, match=re.escape("unknown variable nnunet_ima_k (did you mean NNUNET_IMA_K?)")):
        cfg({"nnunet_ima_k": "5"})
    with pytest.raises(ConfigError) as e:  # nothing close: the known names are listed; other errors come along
        cfg({"NNUNET_IMA_WHATEVER": "1", "NNUNET_IMA_K": "x"})
    assert "unknown variable NNUNET_IMA_WHATEVER (known: NNUNET_IMA_ATTACK_SAMPLES," in str(e.value)
    assert "NNUNET_IMA_K='x' is not an integer" in str(e.value) and "\n" not in str(e.value)


def test_json_unknown_key_names_the_closest_key(tmp_path):
    f = tmp_path / "ima.json"
    f.write_text(json.dumps({"epsmax": 3, "dice_reductoin": "max"}))
    with pytest.raises(ConfigError, match=re.escape("did you mean dice_reductoin -> dice_reduction, "
                                                    "epsmax -> eps_max?")):
        cfg({"NNUNET_IMA_CONFIG": str(f)})


def test_every_nnunet_ima_variable_the_project_uses_is_accepted(tmp_path):
    """Scan code, tests, benchmarks, README and docs for NNUNET_IMA_<NAME>: each is read by the
    trainers (so refusing unknown names breaks nothing legitimate), and all of them at once load."""
    used = set()
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not (d.startswith(".") or d.endswith(".egg-info") or d == "__pycache__")]
        for name in files:
            if name.endswith((".py", ".md", ".sh", ".cfg", ".toml", ".txt")) and name != Path(__file__).name:
                text = Path(folder, name).read_text(errors="replace")  # (this file spells names wrong on purpose)
                used |= set(re.findall(r"NNUNET_IMA_[A-Za-z0-9_]*[A-Za-z0-9]", text))
    assert {"NNUNET_IMA_CONFIG", "NNUNET_IMA_EPS_MAX", "NNUNET_IMA_INIT_WEIGHTS"} <= used  # the scan found them
    used.discard("NNUNET_IMA_EPSMAX")  # README's example of a misspelt name (refused, as it says)
    assert used <= ENV_NAMES, sorted(used - ENV_NAMES)
    ckpt = tmp_path / "c.pth"
    torch.save({"network_weights": {}}, ckpt)
    (tmp_path / "ima.json").write_text("{}")
    good = {"NNUNET_IMA_EPS_MAX": "4", "NNUNET_IMA_DELTA": "1", "NNUNET_IMA_K": "3", "NNUNET_IMA_N": "2",
            "NNUNET_IMA_DICE_THRESHOLD": "0.5", "NNUNET_IMA_DICE_REDUCTION": "max", "NNUNET_IMA_ATTACK_SAMPLES": "all",
            "NNUNET_IMA_NORM": "linf", "NNUNET_IMA_EXPAND_RULE": "no_crossing", "NNUNET_IMA_SAT_EPS": "2",
            "NNUNET_IMA_EPOCHS": "1", "NNUNET_IMA_ITERS": "2", "NNUNET_IMA_VAL_ITERS": "1",
            "NNUNET_IMA_INIT_WEIGHTS": str(ckpt), "NNUNET_IMA_CONFIG": str(tmp_path / "ima.json"),
            "NNUNET_IMA_SEED": "7", "NNUNET_IMA_INITIAL_LR": "0.02"}
    assert set(good) == ENV_NAMES
    c = cfg(good)
    assert all(s.startswith("env") for k, s in c.sources.items()) and len(c.sources) == len(ENV_NAMES) - 1


# ---------------------------------------------------------------------- init_weights
def test_init_weights_that_is_not_a_checkpoint_is_one_clear_error(tmp_path):
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    with pytest.raises(ConfigError, match=re.escape(f"init_weights: {text} is not a PyTorch checkpoint")):
        cfg({"NNUNET_IMA_INIT_WEIGHTS": str(text)})
    with pytest.raises(ConfigError, match="init_weights: no such file"):
        cfg({"NNUNET_IMA_INIT_WEIGHTS": str(tmp_path / "missing.pth")})
    for legacy in (False, True):
        path = tmp_path / f"ok_{legacy}.pth"
        torch.save({"network_weights": {"w": torch.ones(1)}}, path, _use_new_zipfile_serialization=not legacy)
        assert cfg({"NNUNET_IMA_INIT_WEIGHTS": str(path)}).init_weights == str(path)


def test_init_weights_naming_a_directory_says_so(tmp_path):
    with pytest.raises(ConfigError, match=re.escape(f"init_weights: {tmp_path} is a directory, not a checkpoint file")):
        cfg({"NNUNET_IMA_INIT_WEIGHTS": str(tmp_path)})


# ---------------------------------------------------------------------- several problems, JSON types (issue 24)
def test_problems_of_every_kind_are_reported_together(tmp_path):
    """A value that does not parse, one out of range and one in the file: one message with all three."""
    f = tmp_path / "ima.json"
    f.write_text(json.dumps({"dice_threshold": 3}))
    with pytest.raises(ConfigError) as e:
        cfg({"NNUNET_IMA_K": "abc", "NNUNET_IMA_DELTA": "-1", "NNUNET_IMA_CONFIG": str(f)})
    text = str(e.value)
    assert "NNUNET_IMA_K='abc' is not an integer" in text and "delta must be > 0" in text
    assert "dice_threshold must be in (0, 1)" in text and text.count(";") == 2


@pytest.mark.parametrize("key", ["k", "n", "epochs", "seed", "eps_max", "delta"])
def test_json_true_is_not_a_number(tmp_path, key):
    f = tmp_path / "ima.json"
    f.write_text(json.dumps({key: True}))
    with pytest.raises(ConfigError, match=re.escape(f"{f}:{key}=True is not")):
        cfg({"NNUNET_IMA_CONFIG": str(f)})


# ---------------------------------------------------------------------- trainer path and excepthook
def test_register_ext_trainers_prepends_once_and_returns_the_value(monkeypatch):
    monkeypatch.setenv("nnUNet_extTrainer", os.pathsep.join(["/mine", nnunet_ima_trainers.EXT_DIR, "/other"]))
    value = nnunet_ima_trainers.register_ext_trainers()
    assert value == os.environ["nnUNet_extTrainer"] == os.pathsep.join([cli.EXT_DIR, "/mine", "/other"])
    assert nnunet_ima_trainers.register_ext_trainers() == value  # idempotent
    monkeypatch.delenv("nnUNet_extTrainer")
    assert nnunet_ima_trainers.register_ext_trainers() == cli.EXT_DIR
    assert cli.register_ext_trainers is nnunet_ima_trainers.register_ext_trainers  # one helper


def test_importing_the_package_is_cheap_and_leaves_the_excepthook():
    """register_ext_trainers / nnunet-ima-env need no torch; trainers load on first use; importing the
    package (or its console scripts' module) does not replace sys.excepthook for the whole process."""
    code = ("import sys, nnunet_ima_trainers as t, nnunet_ima_trainers.cli; "
            "assert 'torch' not in sys.modules, 'torch imported'; "
            "assert sys.excepthook is sys.__excepthook__, 'excepthook replaced'; t.register_ext_trainers(); "
            "nnunet_ima_trainers.cli.print_env(); assert 'torch' not in sys.modules, 'torch imported'; print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip().splitlines()[-1] == "ok", proc.stderr


def test_the_module_nnunet_imports_from_the_ext_folder_installs_the_hook(monkeypatch):
    """What nnU-Net's trainer lookup does in nnUNetv2_train: put the ext folder on sys.path and import
    its modules under top-level names. That import, not the package's, installs the hook."""
    import importlib
    import pkgutil

    monkeypatch.setattr(sys, "excepthook", sys.__excepthook__)
    monkeypatch.syspath_prepend(nnunet_ima_trainers.EXT_DIR)
    names = [m.name for m in pkgutil.iter_modules([nnunet_ima_trainers.EXT_DIR])]
    assert names == ["nnunet_ima_ext_trainers"]
    monkeypatch.delitem(sys.modules, names[0], raising=False)
    module = importlib.import_module(names[0])
    assert module.nnUNetTrainerIMA is nnunet_ima_trainers.nnUNetTrainerIMA
    assert sys.excepthook.nnunet_ima_config_errors and sys.excepthook is not sys.__excepthook__
    monkeypatch.delitem(sys.modules, names[0])


def test_hook_prints_config_error_as_one_line_and_passes_the_rest_on(capsys, monkeypatch):
    seen = []
    hook = nnunet_ima_trainers._config_error_hook(lambda *exc: seen.append(exc[0]))
    monkeypatch.setattr(sys, "argv", ["/somewhere/nnUNetv2_train", "4"])
    try:
        cfg({"NNUNET_IMA_EPS_MAX": "-1"})
    except ConfigError as e:
        hook(type(e), e, e.__traceback__)
    assert capsys.readouterr().err == ("nnUNetv2_train: error: invalid nnunet-ima trainer settings: eps_max must be "
                                       "> 0, got -1.0 (from env NNUNET_IMA_EPS_MAX)\n")
    hook(KeyError, KeyError("x"), None)
    assert seen == [KeyError] and capsys.readouterr().err == ""


def _raised(error: Exception) -> Exception:
    try:
        raise error
    except Exception as e:
        return e


@pytest.mark.parametrize("where", ["this process", "a -num_gpus worker"])
def test_nnunet_ima_train_exits_2_with_one_line(where, monkeypatch, capsys):
    """nnunet-ima-train: a ConfigError, also one a DDP worker raised (torch brings it back as traceback
    text in ProcessRaisedException), is one line and exit 2; any other error keeps its traceback."""
    import traceback
    import types

    from torch.multiprocessing import ProcessRaisedException

    error = _raised(ConfigError("invalid nnunet-ima trainer settings: eps_max must be > 0, got -1.0"))
    if where != "this process":
        trace = "".join(traceback.format_exception(error))  # what torch's spawn._wrap pickles in the worker
        error = ProcessRaisedException(f"\n\n-- Process 1 terminated with the following error:\n{trace}", 1, 4242)

    def run_training_entry():
        raise error

    run_training = types.ModuleType("nnunetv2.run.run_training")  # instead of nnU-Net's (3 s of imports)
    run_training.run_training_entry = run_training_entry
    monkeypatch.setitem(sys.modules, "nnunetv2.run.run_training", run_training)
    monkeypatch.delenv("nnUNet_extTrainer", raising=False)
    with pytest.raises(SystemExit) as e:
        cli.train_entry()
    assert e.value.code == 2 and os.environ["nnUNet_extTrainer"] == cli.EXT_DIR
    assert capsys.readouterr().err == "nnunet-ima-train: error: invalid nnunet-ima trainer settings: eps_max must " \
                                      "be > 0, got -1.0\n"
    other = ProcessRaisedException("\n\n-- Process 0 terminated with the following error:\nKeyError: 'x'\n", 0, 1)
    monkeypatch.setattr(run_training, "run_training_entry", lambda: (_ for _ in ()).throw(other))
    with pytest.raises(ProcessRaisedException):
        cli.train_entry()


# ---------------------------------------------------------------------- the real console scripts
def _script(name: str) -> str:
    exe = Path(sys.executable).with_name(name)
    return str(exe) if exe.exists() else name


@pytest.mark.slow
def test_bad_setting_inside_real_nnunetv2_train_is_one_message(nnunet_tiny, tmp_path):
    """README's workflow: eval "$(nnunet-ima-env)"; nnUNetv2_train ... -tr nnUNetTrainerIMA. A bad value
    stops it before any training with one line on stderr, no traceback, non-zero exit (about 7 s of CPU:
    nnU-Net's trainer lookup imports its own trainer modules first). nnunet-ima-train's exit 2 with one
    line: tests/test_trainers_e2e.py::test_bad_settings_stop_before_any_epoch."""
    env = {k: v for k, v in nnunet_tiny.env.items() if not k.upper().startswith("NNUNET_IMA_")}
    env.update(nnUNet_results=str(tmp_path / "results"), nnUNet_extTrainer=cli.ext_trainer_path(),
               OMP_NUM_THREADS="1", NNUNET_IMA_EPS_MAX="-1")
    proc = subprocess.run([_script("nnUNetv2_train"), "999", "2d", "0", "-tr", "nnUNetTrainerIMA", "-device", "cpu"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-3000:]
    assert "Using trainer 'nnUNetTrainerIMA'" in proc.stdout and "Epoch 0" not in proc.stdout  # ours, before training
    message = ("nnUNetv2_train: error: invalid nnunet-ima trainer settings: eps_max must be > 0, got -1.0 "
               "(from env NNUNET_IMA_EPS_MAX)")
    assert [line for line in proc.stderr.splitlines() if "nnunet-ima" in line] == [message]
    assert proc.stderr.rstrip().splitlines()[-1] == message
    assert not (tmp_path / "results").exists()  # nothing was created
