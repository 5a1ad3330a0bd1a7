"""Write nnU-Net v2 raw datasets (NIfTI + dataset.json) and run nnU-Net's own planning.

Used by the demo (real anatomy from the MNI152 template), the tests and the benchmarks (generated
shapes, ``tests/data_gen.py``). The layout is exactly what ``nnUNetv2_plan_and_preprocess`` expects:
``$nnUNet_raw/DatasetXXX_Name/{imagesTr,labelsTr,imagesTs,labelsTs}``, images ``<case>_0000.nii.gz``.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk


def dataset_folder_name(dataset_id: int, name: str) -> str:
    return f"Dataset{int(dataset_id):03d}_{name}"


def _write(array: np.ndarray, path: Path, spacing) -> None:
    img = sitk.GetImageFromArray(array)  # array is (z, y, x)
    img.SetSpacing(tuple(float(s) for s in spacing[::-1]))
    sitk.WriteImage(img, str(path), useCompression=True)


def write_raw_dataset(raw_root, dataset_id: int, name: str, train: dict, labels: dict, *, test: dict | None = None,
                      channel_name: str = "MRI", spacing=(1.0, 1.0, 1.0), description: str = "") -> Path:
    """Write an nnU-Net raw dataset.

    ``train`` / ``test`` map case ids to (image, label) pairs of (z, y, x) arrays; ``labels`` maps
    names to integer values and must contain "background": 0. Returns the dataset folder.
    """
    from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

    if labels.get("background") != 0:
        raise ValueError("labels must map 'background' to 0")
    folder = Path(raw_root) / dataset_folder_name(dataset_id, name)
    for split, cases in (("Tr", train), ("Ts", test or {})):
        if not cases:
            continue
        (folder / f"images{split}").mkdir(parents=True, exist_ok=True)
        (folder / f"labels{split}").mkdir(parents=True, exist_ok=True)
        for case, (image, label) in cases.items():
            if image.shape != label.shape:
                raise ValueError(f"case {case}: image shape {image.shape} != label shape {label.shape}")
            _write(image.astype(np.float32), folder / f"images{split}" / f"{case}_0000.nii.gz", spacing)
            _write(label.astype(np.uint8), folder / f"labels{split}" / f"{case}.nii.gz", spacing)
    generate_dataset_json(str(folder), {0: channel_name}, labels, len(train), ".nii.gz", dataset_name=name,
                          description=description, license="see description", converted_by="nnunet-ima")
    return folder


def nnunet_env(root) -> dict:
    """Environment with nnUNet_raw / nnUNet_preprocessed / nnUNet_results under ``root``."""
    root = Path(root)
    env = dict(os.environ)
    for var, sub in (("nnUNet_raw", "nnUNet_raw"), ("nnUNet_preprocessed", "nnUNet_preprocessed"),
                     ("nnUNet_results", "nnUNet_results")):
        (root / sub).mkdir(parents=True, exist_ok=True)
        env[var] = str(root / sub)
    return env


def nnunet_command(name: str) -> list[str]:
    """Path of an nnU-Net console script installed beside this interpreter (or the bare name)."""
    exe = Path(sys.executable).with_name(name)
    return [str(exe) if exe.exists() else name]


def plan_and_preprocess(dataset_id: int, configurations=("2d",), env: dict | None = None, num_processes: int = 1,
                        log=None) -> None:
    """Run the real ``nnUNetv2_plan_and_preprocess`` for ``configurations`` (raises on failure)."""
    if env is not None and env.get("nnUNet_n_proc_DA") == "0":
        # the planner calls torch.set_num_threads(nnUNet_n_proc_DA), which rejects 0
        env = {k: v for k, v in env.items() if k != "nnUNet_n_proc_DA"}
    cmd = nnunet_command("nnUNetv2_plan_and_preprocess") + [
        "-d", str(dataset_id), "-c", *configurations, "-np", str(num_processes), "--verify_dataset_integrity"]
    run = subprocess.run(cmd, env=env, stdout=log or subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if run.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed with exit code {run.returncode}:\n{run.stdout or ''}")
