"""Data consistency: the ONE module every sampler calls to pull an image estimate back towards the data.

Variants (``sampler.dc``):

- ``replace``: single-coil k-space replacement, an exact projection onto {x : M F S x = y} when C == 1 and
  |S| = 1 (the paper's single-coil step: ``x <- S^* F^H ((1 - M) F S x + y)``).
- ``ssos``: the official multi-coil variant of HJ-harry/score-MRI (``get_pc_fouriercs_RI_PI_SSOS``): the
  state holds one image per coil, each coil's k-space is replaced by its data; the sampler combines the coil
  images by root-sum-of-squares at the end.
- ``hybrid``: the official ``get_pc_fouriercs_RI_coil_SENSE``: SSOS plus, every ``every`` levels, one SENSE
  Landweber step with a linear lambda schedule 1.0 -> 0.2. The official code multiplies the *coil* images
  by the maps again inside A and adds the same combined correction to every coil; we apply the step to the
  combined image u = sum_c S_c^* x_c (u' = u + lam A^H (y - A u)) and add S_c (u' - u) to each coil image,
  which is the physically meaningful form of the same step.
- ``sense`` (ours, the default): a few CG iterations on the SENSE normal equations A^H A x = A^H y started
  from the current combined image (the DDS Krylov-subspace step; early stopping regularises); with
  ``mu`` > 0 the proximal form (A^H A + mu I) x = A^H y + mu x0 (DDS's gamma = 1 / mu), which keeps noisy
  data from pulling x too far from the denoised x0.
- ``sense_grad`` (ours): one gradient (Landweber) step x <- x + lam A^H (y - A x) with the same linear
  lambda schedule; stable for lam < 2 since ||A^H A|| <= 1 (orthonormal FFT, sum_c |S_c|^2 <= 1).

Combined-image variants (replace, sense, sense_grad) set the image to zero where all coil maps are zero
(outside the ESPIRiT support no data constrains it; SENSE images are zero there too).

Shapes, one slice: k-space data ``(C, ky, kx)``, mask ``(ky, kx)`` {0, 1}, maps ``(C, ny, nx)``; the state is
K combined images ``(K, ny, nx)`` or coil images ``(K, C, ny, nx)``. A batch of S slices: data ``(S, C, ky, kx)``,
mask ``(S, ky, kx)``, maps ``(S, C, ny, nx)`` and state ``(S, K, ny, nx)`` / ``(S, K, C, ny, nx)``: every slice
with its own data, mask and maps. All in the same units (the samplers pass data and images already divided
by the prior scale).
"""
from __future__ import annotations

import logging
from typing import Callable

import torch

from .cg import cg as shared_cg
from .fft import fft2c, ifft2c
from .operators import SenseOp

log = logging.getLogger(__name__)

DC_KINDS = ("replace", "ssos", "hybrid", "sense", "sense_grad")
COIL_KINDS = ("ssos", "hybrid")  # the state holds one image per coil


def cg(
    normal: Callable[[torch.Tensor], torch.Tensor],
    rhs: torch.Tensor,
    x0: torch.Tensor,
    iters: int,
    lam: float = 0.0,
    tol: float = 0.0,
) -> torch.Tensor:
    """Batched CG on (N + lam I) x = rhs from x0, each (..., ny, nx) image its own system (the shared
    ``recon.cg.cg``, leading axes as batch); at most ``iters`` iterations, stop at ||r|| <= tol ||rhs||."""
    if iters <= 0:
        return x0.clone()
    x, _ = shared_cg(normal, rhs, lam=lam, iters=iters, tol=tol, x0=x0, batch_dims=rhs.dim() - 2)
    return x


def linear_lambda(level: int, n_levels: int, start: float = 1.0, end: float = 0.2) -> float:
    """The official ``lambda_schedule_linear``: start + (end - start) * level / n_levels."""
    return start + (end - start) * level / max(n_levels, 1)


