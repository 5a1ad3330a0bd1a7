"""IMA with the narrow network of the stock ``nnUNetTrainer_evalTiny`` (same folder), so that IMA can
start from that stock model's checkpoint through NNUNET_IMA_INIT_WEIGHTS (tests/test_trainers_stock.py).
The file name sorts after nnUNetTrainer_evalTiny.py, so nnU-Net's trainer lookup in this folder finds
the stock trainer without importing this module first."""
import nnUNetTrainer_evalTiny as _stock  # this folder is on sys.path (nnU-Net's lookup / the tests put it there)

from nnunet_ima_trainers import adversarial as _adversarial


class nnUNetTrainer_evalTinyIMA(_adversarial.nnUNetTrainerIMA):
    build_network_architecture = staticmethod(_stock.nnUNetTrainer_evalTiny.build_network_architecture)
