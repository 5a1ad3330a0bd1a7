"""Random draws for a batch: one generator for the whole batch, or one generator per sample.

An attack's random start is drawn by the norm (:meth:`nnunet_ima.norms.Norm.random`) through
:func:`randn` / :func:`rand`. With a ``torch.Generator`` (or None) the batch is one draw, as
``torch.randn`` does it. With :class:`SampleGenerators` row i of every draw comes from generator i
alone, so a sample's random start is the same whatever batch it is in, whatever the batch size and
whichever process attacks it (the evaluation seeds each sample's generator from its identity).

>>> gens = SampleGenerators.seeded([11, 12, 13])
>>> d = randn((3, 1, 8, 8), gens, torch.device("cpu"), torch.float32)
>>> torch.equal(d[1:2], torch.randn((1, 1, 8, 8), generator=torch.Generator().manual_seed(12)))
True
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch


class SampleGenerators:
    """One ``torch.Generator`` per sample of a batch (B generators for a batch of B samples).

    A draw of shape (B, ...) takes row i, of shape (1, ...), from generator i, on that generator's
    device, and moves the result to the device asked for: CPU generators give the same numbers on
    every device. The number of generators must equal the batch size of every draw.
    """

    def __init__(self, generators: Sequence[torch.Generator]):
        self.generators = list(generators)

    @classmethod
    def seeded(cls, seeds: Sequence[int], device="cpu") -> "SampleGenerators":
        """Generators on ``device`` seeded with ``seeds`` (one per sample)."""
        return cls([torch.Generator(device=device).manual_seed(int(s)) for s in seeds])

    def __len__(self) -> int:
        return len(self.generators)

    def draw(self, fn: Callable, shape, device, dtype) -> torch.Tensor:
        """``fn`` (torch.randn / torch.rand) row by row: (B, ...) with row i from generator i."""
        shape = tuple(shape)
        if not shape or shape[0] != len(self):
            raise ValueError(f"SampleGenerators: {len(self)} generators for a draw of shape {shape} "
                             f"(one generator per sample)")
        rows = [fn((1, *shape[1:]), generator=g, device=g.device, dtype=dtype) for g in self.generators]
        return torch.cat(rows).to(device)


def randn(shape, generator, device, dtype) -> torch.Tensor:
    """Standard normal draw of ``shape``: from ``generator`` (a torch.Generator, None, or
    :class:`SampleGenerators`)."""
    if isinstance(generator, SampleGenerators):
        return generator.draw(torch.randn, shape, device, dtype)
    return torch.randn(shape, generator=generator, device=device, dtype=dtype)


def rand(shape, generator, device, dtype) -> torch.Tensor:
    """Uniform [0, 1) draw of ``shape``, as :func:`randn`."""
    if isinstance(generator, SampleGenerators):
        return generator.draw(torch.rand, shape, device, dtype)
    return torch.rand(shape, generator=generator, device=device, dtype=dtype)
