"""The differentiable case predictor (eval/case_predictor.py) against nnU-Net's own sliding-window
predictor, and its window-by-window gradient against autograd through the whole blended prediction.

Networks: nnU-Net's own architecture from the tiny dataset's real 2d and 3d_fullres plans (patches
32 x 32 and 8 x 32 x 32), narrowed (features / 4) and randomly initialised; nnU-Net's predictor gets
them through ``manual_initialization`` with the mirroring axes a 2d / 3d trainer stores. Cases are
larger than a patch, so the predictor pads nothing away and blends several overlapping windows.

Tolerance of the logits: nnU-Net accumulates the weighted logits and the weights in float16 (we in
float32), so the test allows each voxel the first-order rounding bound of that accumulation: n
additions (n = windows covering the voxel) of float16 sums each rounded to half an ulp (relative
2^-11, absolute 2^-24 among the subnormals, where the Gaussian's far corners live), for the sum of
|weighted logits| and the sum of weights, plus the final division's rounding. The argmax must be
equal wherever our top two logits are further apart than twice that bound. (Where they are not, nnU-Net's
own argmax is float16 noise: at the border of a 3d case only the Gaussian's far tails weigh a voxel, values
that float16 holds as subnormals or as the smallest weight the predictor puts in place of zeros; there the
random 3d network's argmax differs from the float32 one on about 0.5 % of the voxels.)
"""
from __future__ import annotations

import weakref

import numpy as np
import pytest
import torch

from nnunet_ima_eval.case_predictor import CasePredictor, gaussian_weights, mirror_combinations, pad_case

HALF_ULP, SUBNORMAL = 2.0 ** -11, 2.0 ** -24
MIRRORS = {"2d": (0, 1), "3d_fullres": (0, 1, 2)}  # what nnU-Net's trainer stores for 2d / 3d patches


