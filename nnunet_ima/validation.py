"""Input checks shared by every attack: one clear error naming the argument at fault."""
from __future__ import annotations

import warnings

import torch


class NonFiniteInputWarning(UserWarning):
    """Some samples contain NaN/Inf: they are left unattacked and flagged invalid."""


def batch_index(y, idx):
    """Index the batch dimension of a tensor or of every tensor in a (nested) list/tuple."""
    if isinstance(y, (list, tuple)):
        return type(y)(batch_index(t, idx) for t in y)
    return y[idx]


def on_finite_rows(fn, x: torch.Tensor, valid: torch.Tensor, *batched):
    """Run ``fn(x[valid], *[b[valid] for b in batched])`` (None passes through) and return x with those
    rows replaced: the samples flagged non-finite come back unchanged. Shape: x (B, ...), valid (B,)."""
    out = x.detach().clone()
    if bool(valid.any()):
        out[valid] = fn(x[valid], *(None if b is None else batch_index(b, valid) for b in batched))
    return out


def keep_finite(x_adv: torch.Tensor, x: torch.Tensor, finite: torch.Tensor | None = None):
    """``x_adv`` with the clean ``x`` back in every row that is not finite (or not flagged in ``finite``
    (B,), when given): returns (rows, finite (B,) bool). An attack that overflowed trains on x."""
    ok = torch.isfinite(x_adv.flatten(1)).all(1)
    ok = ok if finite is None else ok & finite
    if not bool(ok.all()):
        x_adv = torch.where(ok.view(-1, *[1] * (x.dim() - 1)), x_adv, x)
    return x_adv, ok


def batch_size(y) -> int:
    return batch_size(y[0]) if isinstance(y, (list, tuple)) else y.shape[0]  # deep supervision: scale 0


def check_inputs(x: torch.Tensor, y, eps) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate ``x``, ``y``, ``eps``; return (eps as a (B,) tensor, finite-sample mask (B,))."""
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        raise ValueError(f"x must be a tensor of shape (B, ...), got {getattr(x, 'shape', type(x))}")
    b = x.shape[0]
    if batch_size(y) != b:
        raise ValueError(f"y: batch size {batch_size(y)} does not match x's batch size {b}")
    eps_t = as_eps(eps, b, x.device)
    valid = torch.isfinite(x.flatten(1)).all(1)
    if not bool(valid.all()):
        warnings.warn(
            f"x: {int((~valid).sum())} of {b} samples contain NaN/Inf; they are not attacked "
            f"(indices {torch.nonzero(~valid).flatten().tolist()[:20]})",
            NonFiniteInputWarning,
            stacklevel=3,
        )
    return eps_t, valid


def as_eps(eps, b: int, device) -> torch.Tensor:
    """A float or a (B,) tensor of budgets -> (B,) float32 tensor, rejecting negatives and NaN."""
    if isinstance(eps, torch.Tensor):
        e = eps.detach().to(device=device, dtype=torch.float32)
        if e.dim() == 0:
            e = e.expand(b)
        if e.shape != (b,):
            raise ValueError(f"eps: expected a float or a tensor of shape ({b},), got shape {tuple(e.shape)}")
    else:
        try:
            e = torch.full((b,), float(eps), device=device)
        except (TypeError, ValueError):
            raise ValueError(f"eps: expected a float or a (B,) tensor, got {eps!r}") from None
    if not bool(torch.isfinite(e).all()):
        raise ValueError("eps: must be finite")
    if bool((e < 0).any()):
        raise ValueError(f"eps: must be >= 0, got min {float(e.min())}")
    return e.contiguous()
