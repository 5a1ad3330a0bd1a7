"""A rerun of the demo with changed settings rebuilds what they change, and only that.

No training here: ``nnunet-ima-train`` is replaced by a fake that writes a checkpoint whose content
depends on the settings it was given, so the decisions (reuse, retrain, refuse) are what is tested.
"""
import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from nnunet_ima_demo import records, runner
from nnunet_ima_demo.checks import DemoArgumentError
from nnunet_ima_demo.runner import add_arguments, build_dataset, checkpoint_path, train_models

STD, SAT, IMA = "nnUNetTrainerSTD", "nnUNetTrainerSAT", "nnUNetTrainerIMA"


def _args(tmp_path, *extra):
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(["--output", str(tmp_path), "--device", "cpu", *extra])


@pytest.fixture
def world(tmp_path, monkeypatch):
    """nnU-Net folders with the demo plans written, and a fake trainer that records what it trained."""
    env = {v: str(tmp_path / v) for v in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    pre = Path(env["nnUNet_preprocessed"]) / "Dataset990_MNIBrain"
    pre.mkdir(parents=True)
    plans = {"plans_name": "nnUNetPlans", "configurations": {"2d": {
        "data_identifier": "nnUNetPlans_2d", "batch_size": 2, "architecture": {"arch_kwargs": {
            "n_stages": 5, "features_per_stage": [32] * 5, "kernel_sizes": [[3, 3]] * 5, "strides": [[1, 1]] * 5,
            "n_conv_per_stage": [2] * 5, "n_conv_per_stage_decoder": [2] * 4}}}}}
    (pre / "nnUNetPlans.json").write_text(json.dumps(plans))
    trained, where = [], []

    def fake_train(cmd, tenv, log, show=None):
        trainer = cmd[cmd.index("-tr") + 1]
        trained.append(trainer)
        where.append((trainer, tenv["NNUNET_IMA_SEED"], Path(tenv["nnUNet_results"]).relative_to(tmp_path).as_posix()))
        ckpt = checkpoint_path(tenv, 990, trainer, cmd[cmd.index("-p") + 1])
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        ims = {k: v for k, v in tenv.items() if k.startswith("NNUNET_IMA_")}
        ckpt.write_text(json.dumps(ims, sort_keys=True))  # content follows the settings, as a real model's would

    monkeypatch.setattr(runner, "_stream", fake_train)

    def run(*extra, exported=None):
        args = _args(tmp_path, *extra)
        plans_name, sched = runner.choose_plans(args, env)
        trained.clear()
        where.clear()
        train_models(args, dict(env, **(exported or {})), plans_name, sched, tmp_path)
        return list(trained)

    run.where = where
    return run


def test_rerun_retrains_exactly_the_models_whose_settings_changed(world, capsys):
    assert world() == [STD, SAT, IMA]
    assert world() == []  # same settings: everything reused
    assert "trained model exists with these settings, skipping" in capsys.readouterr().out
    assert world("--delta", "2") == [IMA]  # only IMA reads delta
    assert "NNUNET_IMA_DELTA" not in capsys.readouterr().out  # the reason names the setting, not the variable
    assert world("--delta", "2", "--sat-eps", "3") == [SAT]
    out = world("--delta", "2", "--sat-eps", "3", "--epochs-adv", "4")
    assert out == [SAT, IMA]
    assert "settings EPOCHS 10 -> 4" in capsys.readouterr().out
    # a retrained standard model retrains the two that start from it (their start changed)
    assert world("--delta", "2", "--sat-eps", "3", "--epochs-adv", "4", "--epochs-std", "7") == [STD, SAT, IMA]
    assert "settings INIT_WEIGHTS changed" in capsys.readouterr().out
    # the demo network changed (plans): all three
    assert world("--delta", "2", "--sat-eps", "3", "--epochs-adv", "4", "--epochs-std", "7",
                 "--features", "4", "8") == [STD, SAT, IMA]
    assert "plans_2d changed" in capsys.readouterr().out


def test_seeds_repeats_and_the_fine_tuning_lr_retrain_what_they_change(world):
    assert world() == [STD, SAT, IMA] and {s for _, s, _ in world.where} == {"0"}  # the demo is seeded by default
    assert world("--initial-lr", "0.001") == [SAT, IMA]  # the fine-tuning's lr: STD keeps nnU-Net's
    assert world("--initial-lr", "0.001", "--seed", "4") == [STD, SAT, IMA]
    # two more seeds of SAT and IMA from the one STD, each in its own results folder; the first seed is reused
    assert world("--initial-lr", "0.001", "--seed", "4", "--repeats", "3") == [SAT, IMA, SAT, IMA]
    assert world.where == [(SAT, "5", "demo_repeats/seed_5/nnUNet_results"),
                           (IMA, "5", "demo_repeats/seed_5/nnUNet_results"),
                           (SAT, "6", "demo_repeats/seed_6/nnUNet_results"),
                           (IMA, "6", "demo_repeats/seed_6/nnUNet_results")]
    assert world("--initial-lr", "0.001", "--seed", "4", "--repeats", "3") == []


def test_a_model_without_a_record_or_with_overwrite_is_retrained(world, tmp_path, capsys):
    world()
    ckpt = checkpoint_path({"nnUNet_results": str(tmp_path / "nnUNet_results")}, 990, IMA, "nnUNetPlansDemo")
    (ckpt.parent / records.RECORD).unlink()  # an older demo's model, or a crash before the record
    assert world() == [IMA]
    assert "no record of its settings" in capsys.readouterr().out
    assert world("--overwrite") == [STD, SAT, IMA]
    # a setting the user exported counts for every model
    assert world(exported={"NNUNET_IMA_DICE_REDUCTION": "max"}) == [STD, SAT, IMA]


def _fake_cases(monkeypatch, calls):
    import nnunet_ima_demo.mni as mni

    def cases(resolution, slab=4):
        calls.append((resolution, slab))
        rng = np.random.default_rng(0)
        pair = lambda: (rng.random((slab, 6, 6)).astype(np.float32), rng.integers(0, 3, (slab, 6, 6)).astype(np.uint8))
        return {f"c{i}": pair() for i in range(5)}, {"t0": pair()}, (resolution,) * 3

    monkeypatch.setattr(mni, "mni_slab_cases", cases)


def test_a_dataset_built_with_other_settings_is_refused_or_rebuilt_with_overwrite(tmp_path, monkeypatch):
    calls = []
    _fake_cases(monkeypatch, calls)
    env = {v: str(tmp_path / v) for v in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}
    folder = build_dataset(env, 990, 3.0, 2)
    assert calls == [(3.0, 2)] and records.read(folder) == {"resolution": 3.0, "slab": 2}
    assert build_dataset(env, 990, 3.0, 2) == folder and len(calls) == 1  # same settings: reused
    stale = Path(env["nnUNet_preprocessed"]) / folder.name / "nnUNetPlans.json"
    stale.parent.mkdir(parents=True)
    stale.write_text("{}")
    with pytest.raises(DemoArgumentError) as e:
        build_dataset(env, 990, 6.0, 2)
    assert "--resolution" in str(e.value) and "--resolution 3.0 --slab 2" in str(e.value)
    assert "--overwrite" in str(e.value) and len(calls) == 1 and stale.exists()  # nothing touched
    with pytest.raises(DemoArgumentError, match="--slab"):
        build_dataset(env, 990, 3.0, 4)
    build_dataset(env, 990, 6.0, 2, overwrite=True)
    assert calls[-1] == (6.0, 2) and records.read(folder) == {"resolution": 6.0, "slab": 2}
    assert not stale.exists()  # the old preprocessed data went with it (planning runs again)
