"""What the learned samplers share: prior loading (cached), scaling into the prior's range, the batched
and OOM-safe prior call, complex <-> (real, imag) batches, seeded noise, the per-acceleration row of the config.

Scale (documented convention): the complex image handed to the prior is ``x / scale`` with
``scale = sampler.scale_percentile (default 99.9) percentile of |x_sense|`` (the SENSE image of the slice,
CG on A^H A + lam I; a robust maximum), so the object's magnitude falls in about [0, 1] like the prior's
training images (each slice divided by its maximum); the samplers divide the data by
the same scale and multiply the result back, so outputs are in the units of the whitened data.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch

from scoremri.model.score import load_score_model

from ..api import Problem, ReconError
from ..config import SamplerConfig
from ..dc import DataConsistency

log = logging.getLogger(__name__)

_PRIOR_CACHE: dict[tuple[str, str, str, str, bool], Any] = {}


# ----------------------------------------------------------------------------------------------- prior
def get_prior(problem: Problem) -> Any:
    """The problem's prior, or the configured model loaded once per (path, backend, precision, device)."""
    if problem.prior is not None:
        return problem.prior
    m = problem.config.model
    key = (m.path, m.backend, m.precision, str(problem.device), m.compile)
    if key not in _PRIOR_CACHE:
        log.info("loading score model path=%r backend=%s on %s", m.path or "(default)", m.backend, problem.device)
        _PRIOR_CACHE[key] = load_score_model(m, problem.device)
    return _PRIOR_CACHE[key]


