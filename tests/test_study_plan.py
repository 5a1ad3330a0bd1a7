"""benchmarks/study_ima.py's plan (no training): a seed is a whole demo run (its own STD, SAT and IMA with one
seed), and a model is shared by the settings that ask for it."""
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _study():
    spec = importlib.util.spec_from_file_location("study_ima", ROOT / "benchmarks" / "study_ima.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["study_ima"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_settings_share_models_and_pair_sat_with_ima_by_seed(tmp_path):
    s = _study()
    models = s.plan_models(["demo", "sat2", "lr1e-3"], [0, 1])
    names = [m.name for m in models]
    assert names == ["STD_s0", "STD_s1", "SAT_s0", "IMA_s0", "SAT_s1", "IMA_s1", "SAT_sat_eps2_s0", "SAT_sat_eps2_s1",
                     "SAT_initial_lr0.001_s0", "IMA_initial_lr0.001_s0", "SAT_initial_lr0.001_s1",
                     "IMA_initial_lr0.001_s1"]  # SAT eps 2 is compared with the demo setting's IMA of the same seed
    assert s.setting_models("sat2", 1)[1] == s.setting_models("demo", 1)[1]
    env = s.train_env(s.setting_models("lr1e-3", 1)[1], tmp_path, 1)
    assert env["NNUNET_IMA_SEED"] == "1" and env["NNUNET_IMA_INITIAL_LR"] == "0.001"
    assert env["NNUNET_IMA_INIT_WEIGHTS"].endswith("STD_s1/nnUNet_results/Dataset990_MNIBrain/"
                                                   "nnUNetTrainerSTD__nnUNetPlansDemo__2d/fold_0/checkpoint_final.pth")
    std = s.train_env(s.std_model(1), tmp_path, 1)
    assert std["NNUNET_IMA_SEED"] == "1" and "NNUNET_IMA_INIT_WEIGHTS" not in std and std["NNUNET_IMA_EPOCHS"] == "30"
