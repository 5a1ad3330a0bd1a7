"""Sample ids for the per-sample margins: nnU-Net's data loader, keeping which slice it drew.

nnU-Net's 2d loader picks a slice of a case (``bbox_lbs[0]`` of the pseudo-3d crop) and returns
only the case id. IMA needs one margin per training sample, so :class:`SampleKeyDataLoader`
records the crop of every sample it draws and names 2d samples ``"<case>/slice_<k>"``. The
augmentations that follow (rotation, scaling, intensity, mirroring) do not change which slice a
sample is, so the key is stable across epochs.

3d configurations keep the case id: a 3d crop is placed at random (or around a random foreground
voxel) every time, so a key made of the crop position would name a new "sample" on almost every
draw and its margin would never grow past delta.
"""
from __future__ import annotations

import contextlib

from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader


def slice_key(case: str, slice_index: int) -> str:
    """Margin key of one 2d training sample."""
    return f"{case}/slice_{int(slice_index)}"


class SampleKeyDataLoader(nnUNetDataLoader):
    """nnU-Net's loader whose batch ``keys`` are sample ids: ``case/slice_k`` (2d) or ``case`` (3d)."""

    def get_bbox(self, *args, **kwargs):
        lbs, ubs = super().get_bbox(*args, **kwargs)
        self._drawn.append(lbs)  # called exactly once per sample, in batch order
        return lbs, ubs

    def generate_train_batch(self):
        self._drawn = []
        batch = super().generate_train_batch()
        keys = [str(k) for k in batch["keys"]]
        if self.patch_size_was_2d:
            keys = [slice_key(k, lbs[0]) for k, lbs in zip(keys, self._drawn)]
        batch["keys"] = keys
        return batch


@contextlib.contextmanager
def sample_key_loader():
    """Make ``nnUNetTrainer.get_dataloaders`` build :class:`SampleKeyDataLoader` instead of nnU-Net's
    loader (it refers to the class by its module-level name), without copying that 60-line method."""
    from nnunetv2.training.nnUNetTrainer import nnUNetTrainer as module

    original = module.nnUNetDataLoader
    module.nnUNetDataLoader = SampleKeyDataLoader
    try:
        yield
    finally:
        module.nnUNetDataLoader = original
