"""Classification with IMA and the methods it is compared with (papers' Moons, Fashion-MNIST, SVHN,
CIFAR-10, COVID-19 CT experiments), on the shared kernel. Imports nothing from nnU-Net.

>>> from nnunet_ima.classify import load_dataset, TrainConfig, train, evaluate, EvalConfig
>>> splits = load_dataset("moons")
>>> result = train(TrainConfig(method="ima", model="moons_mlp", epochs=30), splits)

Command line: ``python -m nnunet_ima.classify`` (see :mod:`.cli`).
"""
from .datasets import LOADERS, DatasetError, DatasetMissingError, IndexedDataset, Splits, load_dataset
from .evaluate import EvalConfig, evaluate, format_table
from .experiment import ModelInputError, RunConfig, run_experiment
from .methods import METHODS, MethodConfig, build_method
from .models import MODELS, build_model
from .presets import PRESETS, Preset, get_preset
from .train import RunExistsError, TrainConfig, TrainResult, model_from_checkpoint, train
from .verdict import verdict

__all__ = [
    "LOADERS", "DatasetError", "DatasetMissingError", "ModelInputError", "RunExistsError", "verdict",
    "IndexedDataset", "Splits", "load_dataset", "EvalConfig", "evaluate", "format_table", "RunConfig",
    "run_experiment", "METHODS", "MethodConfig", "build_method", "MODELS", "build_model", "PRESETS", "Preset",
    "get_preset", "TrainConfig", "TrainResult", "model_from_checkpoint", "train"
]
