"""A product of balls: each block of a sample's perturbation in its own eps-ball.

:class:`BlockNorm` is a :class:`~nnunet_ima.norms.Norm` (the same four operations, so every attack of
the kernel runs with it unchanged) that cuts each sample (B, C, *S) into blocks of ``block`` voxels on
a regular grid from the origin (the last block of an axis may be shorter) and applies a base norm to
every block on its own:

* ``project(d, eps)``: each block projected onto its own eps-ball (eps per sample, the same for all
  of its blocks);
* ``direction(g)``: the base norm's steepest-ascent direction per block (unit L2 per block, or the
  sign), so a step of size alpha moves every block by alpha, as it would move a sample of its own;
* ``random`` / ``boundary``: per block, uniform in / on its ball;
* ``measure(d)``: the largest block norm of each sample, so ``measure(d) <= eps`` says exactly that
  every block lies in its ball.

For Linf the product of the blocks' balls is the sample's own Linf ball; for L2 it is a strict subset
of the L2 ball of radius eps * sqrt(number of blocks). This is what makes the whole-case attack of
``nnunet-ima-attack --scope case`` spend the budget eps has in the slice / tile scope: for a 2d model
the blocks are the slices of the volume (``block = (1, None, None)``: None = the whole axis), for a 3d
model the tiles of the patch-size grid.

>>> norm = BlockNorm("l2", (1, None, None))       # every slice of a (B, C, Z, Y, X) volume in its ball
>>> x_adv = pgd(case_model, x, y, eps=2.0, norm=norm)
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .norms import Norm, as_region, get_norm


class BlockNorm(Norm):
    """``base`` (a norm or its name) applied to each block of ``block`` voxels (one entry per spatial
    axis; None = the whole axis) of every sample, as a product of balls."""

    def __init__(self, base: str | Norm, block: tuple):
        self.base = get_norm(base)
        if isinstance(self.base, BlockNorm):
            raise ValueError("BlockNorm: the base norm must be a plain norm")
        if any(b is not None and int(b) < 1 for b in block):
            raise ValueError(f"BlockNorm: block sizes must be >= 1 or None, got {block!r}")
        self.block = tuple(None if b is None else int(b) for b in block)
        self.name = self.base.name

    def __repr__(self) -> str:
        return f"BlockNorm({self.base.name!r}, {self.block})"

    # ------------------------------------------------------------------------------------------ blocks
    def sizes(self, spatial: tuple) -> tuple:
        """The block size along each axis of a sample of spatial shape ``spatial``."""
        if len(spatial) != len(self.block):
            raise ValueError(f"BlockNorm: block {self.block} has {len(self.block)} axes, the input "
                             f"{len(spatial)} spatial axes")
        return tuple(s if b is None else min(b, s) for b, s in zip(self.block, spatial))

    def count(self, spatial: tuple) -> int:
        """Number of blocks of one sample of spatial shape ``spatial``."""
        return math.prod(-(-s // b) for s, b in zip(spatial, self.sizes(spatial)))

    def to_blocks(self, t: torch.Tensor) -> torch.Tensor:
        """(B, C, *S) -> (B * N, C, *block): zero-padded at the end of each axis to whole blocks, blocks
        ordered sample by sample, then in C order over the grid."""
        b, c, spatial = t.shape[0], t.shape[1], tuple(t.shape[2:])
        size = self.sizes(spatial)
        n = [-(-s // k) for s, k in zip(spatial, size)]
        pad = [p for s, k, m in reversed(list(zip(spatial, size, n))) for p in (0, m * k - s)]
        t = F.pad(t, pad) if any(pad) else t
        t = t.reshape(b, c, *[v for m, k in zip(n, size) for v in (m, k)])
        d = len(spatial)
        order = [0, *[2 + 2 * i for i in range(d)], 1, *[3 + 2 * i for i in range(d)]]
        return t.permute(order).reshape(b * math.prod(n), c, *size)

    def from_blocks(self, blocks: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`to_blocks` for tensors shaped like ``like`` (B, C, *S)."""
        b, c, spatial = like.shape[0], like.shape[1], tuple(like.shape[2:])
        size = self.sizes(spatial)
        n = [-(-s // k) for s, k in zip(spatial, size)]
        d = len(spatial)
        t = blocks.reshape(b, *n, c, *size)
        order = [0, d + 1, *[v for i in range(d) for v in (1 + i, d + 2 + i)]]
        t = t.permute(order).reshape(b, c, *[m * k for m, k in zip(n, size)])
        return t[(slice(None), slice(None), *[slice(0, s) for s in spatial])]

    def _eps(self, eps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """(B,) budgets -> (B * N,): every block of a sample gets the sample's eps."""
        return eps.repeat_interleave(self.count(tuple(like.shape[2:])))

    def _region(self, region, x: torch.Tensor) -> torch.Tensor:
        """Blocks of the region the perturbation may touch: ``region`` (all of x if None), never the
        padding that completes the last blocks."""
        r = as_region(region, x)
        return self.to_blocks(torch.ones_like(x) if r is None else r)

    # ------------------------------------------------------------------------------------------ the norm
    def block_measure(self, d: torch.Tensor) -> torch.Tensor:
        """(B, N): the base norm of every block of every sample."""
        return self.base.measure(self.to_blocks(d)).view(d.shape[0], -1)

    def measure(self, d: torch.Tensor) -> torch.Tensor:
        return self.block_measure(d).amax(1)

    def direction(self, g: torch.Tensor) -> torch.Tensor:
        return self.from_blocks(self.base.direction(self.to_blocks(g)), g)

    def project(self, d: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return self.from_blocks(self.base.project(self.to_blocks(d), self._eps(eps, d)), d)

    def random(self, x, eps, generator=None, region=None):
        xb = self.to_blocks(x)
        return self.from_blocks(self.base.random(xb, self._eps(eps, x), generator, self._region(region, x)), x)

    def boundary(self, x, eps, generator=None, region=None):
        xb = self.to_blocks(x)
        return self.from_blocks(self.base.boundary(xb, self._eps(eps, x), generator, self._region(region, x)), x)
