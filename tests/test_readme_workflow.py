"""README's Decathlon workflow, run verbatim on a generated Decathlon-format Task04_Hippocampus.

Only the download is replaced (no network here): the task folder is written in the Medical
Segmentation Decathlon layout (imagesTr/labelsTr/imagesTs + MSD dataset.json). The schedule is
shortened through the documented NNUNET_IMA_* variables, so the commands themselves are unchanged.
"""
import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import SimpleITK as sitk
import torch

from data_gen import synthetic_shapes

ROOT = Path(__file__).resolve().parents[1]
MODELS = ["nnUNetTrainerSTD_50epochs_50iters", "nnUNetTrainerSAT_50epochs_50iters", "nnUNetTrainerIMA_50epochs_50iters"]


def workflow_block() -> str:
    readme = (ROOT / "README.md").read_text()
    m = re.search(r"## Workflow on a Decathlon task.*?```bash\n(.*?)```", readme, flags=re.S)
    assert m, "README lost its Decathlon workflow block"
    return m.group(1)


def write_msd_task(folder: Path, n_train: int = 6, n_test: int = 2) -> None:
    """A small task in the Decathlon's own layout and dataset.json format."""
    cases = synthetic_shapes(n_train + n_test, shape=(8, 32, 32), seed=4)
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (folder / sub).mkdir(parents=True)
    training, test = [], []
    for i, (image, label) in enumerate(cases.values()):
        name = f"hippocampus_{i + 1:03d}.nii.gz"
        img = sitk.GetImageFromArray(image)
        if i < n_train:
            sitk.WriteImage(img, str(folder / "imagesTr" / name))
            sitk.WriteImage(sitk.GetImageFromArray(label), str(folder / "labelsTr" / name))
            training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
        else:
            sitk.WriteImage(img, str(folder / "imagesTs" / name))
            test.append(f"./imagesTs/{name}")
    meta = {"name": "Hippocampus", "description": "generated stand-in for the test", "tensorImageSize": "3D",
            "modality": {"0": "MRI"}, "labels": {"0": "background", "1": "Anterior", "2": "Posterior"},
            "numTraining": n_train, "numTest": n_test, "training": training, "test": test}
    (folder / "dataset.json").write_text(json.dumps(meta, indent=2))


@pytest.mark.slow
def test_readme_decathlon_workflow_runs_verbatim(tmp_path):
    write_msd_task(tmp_path / "Task04_Hippocampus")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("nnUNet_", "NNUNET_IMA_"))}
    env.update(DEVICE="cpu", PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
               nnUNet_def_n_proc="1", nnUNet_n_proc_DA="1", nnUNet_compile="false",
               NNUNET_IMA_EPOCHS="1", NNUNET_IMA_ITERS="2", NNUNET_IMA_VAL_ITERS="1", NNUNET_IMA_K="2",
               NNUNET_IMA_N="2")
    script = "set -euo pipefail\n" + workflow_block()
    run = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, timeout=1200)
    assert run.returncode == 0, run.stdout[-6000:]

    results = tmp_path / "nnUNet_results" / "Dataset004_Hippocampus"
    ckpt = results / f"{MODELS[2]}__nnUNetPlans__2d" / "fold_0" / "checkpoint_final.pth"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)  # no pickled objects of ours
    assert any("margin" in k for k in state), sorted(state)
    rows = list(csv.DictReader(open(tmp_path / "robustness_Task04" / "results.csv")))
    seen = {(r["model"], r["attack"], float(r["eps"])) for r in rows if r["class"] == "mean"}
    for model in MODELS:
        for attack in ("pgd", "ifgsm"):
            for eps in (0.0, 2.0, 6.0, 10.0):
                assert (model, attack, eps) in seen
    predictions = sorted(p.name for p in (tmp_path / "predictions_IMA").glob("*.nii.gz"))
    assert predictions == ["hippocampus_007.nii.gz", "hippocampus_008.nii.gz"]
