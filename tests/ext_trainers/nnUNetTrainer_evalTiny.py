"""A standard nnU-Net trainer shrunk for tests: a narrow network, a few short epochs.

Found by nnU-Net's trainer lookup through ``nnUNet_extTrainer`` (this folder), in training and in
``nnUNetPredictor`` (which builds the network through the trainer's ``build_network_architecture``).
Training is nnUNetTrainer's own (Dice+CE, deep supervision, augmentation); only the schedule and the
width (features per stage / 2) differ. The final validation (prediction + export of the validation
cases) is skipped: the tests run nnU-Net's predictor themselves.
"""
import torch

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans


class nnUNetTrainer_evalTiny(nnUNetTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 5
        self.num_iterations_per_epoch = 25
        self.num_val_iterations_per_epoch = 1
        self.save_every = 1000

    @staticmethod
    def build_network_architecture(plans_manager, configuration_manager, num_input_channels, num_output_channels,
                                   enable_deep_supervision: bool = True):
        kwargs = dict(configuration_manager.network_arch_init_kwargs)
        kwargs["features_per_stage"] = [max(4, f // 2) for f in kwargs["features_per_stage"]]
        return get_network_from_plans(configuration_manager.network_arch_class_name, kwargs,
                                      configuration_manager.network_arch_init_kwargs_req_import,
                                      num_input_channels, num_output_channels, allow_init=True,
                                      deep_supervision=enable_deep_supervision)

    def perform_actual_validation(self, save_probabilities: bool = False):
        pass
