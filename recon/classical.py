"""Classical reconstructions registered with the entry point: ``zero_filled`` and ``sense``; and ``rss``.

Both return the coil-combined complex images (S, ny, nx) of the problem's S slices in the units of the data
(maps normalised to sum |S|^2 = 1, orthonormal FFT), no std, and ``nfe = 0``.
"""
from __future__ import annotations

from typing import Any

import torch

from .api import Problem
from .cg import cg
from .methods import register_method
from .operators import SenseOp


def rss(coil_images: torch.Tensor, dim: int = -3) -> torch.Tensor:
    """Root sum of squares over the coil axis: (..., C, ny, nx) -> (..., ny, nx) real."""
    return coil_images.abs().pow(2).sum(dim=dim).sqrt()


def sense_recon(
    kspace: torch.Tensor, mask: torch.Tensor, maps: torch.Tensor, lam: float, iters: int, tol: float = 1e-6
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Tikhonov SENSE: CG on (A^H A + lam I) x = A^H y from x = 0, each image its own system.

    kspace (..., C, ky, kx), maps (..., C, ny, nx), mask broadcastable to kspace -> (..., ny, nx)."""
    op = SenseOp(maps, mask)
    rhs = op.to_cg(op.adjoint(kspace))  # CG runs in the operator's (permuted) CG domain
    batch = rhs.dim() - 2
    x, info = cg(op.normal_cg, rhs, lam=lam, iters=iters, tol=tol, batch_dims=batch)
    return op.from_cg(x), {"cg_iterations": info["iterations"], "cg_rel_residual": info["max_rel_residual"]}


@register_method("zero_filled", needs_prior=False, description="coil-combined zero-filled image S^H F^H y")
def zero_filled(problem: Problem) -> tuple[torch.Tensor, None, dict[str, Any]]:
    """A^H y: zero-filled inverse FFT combined with the conjugate coil maps."""
    op = SenseOp(problem.maps, problem.mask[:, None])
    return op.adjoint(problem.kspace), None, {"nfe": 0}


@register_method("sense", needs_prior=False, description="Tikhonov SENSE: CG on (A^H A + lam I) x = A^H y")
def sense(problem: Problem) -> tuple[torch.Tensor, None, dict[str, Any]]:
    """Tikhonov-regularised SENSE with ``sampler.lam`` and ``sampler.cg_iters``."""
    cfg = problem.config.sampler
    with problem.clock("sense"):
        x, info = sense_recon(problem.kspace, problem.mask[:, None], problem.maps, cfg.lam, cfg.cg_iters)
    return x, None, {"nfe": 0, "lam": cfg.lam, **info}