class PriorRunner:
    """Calls the prior on a batch of real images (B, 1, H, W) in chunks of at most ``chunk`` images.

    chunk 0 = the whole batch on CPU; on CUDA the chunk is sized from the measured peak memory of one image
    and the free memory. On CUDA out-of-memory the chunk halves (and stays halved) instead of failing; the
    number of network calls per part of an image is counted in ``nfe``.
    """

    def __init__(self, prior: Any, chunk: int = 0) -> None:
        self.prior = prior
        self.chunk = int(chunk)
        self.nfe = 0
        self._measured = self.chunk > 0

    def _measure(self, call: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor,
                 sigma: float) -> None:
        """CUDA, no ``sampler.batch``: run one image, measure its peak memory, size chunks to 80 % of free."""
        self._measured = True
        if not x.is_cuda or x.shape[0] <= 1:
            return
        torch.cuda.synchronize(x.device)
        base = torch.cuda.memory_allocated(x.device)
        torch.cuda.reset_peak_memory_stats(x.device)
        with torch.no_grad():
            call(x[:1], torch.full((1,), sigma, device=x.device))
        per_image = max(torch.cuda.max_memory_allocated(x.device) - base, 1)
        free, _ = torch.cuda.mem_get_info(x.device)
        self.chunk = max(int(0.8 * free / per_image), 1)
        log.info("network memory %.1f MB per image, %.1f GB free: %d images per call", per_image / 2**20,
                 free / 2**30, self.chunk)

    def __call__(self, fn: str, x: torch.Tensor, sigma: float) -> torch.Tensor:
        """fn 'score' or 'denoise'; x (B, 1, H, W) float32; sigma scalar (prior units) -> (B, 1, H, W)."""
        self.nfe += 1
        b = x.shape[0]
        call: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = getattr(self.prior, fn)
        if not self._measured:
            self._measure(call, x, sigma)
        while True:
            n = b if self.chunk <= 0 else min(self.chunk, b)
            try:
                with torch.no_grad():
                    outs = [
                        call(x[i : i + n], torch.full((x[i : i + n].shape[0],), sigma, device=x.device))
                        for i in range(0, b, n)
                    ]
                return torch.cat(outs, 0).to(x.dtype)
            except torch.OutOfMemoryError:
                if n <= 1:
                    raise
                self.chunk = max(n // 2, 1)
                log.warning("out of memory with %d images per network call: retrying with %d", n, self.chunk)
                if x.is_cuda:
                    torch.cuda.empty_cache()

    def complex(self, fn: str, z: torch.Tensor, sigma: float) -> torch.Tensor:
        """Complex images (..., H, W): real and imaginary parts through the prior in ONE batch."""
        shape = z.shape
        flat = z.reshape(-1, 1, *shape[-2:])
        ri = torch.cat([flat.real, flat.imag], 0).contiguous()
        out = self(fn, ri, sigma)
        n = flat.shape[0]
        return torch.complex(out[:n], out[n:]).reshape(shape)


def complex_noise(shape: tuple[int, ...], gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """Standard complex noise whose real and imaginary parts are each N(0, 1) (seeded by ``gen``)."""
    re = torch.randn(shape, generator=gen, device=device)
    im = torch.randn(shape, generator=gen, device=device)
    return torch.complex(re, im)


# ----------------------------------------------------------------------------------------------- scale
def sense_image(problem: Problem) -> torch.Tensor:
    """SENSE image (ny, nx) of the ``sense`` method: CG on (A^H A + lam I) x = A^H y (sampler.lam,
    sampler.cg_iters iterations, at least 1)."""
    from ..classical import sense_recon

    s = problem.config.sampler
    x, _ = sense_recon(problem.kspace, problem.mask, problem.maps, s.lam, max(s.cg_iters, 1))
    return x


def data_scale(x_ref: torch.Tensor, percentile: float = 99.9) -> float:
    """The scale dividing data and images before the prior: ``percentile`` of |x_ref| (see module doc)."""
    mag = x_ref.abs().flatten().float()
    if percentile >= 100.0 or mag.numel() >= 2**24:
        scale = float(mag.max())
    else:
        scale = float(torch.quantile(mag, percentile / 100.0))
    if not math.isfinite(scale) or scale <= 0:
        raise ReconError(
            "the SENSE image of this slice is zero or not finite (all-zero data or coil maps?): cannot scale "
            "it into the prior's range"
        )
    return scale


def check_maps(problem: Problem) -> None:
    """Coil maps must be finite and not all zero."""
    maps = problem.maps
    if not bool(torch.isfinite(torch.view_as_real(maps)).all()):
        raise ReconError("coil maps contain NaN or Inf values")
    if not bool((maps.abs() > 0).any()):
        raise ReconError("coil maps are all zero")


@dataclass
class SamplerSetup:
    """What every learned sampler starts from: the prior, its batched runner, the SENSE image x_sense
    (data units), the prior scale (``data_scale``) and the scaled data y = kspace / scale (C, ky, kx)."""

    prior: Any
    runner: PriorRunner
    x_sense: torch.Tensor
    scale: float
    y: torch.Tensor

    def report(self) -> dict[str, Any]:
        """The report entries naming the prior."""
        return {
            "scale": self.scale,
            "prior": getattr(self.prior, "name", type(self.prior).__name__),
            "model_sha256": getattr(self.prior, "sha256", ""),
        }


def sampler_config(problem: Problem) -> SamplerConfig:
    """``sampler`` config with the ``by_accel`` row for the mask's true acceleration applied."""
    accel = float(problem.mask.numel() / problem.mask.sum())
    return problem.config.sampler.for_acceleration(accel)


def setup_sampler(problem: Problem, cfg: SamplerConfig) -> SamplerSetup:
    """Check the maps, load the prior (cached), compute the SENSE image and scale the data into the prior's
    range."""
    check_maps(problem)
    prior = get_prior(problem)
    x_sense = sense_image(problem)
    scale = data_scale(x_sense, cfg.scale_percentile)
    return SamplerSetup(prior, PriorRunner(prior, cfg.batch), x_sense, scale, problem.kspace / scale)


def make_dc(problem: Problem, y: torch.Tensor, cfg: SamplerConfig, n_levels: int) -> DataConsistency:
    """The data-consistency step for scaled data y (C, ky, kx); errors name the config entry."""
    try:
        return DataConsistency(y, problem.mask, problem.maps, kind=cfg.dc, iters=cfg.dc_iters, n_levels=n_levels,
                               mu=cfg.dc_lam)
    except ValueError as e:
        raise ReconError(f"sampler.dc: {e}") from e


def mean_std(samples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """K complex samples (K, ny, nx) -> mean (ny, nx) complex, std (ny, nx) float32 or None when K == 1.

    std is the pixel-wise std of the COMPLEX samples, sqrt(sum_k |x_k - mean|^2 / (K - 1)), in data units.
    """
    mean = samples.mean(0)
    if samples.shape[0] < 2:
        return mean, None
    var = (samples - mean).abs().pow(2).sum(0) / (samples.shape[0] - 1)
    return mean, var.sqrt().float()