def _network(plans_manager, configuration: str, num_classes: int, seed: int = 0):
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans

    cm = plans_manager.get_configuration(configuration)
    kwargs = dict(cm.network_arch_init_kwargs)
    kwargs["features_per_stage"] = [max(4, f // 4) for f in kwargs["features_per_stage"]]
    torch.manual_seed(seed)
    net = get_network_from_plans(cm.network_arch_class_name, kwargs, cm.network_arch_init_kwargs_req_import,
                                 1, num_classes, allow_init=True, deep_supervision=False)
    return net.eval(), cm


@pytest.fixture(scope="module")
def nets(nnunet_tiny):
    """configuration -> (nnU-Net's predictor, our network) for the tiny dataset's 2d and 3d_fullres plans."""
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pm = PlansManager(load_json(str(nnunet_tiny.preprocessed / "nnUNetPlans.json")))
    dj = load_json(str(nnunet_tiny.preprocessed / "dataset.json"))
    out = {}
    for conf in ("2d", "3d_fullres"):
        net, cm = _network(pm, conf, 3)
        p = nnUNetPredictor(tile_step_size=0.5, use_mirroring=True, device=torch.device("cpu"), allow_tqdm=False)
        p.manual_initialization(net, pm, cm, [net.state_dict()], dj, "nnUNetTrainer", MIRRORS[conf])
        out[conf] = p
    return out


def _ours(predictor, **kw) -> CasePredictor:
    axes = predictor.allowed_mirroring_axes if predictor.use_mirroring else None
    return CasePredictor(predictor.network, predictor.configuration_manager.patch_size, predictor.tile_step_size,
                         axes, **kw)


def fp16_bound(ours: CasePredictor, image: torch.Tensor) -> torch.Tensor:
    """(K, *S) first-order bound of nnU-Net's float16 accumulation error (module docstring)."""
    data, revert = pad_case(image, ours.patch_size)
    g = gaussian_weights(ours.patch_size, image.device)
    total = weights = count = None
    with torch.no_grad():
        for chunk in ours.windows(tuple(data.shape[1:])):
            pred = ours.predict_windows(torch.stack([data[s] for s in chunk]))
            for s, p in zip(chunk, pred):
                if total is None:
                    total, weights = p.new_zeros((p.shape[0], *data.shape[1:])), g.new_zeros(data.shape[1:])
                    count = torch.zeros_like(weights)
                total[(slice(None), *s[1:])] += p.abs() * g
                weights[s[1:]] += g
                count[s[1:]] += 1
    crop = tuple(revert[1:])
    total, weights, count = total[(slice(None), *crop)], weights[crop], count[crop]
    ratio = total / weights
    d_sum, d_weights = count * (HALF_ULP * total + SUBNORMAL), count * (HALF_ULP * weights + SUBNORMAL)
    return (d_sum + ratio * d_weights) / weights + HALF_ULP * ratio


CASES = {"2d": (1, 3, 45, 70), "3d_fullres": (1, 12, 40, 44)}  # 2d: 3 slices x 8 windows; 3d: 2 x 2 x 2 windows


@pytest.mark.parametrize("mirroring", [False, True], ids=["no-mirroring", "mirroring"])
@pytest.mark.parametrize("conf", ["2d", "3d_fullres"])
def test_logits_equal_nnunets_sliding_window_prediction(nets, conf, mirroring, one_thread):
    p = nets[conf]
    p.use_mirroring = mirroring
    x = 2 * torch.randn(CASES[conf], generator=torch.Generator().manual_seed(1))
    theirs = p.predict_sliding_window_return_logits(x).float()
    ours_p = _ours(p)
    assert len(ours_p.flips) == (2 ** len(MIRRORS[conf]) if mirroring else 1)
    with torch.no_grad():
        ours = ours_p(x[None])[0]
    assert ours.dtype == torch.float32 and ours.shape == theirs.shape
    bound = fp16_bound(ours_p, x)
    assert bool(((ours - theirs).abs() <= bound).all()), float(((ours - theirs).abs() / bound).max())
    assert float(bound.median()) < 0.05 * float(ours.abs().median() + 1)  # the bound is tight where it matters
    top = ours.topk(2, 0).values
    clear = (top[0] - top[1]) > 2 * bound.amax(0)
    assert float(clear.float().mean()) > 0.95, float(clear.float().mean())
    assert torch.equal(ours.argmax(0)[clear], theirs.argmax(0)[clear])


def test_mirror_combinations_are_nnunets():
    assert mirror_combinations(None, 2) == [()]
    assert mirror_combinations((0, 1, 2), 3) == [(), (2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4)]
    with pytest.raises(ValueError, match="do not fit"):
        mirror_combinations((0, 1, 2), 2)


def _dice_ce(logits, y):
    from nnunet_ima_eval.model import PerSampleLoss

    return PerSampleLoss("dicece", False, None)(logits, y).sum()


def _input_gradient(predictor: CasePredictor, x, y):
    xx = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(_dice_ce(predictor(xx), y), xx)
    return g


@pytest.mark.parametrize("conf, shape", [("2d", (1, 2, 40, 40)), ("3d_fullres", (1, 8, 40, 36))])
def test_window_by_window_gradient_equals_autograd_through_the_whole_prediction(nets, conf, shape, one_thread):
    p = nets[conf]
    p.use_mirroring = True
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(shape, generator=gen)[None]
    y = torch.randint(0, 3, (1, 1, *shape[1:]), generator=gen)
    windowed = _input_gradient(_ours(p), x, y)
    whole = _input_gradient(_ours(p, whole_graph=True), x, y)
    assert float(whole.norm()) > 0
    assert float((windowed - whole).norm() / whole.norm()) < 1e-4


def test_batched_windows_give_the_same_logits_and_gradient(nets, one_thread):
    """``window_batch`` only groups the network calls (in float64, where a random 3d network's input
    gradient is not at the mercy of float32 rounding in its instance norms)."""
    net = nets["3d_fullres"].network
    p = nets["3d_fullres"]
    p.use_mirroring = False
    gen = torch.Generator().manual_seed(5)
    x = torch.randn((1, 1, 10, 36, 36), generator=gen, dtype=torch.float64)  # 8 windows
    y = torch.randint(0, 3, (1, 1, 10, 36, 36), generator=gen)
    net.double()
    try:
        one = _ours(p)
        three = _ours(p, window_batch=3)
        with torch.no_grad():
            assert float((one(x) - three(x)).abs().max()) < 1e-10
        g1, g3 = _input_gradient(one, x, y), _input_gradient(three, x, y)
    finally:
        net.float()
    assert float((g1 - g3).norm() / g1.norm()) < 1e-10


class _Held(list):
    """A saved tensor, boxed so that its release (the graph holding it freed) can be observed."""


class SavedBytes:
    """Peak bytes autograd holds for backward at once: every tensor a graph saves counts from the moment
    it is saved until the graph holding it is freed (deterministic: no allocator involved).

    >>> with SavedBytes() as tally:
    ...     loss.backward()
    >>> tally.peak
    """

    def __init__(self):
        self.live = self.peak = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)

    def pack(self, t: torch.Tensor) -> _Held:
        n = t.numel() * t.element_size()
        self.live += n
        self.peak = max(self.peak, self.live)
        held = _Held([t])
        weakref.finalize(held, self._release, n)
        return held

    @staticmethod
    def unpack(held: _Held) -> torch.Tensor:
        return held[0]

    def _release(self, n: int) -> None:
        self.live -= n

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)


