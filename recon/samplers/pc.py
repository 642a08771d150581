"""``pc``: the paper's predictor-corrector sampler (Chung & Ye 2022, HJ-harry/score-MRI), faithfully.

N geometric levels of the VE-SDE from the prior's sigma_max down to sigma_min. Each level: one Langevin
corrector step (step size 2 (snr ||z|| / ||score||)^2 per real image, snr 0.16), then one reverse-diffusion
predictor step (x_mean = x + (sigma_i^2 - sigma_{i+1}^2) score, x = x_mean + sqrt(...) z, sigma_N = 0), each
followed by data consistency (``recon.dc``). The real and imaginary parts pass the magnitude prior as one
batch of two (the official code calls them one after the other with a step size each: so do the step
sizes here). Returns the noise-free mean of the last predictor step (x_mean, data-consistent).

With dc 'ssos'/'hybrid' the state is one complex image per coil (every coil image through the prior, as
the official multi-coil code does: 2 C network images per step); the result is the root-sum-of-squares of
the coil images with the phase of the map-combined image. NFE in the report counts network evaluations per
real image of the result: 2 N (2 N C for the coil-wise variants); ``network_calls`` the batched calls, 2 N.
"""
from __future__ import annotations

import logging
import math
from typing import Any

import torch

from ..api import Problem, ReconError
from ..dc import COIL_KINDS
from ..methods import register_method
from .common import batch_noise, make_dc, mean_std, sampler_config, setup_sampler

log = logging.getLogger(__name__)


def ve_sigmas(sigma_min: float, sigma_max: float, n: int) -> list[float]:
    """Descending geometric noise levels sigma_max ... sigma_min, n of them (n >= 1)."""
    if n == 1:
        return [sigma_max]
    r = math.log(sigma_min / sigma_max)
    return [sigma_max * math.exp(r * i / (n - 1)) for i in range(n)]


def _part_norms(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Norms of the real and imaginary parts of each image (..., H, W) -> (..., 1, 1) each."""
    return (
        torch.linalg.vector_norm(t.real, dim=(-2, -1), keepdim=True),
        torch.linalg.vector_norm(t.imag, dim=(-2, -1), keepdim=True),
    )


@register_method("pc", needs_prior=True, description="the paper's predictor-corrector sampler (reverse diffusion + Langevin)")
def pc(problem: Problem) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, Any]]:
    """The paper's PC sampler over the problem's S slices -> images (S, ny, nx) complex64 (data units), std
    or None, report."""
    cfg = sampler_config(problem)
    dc_coilwise = cfg.dc in COIL_KINDS
    st = setup_sampler(problem, cfg, windows=not dc_coilwise)  # coil images do not vanish outside the support
    prior, runner, scale = st.prior, st.runner, st.scale
    gens, dev = problem.generators, problem.device
    n = int(cfg.steps)
    dc = make_dc(problem, st.y, cfg, n)
    sig = ve_sigmas(float(prior.sigma_min), float(prior.sigma_max), n) + [0.0]
    k_samples = int(cfg.samples)
    _, c, ny, nx = problem.maps.shape
    shape = (k_samples, c, ny, nx) if dc.coilwise else (k_samples, ny, nx)  # per slice
    with problem.clock("dc"):
        x = dc(sig[0] * batch_noise(shape, gens, dev), 0, end_of_level=False)
    x_mean = x
    for i in range(n):
        s, s_next = sig[i], sig[i + 1]
        # Langevin corrector
        g = runner.complex("score", x, s)
        z = batch_noise(shape, gens, dev)
        (gr, gi), (zr, zi) = _part_norms(g), _part_norms(z)
        tiny = torch.finfo(gr.dtype).tiny
        er = 2 * (cfg.snr * zr / gr.clamp_min(tiny)) ** 2
        ei = 2 * (cfg.snr * zi / gi.clamp_min(tiny)) ** 2
        x = torch.complex(x.real + er * g.real + (2 * er).sqrt() * z.real, x.imag + ei * g.imag + (2 * ei).sqrt() * z.imag)
        with problem.clock("dc"):
            x = dc(x, i, end_of_level=False)
        # reverse-diffusion predictor
        g = runner.complex("score", x, s)
        d2 = s * s - s_next * s_next
        x_mean = x + d2 * g
        x = x_mean + math.sqrt(d2) * batch_noise(shape, gens, dev)
        with problem.clock("dc"):
            x = dc(x, i, end_of_level=True)
    x_mean = dc(x_mean, n - 1, end_of_level=True)  # only the last x_mean is used: DC it once
    if not bool(torch.isfinite(torch.view_as_real(x_mean)).all()):
        raise ReconError("pc sampler diverged (NaN/Inf in the sample)")
    if dc.coilwise:
        rss = x_mean.abs().pow(2).sum(-3).sqrt()
        phase = torch.sgn(dc.combine(x_mean))
        samples = rss * torch.where(phase.abs() > 0, phase, torch.ones_like(phase))
    else:
        samples = x_mean
    samples = samples * scale.unsqueeze(1)
    image, std = mean_std(samples)
    report = {
        "sampler": "pc",
        "nfe": 2 * n * (c if dc.coilwise else 1),
        "network_calls": runner.calls,
        "dc": cfg.dc,
        "steps": n,
        "snr": cfg.snr,
        "samples": k_samples,
        **st.report(),
    }
    return image.to(torch.complex64), std, report
