"""nnU-Net's sliding-window prediction of a whole preprocessed case, differentiable, in fp32.

:class:`CasePredictor` computes what ``nnUNetPredictor.predict_sliding_window_return_logits`` computes
(nnunetv2 2.8.1, ``inference/predict_from_raw_data.py``) with nnU-Net's own pieces:

* the case is padded to at least the patch size with ``acvl_utils``' ``pad_nd_image`` (zeros, centred),
  as the predictor pads it;
* the windows are nnU-Net's slicers, ``nnUNetPredictor._internal_get_sliding_window_slicers`` (called
  on a small stand-in holding the patch size and the tile step; steps from
  ``compute_steps_for_sliding_window``): a 2d model predicts every slice of the volume, each on a 2d
  grid of windows; a 3d model a 3d grid;
* each window's logits are the mean over the window and every combination of the checkpoint's
  ``inference_allowed_mirroring_axes`` (``_internal_maybe_mirror_and_predict``), weighted with nnU-Net's
  Gaussian (``compute_gaussian(patch, sigma_scale=1/8, value_scaling_factor=10)``, the float16 map the
  predictor multiplies by, used here in float32) and blended: sum of weighted logits / sum of weights.

What differs: nnU-Net accumulates logits and weights in float16 and runs under
``torch.inference_mode`` (no gradient); here everything is float32 and differentiable, so the logits
equal nnU-Net's to float16 accumulation rounding.

Gradients, window by window (:class:`WindowBlend`, a ``torch.autograd.Function``): the forward pass
runs without a graph and keeps only the case (``x``) and the blending weights; the backward pass gets
the upstream gradient of the blended logits, then recomputes each window (and each mirrored pass of
it) with a graph and back-propagates that window's weighted share, adding its input gradient into
the case's. Peak memory holds the case's own arrays and about one window's graph, whatever the size
of the case: one attack step costs windows x mirrors x (2 forwards + 1 backward). ``whole_graph=True``
instead builds one graph through every window (autograd's own answer; the tests' reference).

>>> pred = CasePredictor(network, patch_size=(32, 32), tile_step=0.5, mirror_axes=(0, 1))
>>> logits = pred(x)              # x (1, C, Z, Y, X) preprocessed case -> (1, K, Z, Y, X) blended logits
>>> loss(logits, y).backward()    # window by window: the peak holds one window's graph
"""
from __future__ import annotations

import itertools
from types import SimpleNamespace

import torch

from nnunet_ima.losses import first


def mirror_combinations(mirror_axes, spatial_dims: int) -> list[tuple]:
    """The flips of one window, as nnU-Net's ``_internal_maybe_mirror_and_predict`` takes them: ``()``
    (the window itself), then every non-empty combination of ``mirror_axes`` (spatial axes, 0-based),
    as tensor axes of a (B, C, *S) window. ``None`` or ``()``: no mirroring.

    >>> mirror_combinations((0, 1), 2)
    [(), (2,), (3,), (2, 3)]
    """
    if not mirror_axes:
        return [()]
    if max(mirror_axes) >= spatial_dims:
        raise ValueError(f"mirror axes {tuple(mirror_axes)} do not fit a window with {spatial_dims} spatial axes")
    axes = [int(m) + 2 for m in mirror_axes]
    return [()] + [c for i in range(len(axes)) for c in itertools.combinations(axes, i + 1)]


