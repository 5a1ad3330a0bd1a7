"""Shared fixtures. ``nnunet_tiny``: a generated nnU-Net dataset, planned and preprocessed once per
test session with the real ``nnUNetv2_plan_and_preprocess`` (2d and 3d_fullres)."""
from __future__ import annotations

import contextlib
from pathlib import Path

import pytest

TINY_ID = 999
TINY_NAME = "Tiny"
TINY_LABELS = {"background": 0, "outer": 1, "core": 2}


class NnunetTiny:
    """Paths and environment of the tiny dataset. ``env`` holds the nnUNet_* variables."""

    def __init__(self, root: Path, env: dict):
        self.root = root
        self.env = env
        self.dataset_id = TINY_ID
        self.dataset_name = f"Dataset{TINY_ID:03d}_{TINY_NAME}"
        self.raw = Path(env["nnUNet_raw"]) / self.dataset_name
        self.preprocessed = Path(env["nnUNet_preprocessed"]) / self.dataset_name
        self.results = Path(env["nnUNet_results"])


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: one intra-op thread is several times faster than two on a busy 2-core box."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def nnunet_tiny(tmp_path_factory) -> NnunetTiny:
    from data_gen import synthetic_shapes
    from nnunet_ima_demo.nnunet_data import nnunet_env, plan_and_preprocess, write_raw_dataset

    root = tmp_path_factory.mktemp("nnunet")
    env = nnunet_env(root)
    env["nnUNet_n_proc_DA"] = "0"  # single-threaded data loading: deterministic and light on 2 cores
    env["nnUNet_compile"] = "false"
    env["nnUNet_def_n_proc"] = "1"  # nnU-Net's export pools spawn 8 processes by default: slow on 2 cores
    cases = synthetic_shapes(8, shape=(8, 32, 32), seed=0)
    train = dict(list(cases.items())[:6])
    test = dict(list(cases.items())[6:])
    write_raw_dataset(env["nnUNet_raw"], TINY_ID, TINY_NAME, train, TINY_LABELS, test=test)
    plan_and_preprocess(TINY_ID, ("2d", "3d_fullres"), env=env)
    return NnunetTiny(root, env)


NNUNET_ENV_KEYS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_n_proc_DA", "nnUNet_compile",
                   "nnUNet_def_n_proc", "nnUNet_extTrainer")


@contextlib.contextmanager
def nnunet_env_of(tiny: NnunetTiny):
    """Inside: the nnUNet_* variables of ``tiny`` (a trained fixture's included) in os.environ, for in-process
    calls of the commands (module-scoped fixtures: ``with nnunet_env_of(tiny_trained_2d) as t: yield t``)."""
    with pytest.MonkeyPatch.context() as mp:
        for k in NNUNET_ENV_KEYS:
            if k in tiny.env:
                mp.setenv(k, tiny.env[k])
        yield tiny


@pytest.fixture
def nnunet_environ(nnunet_tiny, monkeypatch):
    """Put the tiny dataset's nnUNet_* variables into os.environ for in-process nnU-Net calls."""
    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "nnUNet_n_proc_DA", "nnUNet_compile",
              "nnUNet_def_n_proc"):
        monkeypatch.setenv(k, nnunet_tiny.env[k])
    return nnunet_tiny


# --- evaluation (nnunet_ima_eval) ---------------------------------------------------------------
EVAL_EXT_TRAINERS = Path(__file__).parent / "ext_trainers"
EVAL_TRAINER = "nnUNetTrainer_evalTiny"


def _train(nnunet_tiny, configuration: str, trainer: str) -> NnunetTiny:
    """The real ``nnUNetv2_train 999 <configuration> 0 -tr <trainer> -device cpu`` on the tiny dataset."""
    import subprocess

    from nnunet_ima_demo.nnunet_data import nnunet_command

    env = dict(nnunet_tiny.env, nnUNet_extTrainer=str(EVAL_EXT_TRAINERS))
    cmd = nnunet_command("nnUNetv2_train") + [str(TINY_ID), configuration, "0", "-tr", trainer, "-device", "cpu"]
    run = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if run.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({run.returncode}):\n{run.stdout[-4000:]}")
    return NnunetTiny(nnunet_tiny.root, env)


@pytest.fixture(scope="session")
def tiny_trained_2d(nnunet_tiny) -> NnunetTiny:
    """A standard nnU-Net model trained with the real ``nnUNetv2_train 999 2d 0 -tr nnUNetTrainer_evalTiny
    -device cpu`` (tests/ext_trainers: 5 epochs x 25 iterations, 20-90 s on 2 cores depending on load).
    The model lands in the tiny dataset's nnUNet_results; ``env`` of the returned object includes
    nnUNet_extTrainer."""
    return _train(nnunet_tiny, "2d", EVAL_TRAINER)


EVAL_TRAINER_3D = "nnUNetTrainer_evalTinyShort"


@pytest.fixture(scope="session")
def tiny_trained_3d(nnunet_tiny) -> NnunetTiny:
    """The smallest 3d model nnU-Net trains here: ``nnUNetv2_train 999 3d_fullres 0 -tr
    nnUNetTrainer_evalTinyShort`` (the tiny dataset's 3d_fullres plan, patch 8 x 32 x 32, the narrow
    network of nnUNetTrainer_evalTiny, one epoch of 4 iterations: 10-30 s). Its skill is irrelevant:
    the case-scope tests need a real 3d checkpoint, its plans and its preprocessing."""
    return _train(nnunet_tiny, "3d_fullres", EVAL_TRAINER_3D)
