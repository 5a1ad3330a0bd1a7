"""The real nnU-Net pipeline: ``nnUNetv2_train`` / ``nnunet-ima-train`` -> ``--c`` -> ``nnUNetv2_predict``
on the tiny generated dataset (planned and preprocessed by the real ``nnUNetv2_plan_and_preprocess``
in the ``nnunet_tiny`` fixture), with a very short schedule."""
from __future__ import annotations

import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from nnunet_ima import MarginStore
from nnunet_ima_demo.nnunet_data import nnunet_command
from nnunet_ima_trainers import cli
from nnunet_ima_trainers.adversarial import margin_digest

pytestmark = pytest.mark.slow

SHORT = {"NNUNET_IMA_EPOCHS": "1", "NNUNET_IMA_ITERS": "2", "NNUNET_IMA_VAL_ITERS": "1", "NNUNET_IMA_K": "2",
         "NNUNET_IMA_N": "2", "NNUNET_IMA_DICE_THRESHOLD": "0.01"}


@pytest.fixture(scope="module")
def env(nnunet_tiny, tmp_path_factory):
    """Tiny dataset, this module's own results folder, short schedule, no nnUNet_extTrainer."""
    e = {k: v for k, v in nnunet_tiny.env.items() if not k.startswith("NNUNET_IMA_") and k != "nnUNet_extTrainer"}
    e.update(SHORT, nnUNet_results=str(tmp_path_factory.mktemp("results")), nnUNet_def_n_proc="1",
             OMP_WAIT_POLICY="PASSIVE")  # no OpenMP spinning: 2 cores shared with other jobs
    e["tiny_raw"] = str(nnunet_tiny.raw)
    _write_splits(nnunet_tiny.preprocessed)  # before 2d and 3d runs go in parallel (each would write it)
    return e


def _write_splits(preprocessed: Path) -> None:
    """nnU-Net's own default split file (seeded 5-fold), exactly as nnUNetTrainer.do_split writes it."""
    from batchgenerators.utilities.file_and_folder_operations import save_json
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    path = preprocessed / "splits_final.json"
    if not path.exists():
        cases = sorted(p.name[:-len(".nii.gz")] for p in (preprocessed / "gt_segmentations").glob("*.nii.gz"))
        save_json(generate_crossval_split(cases, seed=12345, n_splits=5), str(path))


def run(cmd: str, env: dict, *args: str, ext: bool = False, **extra) -> subprocess.CompletedProcess:
    e = {**env, **extra}
    if ext:  # what the README tells users: eval "$(nnunet-ima-env)"
        e["nnUNet_extTrainer"] = cli.ext_trainer_path()
    return subprocess.run(nnunet_command(cmd) + list(args), env=e, capture_output=True, text=True, timeout=600)


def ok(proc: subprocess.CompletedProcess) -> str:
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    return out


def fold_dir(env, trainer, configuration) -> Path:
    return Path(env["nnUNet_results"]) / "Dataset999_Tiny" / f"{trainer}__nnUNetPlans__{configuration}" / "fold_0"


def saved_margins(path: Path) -> MarginStore:
    return MarginStore.from_state_dict(torch.load(path, weights_only=True)["ima_margins"])


def train_first(env, cmd, configuration, **kw):
    """One epoch; checks the artefacts; keeps a copy of the final checkpoint. -> (fold, margins, copy)."""
    out = ok(run(cmd, env, "999", configuration, "0", "-tr", "nnUNetTrainerIMA", "-device", "cpu", **kw))
    fold = fold_dir(env, "nnUNetTrainerIMA", configuration)
    for name in ("progress.png", "margins.png", "checkpoint_final.pth"):
        assert (fold / name).is_file(), name
    log = next(fold.glob("training_log_*.txt")).read_text()
    assert "IMA margins (n=" in log and "crossed" in log and "suggested eps for nnUNetTrainerSAT" in log
    assert "NNUNET_IMA_K" in log and "Mean Validation Dice" in out  # settings logged; final validation ran
    store = saved_margins(fold / "checkpoint_final.pth")
    assert len(store) > 0
    shutil.copy(fold / "checkpoint_final.pth", fold / "after_epoch_1.pth")
    return fold, store, fold / "after_epoch_1.pth"


def resume_check(env, cmd, configuration, fold, store, **kw):
    """--c to 2 epochs: the margins were restored exactly (digest in the log) and training went on."""
    out = ok(run(cmd, env, "999", configuration, "0", "-tr", "nnUNetTrainerIMA", "-device", "cpu", "--c",
                 NNUNET_IMA_EPOCHS="2", **kw))
    assert f"IMA: restored {len(store)} margins, digest {margin_digest(store)}" in out
    ckpt = torch.load(fold / "checkpoint_final.pth", weights_only=True)
    assert ckpt["current_epoch"] == 2 and len(ckpt["logging"]["train_losses"]) == 2
    assert set(store.keys()) <= set(saved_margins(fold / "checkpoint_final.pth").keys())


