"""The narrow network of ``nnUNetTrainer_evalTiny`` (same folder) trained for one short epoch: the tiny 3d
model of the case-scope tests (tests/conftest.py ``tiny_trained_3d``), where a working pipeline matters and
the model's skill does not. The file name sorts after nnUNetTrainer_evalTiny.py (see
nnUNetTrainer_evalTinyIMA.py)."""
import nnUNetTrainer_evalTiny as _stock  # this folder is on sys.path (nnU-Net's lookup / the tests put it there)


class nnUNetTrainer_evalTinyShort(_stock.nnUNetTrainer_evalTiny):
    def __init__(self, plans, configuration, fold, dataset_json, device=_stock.torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 1
        self.num_iterations_per_epoch = 4
        self.num_val_iterations_per_epoch = 1