class DataConsistency:
    """Data consistency for one slice or a batch of slices; built once per problem, called after every
    sampler step.

    kspace (C, ky, kx) or (S, C, ky, kx) measured data (zeros elsewhere), mask (ky, kx) or (S, ky, kx), maps
    (C, ny, nx) or (S, C, ny, nx); kind one of DC_KINDS; iters: CG steps per call ('sense'); n_levels: length
    of the sampler's level loop (for the lambda schedules); every: hybrid SENSE step period;
    lam_start/lam_end: the linear lambda schedule.
    """

    def __init__(
        self,
        kspace: torch.Tensor,
        mask: torch.Tensor,
        maps: torch.Tensor,
        kind: str = "sense",
        iters: int = 5,
        n_levels: int = 1,
        every: int = 50,
        lam_start: float = 1.0,
        lam_end: float = 0.2,
        mu: float = 0.0,
    ) -> None:
        if kind not in DC_KINDS:
            raise ValueError(f"data consistency '{kind}' is not one of {', '.join(DC_KINDS)}")
        if kspace.shape != maps.shape:
            raise ValueError(f"kspace {tuple(kspace.shape)} and maps {tuple(maps.shape)} differ in shape")
        if kspace.dim() not in (3, 4):
            raise ValueError(f"kspace must be (C, ky, kx) or (S, C, ky, kx), got {tuple(kspace.shape)}")
        ncoil = kspace.shape[-3]
        if kind == "replace" and ncoil != 1:
            raise ValueError(
                f"dc 'replace' is the single-coil projection but the data has {ncoil} coils: "
                "use 'ssos', 'hybrid', 'sense' or 'sense_grad'"
            )
        self.batched = kspace.dim() == 4
        mask = mask.to(device=kspace.device, dtype=kspace.real.dtype)
        if self.batched:  # a samples axis K after the slice axis: (S, 1, C, ky, kx), (S, 1, 1, ky, kx)
            if mask.dim() != 3 or mask.shape[0] != kspace.shape[0]:
                raise ValueError(f"mask {tuple(mask.shape)} must be (S, ky, kx) for kspace {tuple(kspace.shape)}")
            kspace, maps, mask = kspace.unsqueeze(1), maps.unsqueeze(1), mask[:, None, None]
        self.kind = kind
        self.y = kspace
        self.mask = mask
        self.maps = maps
        self.op = SenseOp(maps, self.mask)
        self.iters = int(iters)
        self.n_levels = int(n_levels)
        self.every = max(int(every), 1)
        self.lam_start = float(lam_start)
        self.lam_end = float(lam_end)
        self.mu = float(mu)
        self._aty = self.op.adjoint(kspace)
        # where every coil map is zero (ESPIRiT crop) no data constrains the image: the combined-image
        # variants set it to zero there, as SENSE does (otherwise the prior fills the background freely)
        power = maps.abs().pow(2).sum(-3)
        self.support = (power > 0).to(kspace.real.dtype)
        self._full_support = bool(self.support.all())
        self._aty_cg = self.op.to_cg(self._aty)

    @property
    def coilwise(self) -> bool:
        """True when the sampler state is one image per coil (B, C, ny, nx)."""
        return self.kind in COIL_KINDS

    # ----------------------------------------------------------------------------------------- helpers
    def combine(self, x: torch.Tensor) -> torch.Tensor:
        """Coil images (..., C, ny, nx) -> combined image (..., ny, nx) = sum_c S_c^* x_c."""
        return (self.maps.conj() * x).sum(dim=-3)

    def expand(self, u: torch.Tensor) -> torch.Tensor:
        """Combined image (..., ny, nx) -> coil images (..., C, ny, nx) = S_c u."""
        return self.maps * u.unsqueeze(-3)

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        """||A x - y|| per image: x combined (K, ny, nx) or coil images (K, C, ny, nx) -> (K,); batched
        (S, K, ...) -> (S, K)."""
        if self.coilwise:
            r = self.mask * fft2c(x) - self.y
        else:
            r = self.op.forward(x) - self.y
        lead = 2 if self.batched else 1
        return torch.linalg.vector_norm(r.flatten(lead), dim=lead)

    def sense_cg(self, x: torch.Tensor, iters: int | None = None, mu: float | torch.Tensor | None = None
                 ) -> torch.Tensor:
        """``iters`` CG steps on (A^H A + mu I) v = A^H y + mu x from v = x: (..., K, ny, nx) -> same; mu a number
        or one weight per slice, (S, 1, 1, 1) for a batch.

        CG runs in the operator's CG domain (``SenseOp.to_cg``): two image permutations per call instead of
        four coil-tensor shifts per iteration."""
        mu = self.mu if mu is None else mu
        xs = self.op.to_cg(x)
        rhs = self._aty_cg.expand_as(xs) + mu * xs if torch.is_tensor(mu) or mu > 0 else self._aty_cg.expand_as(xs)
        out = cg(self.op.normal_cg, rhs, xs, self.iters if iters is None else iters, lam=mu)
        return self.op.from_cg(out)

    def lam(self, level: int) -> float:
        return linear_lambda(level, self.n_levels, self.lam_start, self.lam_end)

    # ------------------------------------------------------------------------------------------ apply
    def __call__(self, x: torch.Tensor, level: int = 0, end_of_level: bool = True,
                 mu: float | torch.Tensor | None = None) -> torch.Tensor:
        """Apply the configured data consistency at sampler level ``level`` (0-based).

        x: (K, ny, nx) combined images, or (K, C, ny, nx) coil images for 'ssos'/'hybrid' (batched: (S, K, ...)).
        end_of_level: the hybrid SENSE step runs only on the last call of a level (after the official
        code's coil loop), every ``every`` levels. mu: the 'sense' proximal weight of this call, a number or
        one per slice (S, 1, 1, 1) (default: the one given at construction).
        """
        k = self.kind
        if k in ("sense", "sense_grad", "replace"):
            if k == "sense":
                x = self.sense_cg(x, mu=mu)
            elif k == "sense_grad":
                x = x + self.lam(level) * self.op.adjoint(self.y - self.op.forward(x))
            else:
                m0, y0 = self.maps[..., 0, :, :], self.y[..., 0, :, :]
                mk = self.mask[..., 0, :, :] if self.batched else self.mask
                coil = ifft2c(fft2c(m0 * x) * (1 - mk) + y0)
                x = m0.conj() * coil
            return x if self._full_support else x * self.support
        # coil-wise: replace each coil's measured k-space by its data
        ncoil = self.y.shape[-3]
        if x.dim() < (5 if self.batched else 4) or x.shape[-3] != ncoil:
            want = f"(S, K, {ncoil}, ny, nx)" if self.batched else f"(K, {ncoil}, ny, nx)"
            raise ValueError(f"dc '{k}' needs coil images {want}, got {tuple(x.shape)}")
        x = ifft2c(fft2c(x) * (1 - self.mask) + self.y)
        if k == "hybrid" and end_of_level and level % self.every == 0:
            u = self.combine(x)
            du = self.lam(level) * self.op.adjoint(self.y - self.op.forward(u))
            x = x + self.expand(du)
        return x