def sliding_window_slicers(spatial_shape: tuple, patch_size: tuple, tile_step: float) -> list[tuple]:
    """nnU-Net's window slicers for a (padded) case of ``spatial_shape``: its own
    ``_internal_get_sliding_window_slicers``, run on a stand-in predictor that holds the patch size and
    the tile step. Each slicer indexes a (C, *spatial) array: ``(slice(None), z, ys, xs)`` for a 2d
    patch (one slice of the volume), ``(slice(None), zs, ys, xs)`` for a 3d one."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    stand_in = SimpleNamespace(configuration_manager=SimpleNamespace(patch_size=list(patch_size)),
                               tile_step_size=float(tile_step), verbose=False)
    return nnUNetPredictor._internal_get_sliding_window_slicers(stand_in, tuple(spatial_shape))


def gaussian_weights(patch_size: tuple, device, dtype=torch.float32) -> torch.Tensor:
    """nnU-Net's window weight (float16, as its predictor builds it; zeros replaced by the smallest
    value), as ``dtype`` (float32) on ``device``."""
    from nnunetv2.inference.sliding_window_prediction import compute_gaussian

    g = compute_gaussian(tuple(int(p) for p in patch_size), sigma_scale=1. / 8, value_scaling_factor=10,
                         dtype=torch.float16, device=torch.device("cpu"))
    return g.to(device=device, dtype=dtype)


def pad_case(image: torch.Tensor, patch_size: tuple) -> tuple[torch.Tensor, tuple]:
    """(C, *S) case -> (padded case, slicer that crops it back): nnU-Net's ``pad_nd_image`` to at least
    the patch size, zeros, content centred (the predictor's call)."""
    from acvl_utils.cropping_and_padding.padding import pad_nd_image

    padded, revert = pad_nd_image(image, tuple(patch_size), "constant", {"value": 0}, True, None)
    return padded, tuple(revert)


class CasePredictor(torch.nn.Module):
    """Blended sliding-window logits of whole preprocessed cases: (B, C, *S) -> (B, K, *S), each case
    predicted on its own (B is usually 1: cases differ in shape).

    ``network``: the plain nnU-Net network (no deep supervision); ``patch_size``: the plans' patch
    (2 numbers for a 2d model, whose cases are (C, Z, Y, X) volumes predicted slice by slice, 3 for a
    3d model); ``tile_step``: nnU-Net's ``tile_step_size`` (0.5 in ``nnUNetv2_predict``);
    ``mirror_axes``: the checkpoint's ``inference_allowed_mirroring_axes`` (None: no mirroring, as
    ``--disable_tta``); ``window_batch``: windows per network call (1: nnU-Net's; more is faster on a
    GPU and holds that many windows' graphs); ``whole_graph``: one autograd graph through every window
    instead of the window-by-window backward (the reference; memory grows with the case).
    """

    def __init__(self, network: torch.nn.Module, patch_size, tile_step: float = 0.5, mirror_axes=None,
                 window_batch: int = 1, whole_graph: bool = False):
        super().__init__()
        if not 0 < float(tile_step) <= 1:
            raise ValueError(f"tile_step must be in (0, 1], got {tile_step}")
        if int(window_batch) < 1:
            raise ValueError(f"window_batch must be >= 1, got {window_batch}")
        self.network = network
        self.patch_size = tuple(int(p) for p in patch_size)
        self.tile_step = float(tile_step)
        self.mirror_axes = tuple(mirror_axes) if mirror_axes else None
        self.flips = mirror_combinations(self.mirror_axes, len(self.patch_size))
        self.window_batch = int(window_batch)
        self.whole_graph = bool(whole_graph)

    @classmethod
    def from_model(cls, model, tile_step: float = 0.5, mirroring: bool = True, **kwargs) -> "CasePredictor":
        """For a loaded model (:class:`~nnunet_ima_eval.model.LoadedModel`): its network, the plans' patch
        size and, with ``mirroring``, the checkpoint's mirroring axes (as ``nnUNetv2_predict``)."""
        axes = model.predictor.allowed_mirroring_axes if mirroring else None
        return cls(model.network, model.patch_size, tile_step, axes, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != len(self.patch_size) + 2 + (len(self.patch_size) == 2):
            raise ValueError(f"x: expected (B, C, Z, Y, X) cases, got shape {tuple(x.shape)}")
        run = self.blend if self.whole_graph else (lambda case: WindowBlend.apply(case, self))
        return torch.cat([run(x[i]).unsqueeze(0) for i in range(x.shape[0])])

    # ------------------------------------------------------------------------------------ the pieces
    def windows(self, spatial_shape: tuple) -> list[list[tuple]]:
        """nnU-Net's slicers for a padded case, in chunks of ``window_batch``."""
        slicers = sliding_window_slicers(spatial_shape, self.patch_size, self.tile_step)
        return [slicers[i:i + self.window_batch] for i in range(0, len(slicers), self.window_batch)]

    def mirrored(self, windows: torch.Tensor, flip: tuple) -> torch.Tensor:
        """One mirrored pass of a (W, C, *P) stack of windows: flip, network, flip back -> (W, K, *P)."""
        if not flip:
            return first(self.network(windows))
        return torch.flip(first(self.network(torch.flip(windows, flip))), flip)

    def predict_windows(self, windows: torch.Tensor) -> torch.Tensor:
        """nnU-Net's ``_internal_maybe_mirror_and_predict``: the mean over the mirrored passes (W, K, *P)."""
        out = self.mirrored(windows, self.flips[0])
        for flip in self.flips[1:]:
            out = out + self.mirrored(windows, flip)
        return out / len(self.flips)

    def blend(self, image: torch.Tensor) -> torch.Tensor:
        """Blended logits (K, *S) of one case (C, *S), in the current grad mode; the part of the forward
        :class:`WindowBlend` runs without a graph (and ``whole_graph`` with one)."""
        logits, weights, revert = self.accumulate(image)
        return (logits / weights)[(slice(None), *revert[1:])]

    def accumulate(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple]:
        """(sum of weighted window logits (K, *P), sum of weights (*P), crop slicer) over the padded case."""
        data, revert = pad_case(image, self.patch_size)
        gauss = gaussian_weights(self.patch_size, image.device, image.dtype)
        logits = weights = None
        for chunk in self.windows(tuple(data.shape[1:])):
            pred = self.predict_windows(torch.stack([data[s] for s in chunk])) * gauss
            if logits is None:
                logits = pred.new_zeros((pred.shape[1], *data.shape[1:]))
                weights = gauss.new_zeros(data.shape[1:])
            for s, p in zip(chunk, pred):  # in place; with a graph (whole_graph) autograd records each add
                logits[(slice(None), *s[1:])] += p
                weights[s[1:]] += gauss
        return logits, weights, revert

    def input_gradient(self, image: torch.Tensor, weights: torch.Tensor, grad_logits: torch.Tensor) -> torch.Tensor:
        """d(loss)/d(image) (C, *S) from the upstream gradient ``grad_logits`` (K, *S) of the blended
        logits: each window's mirrored passes recomputed with a graph and back-propagated with their
        share ``grad / weights * gaussian / mirrors``, one window chunk (and one pass) at a time."""
        data, revert = pad_case(image.detach(), self.patch_size)
        gauss = gaussian_weights(self.patch_size, image.device, image.dtype)
        crop = (slice(None), *revert[1:])
        scaled = grad_logits.new_zeros((grad_logits.shape[0], *data.shape[1:]))
        scaled[crop] = grad_logits
        scaled = scaled / weights * (gauss.new_ones(()) / len(self.flips))
        grad = torch.zeros_like(data)
        for chunk in self.windows(tuple(data.shape[1:])):
            share = torch.stack([scaled[(slice(None), *s[1:])] for s in chunk]) * gauss
            windows = torch.stack([data[s] for s in chunk])
            g = torch.zeros_like(windows)
            for flip in self.flips:
                with torch.enable_grad():
                    w = windows.detach().requires_grad_(True)
                    (gw,) = torch.autograd.grad(self.mirrored(w, flip), w, share)
                g += gw
            for s, gs in zip(chunk, g):
                grad[s] += gs
        return grad[crop]


class WindowBlend(torch.autograd.Function):
    """One case (C, *S) -> blended logits (K, *S): forward without a graph, backward window by window
    (:meth:`CasePredictor.input_gradient`). Saves the case and the blending weights, nothing else."""

    @staticmethod
    def forward(ctx, image: torch.Tensor, predictor: CasePredictor) -> torch.Tensor:
        with torch.no_grad():
            logits, weights, revert = predictor.accumulate(image.detach())
            out = (logits / weights)[(slice(None), *revert[1:])]
        ctx.save_for_backward(image, weights)
        ctx.predictor = predictor
        return out

    @staticmethod
    def backward(ctx, grad_logits: torch.Tensor):
        image, weights = ctx.saved_tensors
        return ctx.predictor.input_gradient(image, weights, grad_logits), None
