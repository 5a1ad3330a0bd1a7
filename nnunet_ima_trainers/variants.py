"""Length variants in nnU-Net's style: the name says the schedule, the class sets nothing else.

``50epochs_50iters`` is the paper's schedule (section 3.5: 50 epochs of 50 iterations). The
NNUNET_IMA_EPOCHS / NNUNET_IMA_ITERS variables still override a variant (and the log says so).
"""
from .adversarial import nnUNetTrainerIMA, nnUNetTrainerSAT
from .base import nnUNetTrainerSTD

# fmt: off
class nnUNetTrainerSTD_1epoch(nnUNetTrainerSTD): epochs = 1
class nnUNetTrainerSTD_5epochs(nnUNetTrainerSTD): epochs = 5
class nnUNetTrainerSTD_10epochs(nnUNetTrainerSTD): epochs = 10
class nnUNetTrainerSTD_50epochs(nnUNetTrainerSTD): epochs = 50
class nnUNetTrainerSTD_100epochs(nnUNetTrainerSTD): epochs = 100
class nnUNetTrainerSTD_50epochs_50iters(nnUNetTrainerSTD): epochs, iterations = 50, 50

class nnUNetTrainerSAT_1epoch(nnUNetTrainerSAT): epochs = 1
class nnUNetTrainerSAT_5epochs(nnUNetTrainerSAT): epochs = 5
class nnUNetTrainerSAT_10epochs(nnUNetTrainerSAT): epochs = 10
class nnUNetTrainerSAT_50epochs(nnUNetTrainerSAT): epochs = 50
class nnUNetTrainerSAT_100epochs(nnUNetTrainerSAT): epochs = 100
class nnUNetTrainerSAT_50epochs_50iters(nnUNetTrainerSAT): epochs, iterations = 50, 50

class nnUNetTrainerIMA_1epoch(nnUNetTrainerIMA): epochs = 1
class nnUNetTrainerIMA_5epochs(nnUNetTrainerIMA): epochs = 5
class nnUNetTrainerIMA_10epochs(nnUNetTrainerIMA): epochs = 10
class nnUNetTrainerIMA_50epochs(nnUNetTrainerIMA): epochs = 50
class nnUNetTrainerIMA_100epochs(nnUNetTrainerIMA): epochs = 100
class nnUNetTrainerIMA_50epochs_50iters(nnUNetTrainerIMA): epochs, iterations = 50, 50
# fmt: on