def predict(env, cmd, configuration, trainer, out_dir: Path, **kw):
    out = ok(run(cmd, env, "-i", str(Path(env["tiny_raw"]) / "imagesTs"), "-o", str(out_dir), "-d", "999",
                 "-c", configuration, "-f", "0", "-tr", trainer, "-device", "cpu", "-npp", "1", "-nps", "1",
                 "--disable_tta", **kw))
    assert sorted(p.name for p in out_dir.glob("*.nii.gz")) == ["case_006.nii.gz", "case_007.nii.gz"], out[-2000:]


def _flow_3d(env, pred_dir):
    fold, store, _ = train_first(env, "nnunet-ima-train", "3d_fullres")
    assert set(store.keys()) <= {f"case_{i:03d}" for i in range(6)}  # 3d: one margin per case
    resume_check(env, "nnunet-ima-train", "3d_fullres", fold, store)
    predict(env, "nnunet-ima-predict", "3d_fullres", "nnUNetTrainerIMA", pred_dir)


def _flow_sat(env, pretrained, pred_dir):
    out = ok(run("nnunet-ima-train", env, "999", "2d", "0", "-tr", "nnUNetTrainerSAT", "-device", "cpu",
                 NNUNET_IMA_SAT_EPS="0.5", NNUNET_IMA_INIT_WEIGHTS=str(pretrained)))
    assert f"initialised every weight (segmentation heads included) from {pretrained}" in out
    fold = fold_dir(env, "nnUNetTrainerSAT", "2d")
    assert "sat_eps         = 0.5" in next(fold.glob("training_log_*.txt")).read_text()
    assert "ima_margins" not in torch.load(fold / "checkpoint_final.pth", weights_only=True)
    predict(env, "nnunet-ima-predict", "2d", "nnUNetTrainerSAT", pred_dir)


@pytest.fixture(scope="module")
def pool():
    """Two background chains beside the main one: the machine has 2 cores and a run is mostly imports."""
    with ThreadPoolExecutor(2) as executor:
        yield executor


@pytest.fixture(scope="module")
def flow_3d(env, pool, tmp_path_factory):
    """3d_fullres: nnunet-ima-train, --c, nnunet-ima-predict (background)."""
    return pool.submit(_flow_3d, env, tmp_path_factory.mktemp("pred3d"))


@pytest.fixture(scope="module")
def ima_2d_first(env, flow_3d):
    """2d IMA, epoch 1, by the real nnUNetv2_train with nnUNet_extTrainer exported."""
    return train_first(env, "nnUNetv2_train", "2d", ext=True)


@pytest.fixture(scope="module")
def flow_sat(env, pool, ima_2d_first, tmp_path_factory):
    """2d SAT from IMA's epoch-1 weights (NNUNET_IMA_INIT_WEIGHTS), then nnunet-ima-predict (background)."""
    return pool.submit(_flow_sat, env, ima_2d_first[2], tmp_path_factory.mktemp("predsat"))


def test_bad_settings_stop_before_any_epoch(env, flow_3d):
    """All four mistakes at once: exit code 2 before any epoch, one line on stderr naming each."""
    bad = {"NNUNET_IMA_EPS_MAX": "-1", "NNUNET_IMA_DELTA": "3", "NNUNET_IMA_DICE_THRESHOLD": "1.5",
           "NNUNET_IMA_NORM": "l3"}
    proc = run("nnunet-ima-train", env, "999", "2d", "1", "-tr", "nnUNetTrainerIMA", "-device", "cpu", **bad)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if "nnunet-ima" in line]
    assert len(lines) == 1 and lines[0] == proc.stderr.strip().splitlines()[-1]
    assert lines[0].startswith("nnunet-ima-train: error: invalid nnunet-ima trainer settings: ")
    for message in ("eps_max must be > 0, got -1.0 (from env NNUNET_IMA_EPS_MAX)", "delta must be <= eps_max",
                    "dice_threshold must be in (0, 1), got 1.5", "unknown norm 'l3'"):
        assert message in lines[0]
    assert "Epoch 0" not in proc.stdout
    assert not fold_dir(env, "nnUNetTrainerIMA", "2d").with_name("fold_1").exists()  # nothing was created


def test_ima_2d_train_resume_predict(env, ima_2d_first, flow_sat, tmp_path):
    """nnUNetv2_train -> --c through nnunet-ima-train (no variable) -> nnUNetv2_predict."""
    fold, store, _ = ima_2d_first
    assert all("/slice_" in k for k in store.keys())  # one margin per (case, slice)
    resume_check(env, "nnunet-ima-train", "2d", fold, store)
    predict(env, "nnUNetv2_predict", "2d", "nnUNetTrainerIMA", tmp_path / "pred", ext=True)


def test_sat_2d_from_init_weights_then_predict(flow_sat):
    flow_sat.result()


def test_ima_3d_fullres_train_resume_predict(flow_3d):
    flow_3d.result()
