"""The product-of-balls norm (nnunet_ima/block_norm.py): every block of a sample in its own ball,
checked block by block against slices cut by hand."""
from __future__ import annotations

import itertools

import pytest
import torch

from nnunet_ima.attacks import perturb_iterative
from nnunet_ima.block_norm import BlockNorm
from nnunet_ima.norms import get_norm
from nnunet_ima_eval.attacks import ATTACKS


def hand_blocks(t: torch.Tensor, block: tuple) -> list[list[torch.Tensor]]:
    """Per sample, its blocks cut with plain slicing (grid from the origin, short last blocks)."""
    spatial = t.shape[2:]
    size = [s if b is None else b for b, s in zip(block, spatial)]
    starts = [range(0, s, k) for s, k in zip(spatial, size)]
    return [[t[(i, slice(None), *[slice(a, a + k) for a, k in zip(st, size)])] for st in itertools.product(*starts)]
            for i in range(t.shape[0])]


SHAPES = [((2, 1, 5, 7, 9), (1, None, None)),   # a 2d model's case: every slice a block
          ((2, 2, 10, 13, 11), (4, 6, 5)),     # a 3d model's case: patch-grid tiles, short ones at the far end
          ((1, 1, 3, 8, 8), (8, 8, 8))]         # one block larger than the case


@pytest.mark.parametrize("shape, block", SHAPES)
def test_blocks_are_the_grid_tiles_and_round_trip(shape, block):
    t = torch.randn(shape)
    norm = BlockNorm("l2", block)
    hand = hand_blocks(t, block)
    blocks = norm.to_blocks(t)
    assert blocks.shape[0] == shape[0] * len(hand[0]) == shape[0] * norm.count(shape[2:])
    got = norm.block_measure(t)
    want = torch.tensor([[float(b.norm()) for b in row] for row in hand])
    assert torch.allclose(got, want, rtol=1e-5)
    assert torch.equal(norm.from_blocks(blocks, t), t)


@pytest.mark.parametrize("base", ["l2", "linf"])
@pytest.mark.parametrize("shape, block", SHAPES)
def test_projection_keeps_every_block_in_its_ball(base, shape, block):
    norm, plain = BlockNorm(base, block), get_norm(base)
    d = 3 * torch.randn(shape)
    eps = torch.tensor([0.7, 2.0][:shape[0]])
    p = norm.project(d, eps)
    for i, row in enumerate(hand_blocks(p, block)):
        for b, orig in zip(row, hand_blocks(d, block)[i]):
            n = float(plain.measure(b[None])[0])
            assert n <= float(eps[i]) * (1 + 1e-5)
            if float(plain.measure(orig[None])[0]) <= float(eps[i]):
                assert torch.allclose(b, orig)  # a block already inside is left alone
    largest = [max(float(plain.measure(b[None])[0]) for b in row) for row in hand_blocks(p, block)]
    assert torch.allclose(norm.measure(p), torch.tensor(largest), rtol=1e-5)


@pytest.mark.parametrize("base", ["l2", "linf"])
def test_eps_zero_returns_the_case(base):
    shape, block = SHAPES[1]
    norm = BlockNorm(base, block)
    x = torch.randn(shape)
    assert torch.equal(norm.project(torch.randn(shape), torch.zeros(shape[0])), torch.zeros(shape))
    model = torch.nn.Conv3d(2, 3, 3, padding=1)
    y = torch.randint(0, 3, (shape[0], *shape[2:]))
    for random_start in (False, True):
        out = perturb_iterative(model, x, y, 0.0, norm=norm, steps=3, random_start=random_start,
                                generator=torch.Generator().manual_seed(0))
        assert torch.equal(out, x)


@pytest.mark.parametrize("base", ["l2", "linf"])
def test_direction_random_and_boundary_are_per_block(base):
    shape, block = SHAPES[1]
    norm, plain = BlockNorm(base, block), get_norm(base)
    gen = torch.Generator().manual_seed(1)
    x = torch.zeros(shape)
    eps = torch.tensor([0.5, 1.5])
    step = norm.direction(torch.randn(shape, generator=gen))
    on = norm.boundary(x, eps, gen)
    inside = norm.random(x, eps, gen)
    for i in range(shape[0]):
        for s, b, r in zip(hand_blocks(step, block)[i], hand_blocks(on, block)[i], hand_blocks(inside, block)[i]):
            assert float(plain.measure(s[None])[0]) == pytest.approx(1.0, rel=1e-5)   # a unit step per block
            assert float(plain.measure(b[None])[0]) == pytest.approx(float(eps[i]), rel=1e-5)
            assert float(plain.measure(r[None])[0]) <= float(eps[i]) * (1 + 1e-5)


def test_random_start_respects_the_region():
    shape, block = SHAPES[0]
    norm = BlockNorm("l2", block)
    region = torch.ones(shape)
    region[..., 5:, :] = 0
    d = norm.random(torch.zeros(shape), torch.ones(shape[0]), torch.Generator().manual_seed(2), region)
    assert float(d[..., 5:, :].abs().max()) == 0.0 and float(d.abs().max()) > 0


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_every_registry_attack_with_blocks_keeps_every_block_in_its_ball(attack):
    shape, block = SHAPES[1]
    norm = BlockNorm("l2", block)
    torch.manual_seed(0)
    model = torch.nn.Conv3d(2, 3, 3, padding=1)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(shape, generator=gen)
    y = torch.randint(0, 3, (shape[0], *shape[2:]), generator=gen)
    x_adv = ATTACKS[attack].run(model, x, y, 0.8, norm=norm, steps=4, generator=gen)
    per_block = norm.block_measure(x_adv - x)
    assert float(per_block.max()) <= 0.8 * (1 + 1e-5)
    assert float(per_block.min()) > 0.2, per_block  # every block moved
    assert float(get_norm("l2").measure(x_adv - x).max()) > 0.8 * 1.5  # more than one ball's worth in total