def _saved_bytes(predictor: CasePredictor, x, y) -> int:
    with SavedBytes() as tally:
        _input_gradient(predictor, x, y)
    assert tally.live == 0  # every graph freed
    return tally.peak


def _case_bytes(x, y, num_classes: int) -> int:
    """What autograd saves for the case-level part of a step: the loss on the blended logits (measured:
    the same loss on a leaf of the logits' shape), the case and the blending weights."""
    logits = torch.zeros((1, num_classes, *x.shape[2:]), requires_grad=True)
    with SavedBytes() as tally:
        _dice_ce(logits, y)
    return tally.peak + x.numel() * 4 + x[0, 0].numel() * 4


@pytest.mark.parametrize("conf, small, large, mirroring", [
    ("2d", (1, 2, 40, 40), (1, 8, 40, 40), True),          # 4x the slices
    ("3d_fullres", (1, 10, 36, 36), (1, 10, 72, 72), False),  # 4x the volume, 4x the windows
])
def test_memory_held_for_backward_does_not_grow_with_the_case(nets, conf, small, large, mirroring, one_thread):
    """Bytes saved for backward, at their peak: the case's own arrays plus one window's graph. Growing
    the case 4x adds only what its own arrays grow by; autograd through the whole prediction (the
    whole-graph implementation) holds every window's graph and fails that bound."""
    p = nets[conf]
    p.use_mirroring = mirroring
    gen = torch.Generator().manual_seed(3)
    peaks = {}
    for name, shape in (("small", small), ("large", large)):
        x = torch.randn(shape, generator=gen)[None]
        y = torch.randint(0, 3, (1, 1, *shape[1:]), generator=gen)
        peaks[name] = {"windowed": _saved_bytes(_ours(p), x, y), "whole": _saved_bytes(_ours(p, whole_graph=True), x, y),
                       "case": _case_bytes(x, y, 3)}
    s, big = peaks["small"], peaks["large"]
    allowed = big["case"] - s["case"]
    assert big["windowed"] - s["windowed"] <= allowed, (peaks, allowed)
    assert big["whole"] - s["whole"] > allowed + 2 * (s["windowed"] - s["case"]), peaks
    assert s["windowed"] < s["whole"]


def test_a_case_smaller_than_the_patch_is_padded_and_cropped_back(nets, one_thread):
    p = nets["3d_fullres"]
    p.use_mirroring = False
    x = torch.randn((1, 5, 20, 33), generator=torch.Generator().manual_seed(4))
    theirs = p.predict_sliding_window_return_logits(x).float()
    with torch.no_grad():
        ours = _ours(p)(x[None])[0]
    assert ours.shape == theirs.shape == (3, 5, 20, 33)
    assert bool(((ours - theirs).abs() <= fp16_bound(_ours(p), x)).all())
    assert np.isfinite(ours.numpy()).all()


@pytest.mark.parametrize("attack", sorted(__import__("nnunet_ima_eval.attacks", fromlist=["ATTACKS"]).ATTACKS))
def test_every_registry_attack_runs_on_a_whole_case_within_each_slices_ball(nets, attack, one_thread):
    """The case scope's attack: the registry entry, unchanged, on the blended prediction of a whole 2d-model
    case with every slice in its own eps-ball (a product of balls)."""
    from nnunet_ima.block_norm import BlockNorm
    from nnunet_ima_eval.attacks import ATTACKS
    from nnunet_ima_eval.model import PerSampleLoss

    p = nets["2d"]
    p.use_mirroring = False
    gen = torch.Generator().manual_seed(6)
    x = torch.randn((1, 1, 3, 40, 36), generator=gen)
    y = torch.randint(0, 3, (1, 1, 3, 40, 36), generator=gen)
    norm = BlockNorm("l2", (1, None, None))
    x_adv = ATTACKS[attack].run(_ours(p), x, y, 2.0, norm=norm, steps=2, loss=PerSampleLoss("dicece", False, None),
                                generator=gen)
    per_slice = norm.block_measure(x_adv - x)[0]
    assert x_adv.shape == x.shape and bool(torch.isfinite(x_adv).all())
    assert float(per_slice.max()) <= 2.0 * (1 + 1e-5) and float(per_slice.min()) > 0
