"""Batched conjugate gradient for Hermitian positive (semi)definite systems ``(N + lam I) x = rhs``.

The leading ``batch_dims`` axes index independent systems (e.g. K posterior samples solved at once); inner
products reduce over the remaining axes. Systems that reach the tolerance are frozen while the others go on.
"""
from __future__ import annotations

import logging
from typing import Callable

import torch

log = logging.getLogger(__name__)


def _dot(a: torch.Tensor, b: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """Re <a, b> = Re sum conj(a) b over dims (keepdim), real tensor."""
    return (a.conj() * b).real.sum(dim=dims, keepdim=True)


def cg(
    normal: Callable[[torch.Tensor], torch.Tensor],
    rhs: torch.Tensor,
    lam: float | torch.Tensor = 0.0,
    iters: int = 30,
    tol: float = 1e-6,
    x0: torch.Tensor | None = None,
    batch_dims: int = 0,
) -> tuple[torch.Tensor, dict[str, float | int]]:
    """Solve ``normal(x) + lam * x = rhs`` by CG.

    normal: x -> N x, Hermitian PSD, acting on tensors shaped like rhs (it must treat the batch axes
    independently). rhs: (*batch, ...) with ``batch_dims`` leading batch axes. iters: max iterations (0 returns
    x0). lam: a number, or a tensor broadcasting against rhs (one weight per system, e.g. (S, 1, 1, 1)).
    tol: stop a system when ||r|| <= tol * ||rhs||. Returns x (same shape as rhs) and
    {iterations, max_rel_residual}.
    """
    if iters < 0:
        raise ValueError(f"cg iterations must be >= 0, got {iters}")
    if bool((torch.as_tensor(lam) < 0).any()):
        raise ValueError(f"lam must be >= 0, got {lam}")
    if not 0 <= batch_dims < rhs.dim():
        raise ValueError(f"batch_dims must be in [0, {rhs.dim() - 1}], got {batch_dims}")
    dims = tuple(range(batch_dims, rhs.dim()))

    def A(v: torch.Tensor) -> torch.Tensor:
        out = normal(v)
        return out + lam * v if torch.is_tensor(lam) or lam else out

    x = torch.zeros_like(rhs) if x0 is None else x0.clone()
    r = rhs - A(x) if x0 is not None else rhs.clone()
    p = r.clone()
    rr = _dot(r, r, dims)
    bnorm = _dot(rhs, rhs, dims).sqrt().clamp_min(torch.finfo(rr.dtype).tiny)
    done = rr.sqrt() <= tol * bnorm
    it = 0
    for it in range(1, iters + 1):
        if bool(done.all()):
            it -= 1
            break
        Ap = A(p)
        pAp = _dot(p, Ap, dims)
        alpha = torch.where(done | (pAp <= 0), torch.zeros_like(rr), rr / pAp.clamp_min(torch.finfo(rr.dtype).tiny))
        x = x + alpha * p
        r = r - alpha * Ap
        rr_new = _dot(r, r, dims)
        beta = torch.where(done, torch.zeros_like(rr), rr_new / rr.clamp_min(torch.finfo(rr.dtype).tiny))
        p = r + beta * p
        rr = torch.where(done, rr, rr_new)
        done = done | (rr.sqrt() <= tol * bnorm)
    rel = float((rr.sqrt() / bnorm).max())
    log.debug("cg: %d iterations, max relative residual %.3g", it, rel)
    return x, {"iterations": it, "max_rel_residual": rel}
