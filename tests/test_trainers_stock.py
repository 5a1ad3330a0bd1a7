"""Models trained by STOCK nnU-Net code (issue 11): IMA starts from a stock nnUNetTrainer checkpoint
through NNUNET_IMA_INIT_WEIGHTS, read with ``weights_only=True`` (numpy scalars allowed, nothing
else); a file that is not a checkpoint, or a checkpoint of another network or configuration, is one
clear ConfigError naming both sides. The stock model is conftest's ``tiny_trained_2d``
(``nnUNetv2_train ... -tr nnUNetTrainer_evalTiny``: nnUNetTrainer's own step and save_checkpoint)."""
from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from batchgenerators.utilities.file_and_folder_operations import load_json

from nnunet_ima_trainers import nnUNetTrainerIMA
from nnunet_ima_trainers.checkpoints import read_checkpoint
from nnunet_ima_trainers.config import ConfigError

EXT = Path(__file__).parent / "ext_trainers"
STOCK_RUN = "nnUNetTrainer_evalTiny__nnUNetPlans__2d"


@pytest.fixture
def stock(tiny_trained_2d, monkeypatch, tmp_path, one_thread):
    """nnUNet_* variables of the tiny dataset, results of this test in its own folder, the ext
    trainers importable; returns the stock model's checkpoint_final.pth."""
    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_n_proc_DA", "nnUNet_compile", "nnUNet_def_n_proc"):
        monkeypatch.setenv(k, tiny_trained_2d.env[k])
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    monkeypatch.syspath_prepend(str(EXT))
    results = Path(tiny_trained_2d.env["nnUNet_results"])
    return results / "Dataset999_Tiny" / STOCK_RUN / "fold_0" / "checkpoint_final.pth"


def tiny_ima_class():
    from nnUNetTrainer_evalTinyIMA import nnUNetTrainer_evalTinyIMA

    return nnUNetTrainer_evalTinyIMA


def build(preprocessed: Path, cls, configuration="2d"):
    plans = load_json(str(preprocessed / "nnUNetPlans.json"))
    plans["continue_training"] = False
    dataset_json = load_json(str(preprocessed / "dataset.json"))
    return cls(plans, configuration, 0, dataset_json, device=torch.device("cpu"))


def test_ima_starts_from_a_stock_checkpoint_with_exactly_its_weights(stock, tiny_trained_2d, monkeypatch):
    with pytest.raises(pickle.UnpicklingError):  # a genuine stock file: numpy scalars in it (_best_ema, logging)
        torch.load(stock, weights_only=True)
    saved = torch.load(stock, weights_only=False)["network_weights"]  # the test's own trusted file
    assert any(".seg_layers." in k for k in saved)

    monkeypatch.setenv("NNUNET_IMA_INIT_WEIGHTS", str(stock))
    trainer = build(Path(tiny_trained_2d.env["nnUNet_preprocessed"]) / "Dataset999_Tiny", tiny_ima_class())
    trainer.initialize()
    own = trainer.network.state_dict()
    assert own.keys() == saved.keys()
    for k, v in saved.items():
        assert torch.equal(own[k], v), k  # every weight, segmentation heads included
    log = Path(trainer.log_file).read_text()
    assert "initialised every weight" in log and "trainer nnUNetTrainer_evalTiny" in log


@pytest.mark.parametrize("cls_name,configuration,ours", [
    ("nnUNetTrainer_evalTinyIMA", "3d_fullres", "configuration 3d_fullres"),   # another configuration
    ("nnUNetTrainerIMA", "2d", "trainer nnUNetTrainerIMA"),                    # another (wider) network
])
def test_a_checkpoint_of_another_network_names_both(stock, tiny_trained_2d, monkeypatch, tmp_path, cls_name,
                                                    configuration, ours):
    monkeypatch.setenv("NNUNET_IMA_INIT_WEIGHTS", str(stock))
    cls = tiny_ima_class() if cls_name == "nnUNetTrainer_evalTinyIMA" else nnUNetTrainerIMA
    with pytest.raises(ConfigError) as info:  # refused while the trainer is built, before nnU-Net makes its folders
        build(Path(tiny_trained_2d.env["nnUNet_preprocessed"]) / "Dataset999_Tiny", cls, configuration)
    assert not (tmp_path / "results").exists()  # no fold folder left to look like a model (issue 24)
    msg = str(info.value)
    assert "not a checkpoint of this network" in msg and "\n" not in msg
    assert "holds trainer nnUNetTrainer_evalTiny, dataset Dataset999_Tiny, configuration 2d" in msg
    assert f"this run builds trainer {cls_name}" in msg and ours in msg
    assert " vs " in msg  # a mismatched weight with both shapes


class _Marker:
    """Unpickling this would create a file: a checkpoint reader must refuse it, not run it."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


def test_files_that_are_not_checkpoints_are_one_clear_message(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("this is not a checkpoint\n")
    marker = tmp_path / "was_unpickled"
    hostile = tmp_path / "hostile.pth"
    torch.save({"network_weights": {}, "x": _Marker(str(marker))}, hostile)
    weights = tmp_path / "weights.pth"
    torch.save({"conv.weight": torch.zeros(2)}, weights)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(weights.read_bytes()[:300])
    cases = {text: "not an nnU-Net checkpoint",
             hostile: "open object, which an nnU-Net checkpoint never holds; not unpickled",
             weights: "no 'network_weights' entry", truncated: "not an nnU-Net checkpoint",
             tmp_path / "missing.pth": "no such file"}
    for path, expected in cases.items():
        with pytest.raises(ConfigError) as info:
            read_checkpoint(str(path))
        msg = str(info.value)
        assert msg.startswith(f"init_weights={path}: ") and expected in msg, msg
        assert "weights_only" not in msg and "\n" not in msg and len(msg) < 300, msg
    assert not marker.exists()
