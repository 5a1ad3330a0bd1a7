"""Norm strategies for norm-bounded attacks.

A norm is one small object with four operations, so that every attack is written once and works
for any norm (no ``if norm == "l2"`` chains):

* ``measure(d)``      -> (B,) per-sample norm of a batch of perturbations ``d``;
* ``direction(g)``    -> the steepest-ascent direction h(g) of the papers (unit L2 gradient, or sign);
* ``project(d, eps)`` -> the perturbation projected back onto the per-sample eps-ball;
* ``random(x, eps)``  -> a random perturbation drawn uniformly from the per-sample eps-ball;
* ``boundary(x, eps)`` -> a random perturbation on the ball's boundary (the full budget: random-noise
  baselines and random search).

``eps`` is always a (B,) tensor here; :func:`nnunet_ima.validation.as_eps` converts user input.
``region`` (optional, broadcastable to x, e.g. (B, 1, *S)): the input elements a perturbation may
touch (1 on the real image, 0 on padding). The random draws then live in that subspace and the whole
budget goes there: a uniform point of the ball restricted to the region, not a point of the full
ball with its padding part cut away afterwards. ``generator``: a ``torch.Generator``, None, or one
generator per sample (:class:`nnunet_ima.rng.SampleGenerators`: each sample's draw then does not
depend on the batch it is in).
"""
from __future__ import annotations

import torch

from .rng import rand, randn

_TINY = 1e-12


def per_sample_view(eps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a (B,) tensor so that it broadcasts against a (B, ...) tensor."""
    return eps.to(dtype=like.dtype).view(-1, *([1] * (like.dim() - 1)))


def as_region(region, x: torch.Tensor) -> torch.Tensor | None:
    """None, or ``region`` as a float 0/1 tensor of x's shape (on x's device): the elements an attack
    may change. Raises ValueError when it does not broadcast against x."""
    if region is None:
        return None
    try:
        return torch.broadcast_to(region.to(device=x.device, dtype=x.dtype) != 0, x.shape).to(x.dtype)
    except (RuntimeError, AttributeError):
        raise ValueError(f"region: expected a tensor broadcastable to x's shape {tuple(x.shape)}, "
                         f"got {tuple(getattr(region, 'shape', ())) or type(region).__name__}") from None


def restrict(d: torch.Tensor, region: torch.Tensor | None) -> torch.Tensor:
    """``d`` with 0 outside ``region`` (a float 0/1 tensor of d's shape, see :func:`as_region`)."""
    return d if region is None else d * region


class Norm:
    """Base class: subclasses implement the four operations for one norm."""

    name: str = ""

    def measure(self, d: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def direction(self, g: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def project(self, d: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def random(self, x: torch.Tensor, eps: torch.Tensor, generator: torch.Generator | None = None,
               region: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def boundary(self, x: torch.Tensor, eps: torch.Tensor, generator: torch.Generator | None = None,
                 region: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class L2(Norm):
    """Euclidean norm over all non-batch dimensions (the papers' choice for every experiment)."""

    name = "l2"

    def measure(self, d):
        return d.flatten(1).norm(p=2, dim=1)

    def direction(self, g):
        return g / (per_sample_view(self.measure(g), g) + _TINY)

    def project(self, d, eps):
        n = self.measure(d)
        factor = torch.clamp(eps.to(n.dtype) / (n + _TINY), max=1.0)
        return d * per_sample_view(factor, d)

    def random(self, x, eps, generator=None, region=None):
        # uniform in the ball (of the region's subspace): Gaussian direction, radius eps * u^(1/dim)
        region = as_region(region, x)
        g = restrict(randn(x.shape, generator, x.device, x.dtype), region)
        power = 1.0 / x[0].numel() if region is None else 1.0 / region.flatten(1).sum(1).clamp(min=1)
        u = rand((x.shape[0],), generator, x.device, x.dtype)
        radius = eps.to(x.dtype) * u.pow(power)
        return self.direction(g) * per_sample_view(radius, x)

    def boundary(self, x, eps, generator=None, region=None):
        # uniform on the sphere of radius eps (of the region's subspace): a normalised Gaussian
        g = randn(x.shape, generator, x.device, x.dtype)
        return self.direction(restrict(g, as_region(region, x))) * per_sample_view(eps, x)


class Linf(Norm):
    """Maximum-absolute-value norm; the direction is the sign of the gradient (FGSM/PGD-Linf)."""

    name = "linf"

    def measure(self, d):
        return d.flatten(1).abs().amax(dim=1)

    def direction(self, g):
        return g.sign()

    def project(self, d, eps):
        e = per_sample_view(eps, d)
        return torch.maximum(torch.minimum(d, e), -e)

    def random(self, x, eps, generator=None, region=None):
        u = rand(x.shape, generator, x.device, x.dtype)
        return restrict((2 * u - 1) * per_sample_view(eps, x), as_region(region, x))

    def boundary(self, x, eps, generator=None, region=None):
        # a uniformly drawn vertex of the box (of the region): +-eps in every coordinate
        u = rand(x.shape, generator, x.device, x.dtype)
        return restrict(torch.where(u < 0.5, -1.0, 1.0).to(x.dtype) * per_sample_view(eps, x), as_region(region, x))


NORMS: dict[str, type[Norm]] = {"l2": L2, "linf": Linf}


def get_norm(norm: str | Norm) -> Norm:
    """Return a :class:`Norm` for a name ("l2", "linf") or pass a Norm instance through."""
    if isinstance(norm, Norm):
        return norm
    key = str(norm).lower()
    if key not in NORMS:
        raise ValueError(f"norm: unknown norm {norm!r}; known norms are {sorted(NORMS)}")
    return NORMS[key]()
