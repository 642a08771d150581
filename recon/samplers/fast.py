"""``fast`` (the default): a DDS-style sampler (Chung, Lee & Ye, ICLR 2024) with an optional CCDF warm start.

Levels: ``steps`` geometric noise levels from the starting sigma down to the prior's sigma_min. Each level:
Tweedie denoise x0 = D(x, sigma_i) (real and imaginary parts of all K samples in one network batch) ->
data consistency on x0 (default 'sense': ``dc_iters`` CG steps on the proximal normal equations
(A^H A + mu_i I) x = A^H y + mu_i x0 started from x0) ->
DDIM-style re-noise to the next level, x = x0 + sqrt(sigma_{i+1}^2 - c^2) eps_hat + c z with
eps_hat = (x - D(x)) / sigma_i and c = eta sigma_{i+1} sqrt(1 - sigma_{i+1}^2 / sigma_i^2) (eta = 1 is
ancestral sampling, eta = 0 deterministic). The last data-consistent x0 is the sample (``final`` 'dc'), or
with ``final`` 'denoise' the last Tweedie denoise itself (zero outside the coil-map support).

Data-consistency weight: with ``dc_rho`` > 0 it follows the noise (the MAP weight of data whose noise has std
n per part against a denoise whose error std is dc_rho sigma_i): mu_i = (n / (dc_rho sigma_i))^2, kept in
[dc_lam_min, dc_lam_max]; n (prior units) is the data's noise level estimated from the calibration block
(``recon.noise.kspace_noise_std``, the same on every path, Gadgetron's included), so early levels follow the
data and late ones the prior, more so the noisier the data. Without a calibration block (or dc_rho = 0) mu is
the fixed ``dc_lam``. Chosen on the TUNE set of benchmarks/quality.py (ablations in ``--ablate``).

Start (``sampler.start``): 'noise' -> x = s0 z with s0 = start_sigma * sigma_max; 'sense' (CCDF) ->
x = x_sense + s0 z with s0 = start_sigma in prior units (image magnitude ~ [0, 1]).
K = ``sampler.samples`` > 1 draws K posterior samples as one batch -> mean image and pixel-wise std of the
complex samples (``common.mean_std``). NFE (the report's ``nfe``) = ``steps`` network evaluations per image;
each level is one batched call (``network_calls``) that runs as chunks of at most ``sampler.batch`` images.
"""
from __future__ import annotations

import logging
import math
from typing import Any

import torch

from ..api import Problem, ReconError
from ..dc import COIL_KINDS
from ..methods import register_method
from ..noise import kspace_noise_std
from .common import batch_noise, make_dc, mean_std, sampler_config, setup_sampler
from .pc import ve_sigmas

log = logging.getLogger(__name__)


@register_method("fast", needs_prior=True, description="DDS-style sampler with a CCDF warm start (the default)")
def fast(problem: Problem) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, Any]]:
    """DDS/CCDF sampler over the problem's S slices -> images (S, ny, nx) complex64 (data units), std
    (S, ny, nx) float32 or None, report."""
    cfg = sampler_config(problem)
    if cfg.dc in COIL_KINDS:
        raise ReconError(f"sampler.dc = '{cfg.dc}' is a pc-only (coil-wise) variant: 'fast' takes sense, sense_grad or replace")
    st = setup_sampler(problem, cfg)
    prior, runner, x_sense, scale = st.prior, st.runner, st.x_sense, st.scale
    gens, dev = problem.generators, problem.device
    smin, smax = float(prior.sigma_min), float(prior.sigma_max)
    k_samples = int(cfg.samples)
    _, _, ny, nx = problem.maps.shape
    shape = (k_samples, ny, nx)  # per slice; the state is (S, K, ny, nx)
    if cfg.start == "noise":
        s0 = cfg.start_sigma * smax
        x = s0 * batch_noise(shape, gens, dev)
    else:
        s0 = cfg.start_sigma
        x = (x_sense / scale).unsqueeze(1) + s0 * batch_noise(shape, gens, dev)
    if not smin < s0 <= smax * (1 + 1e-6):
        raise ReconError(f"starting sigma {s0:g} outside the prior's range ({smin:g}, {smax:g}]: check sampler.start_sigma")
    n = int(cfg.steps)
    sig = ve_sigmas(smin, s0, n)  # descending s0 ... sigma_min
    dc = make_dc(problem, st.y, cfg, n)
    # each slice's noise level, estimated from its calibration block (recon.noise.kspace_noise_std) rather than
    # taken from the prewhitening, so that every path (Gadgetron's own NoiseAdjust included) gives the same pixels
    noise_est = [kspace_noise_std(problem.kspace[j], problem.mask[j],
                                  None if problem.calib is None else problem.calib[j]) if cfg.dc_rho > 0 else None
                 for j in range(problem.batch)]
    known = torch.tensor([v is not None for v in noise_est], device=dev).view(-1, 1, 1, 1)
    noise = torch.tensor([(v or 0.0) / sc for v, sc in zip(noise_est, st.scales)], dtype=torch.float32,
                         device=dev).view(-1, 1, 1, 1)  # in prior units, (S, 1, 1, 1)
    x0 = x
    for i, s in enumerate(sig):
        d = runner.complex("denoise", x, s)
        if i == n - 1 and cfg.final == "denoise":
            x0 = d * dc.support
            break
        mu = None  # the fixed dc_lam
        if bool(known.any()):  # noise-aware, per slice (dc_lam where no calibration block gave the level)
            mu = torch.where(known, ((noise / (cfg.dc_rho * s)) ** 2).clamp(cfg.dc_lam_min, cfg.dc_lam_max),
                             torch.full_like(noise, cfg.dc_lam))
        with problem.clock("dc"):
            x0 = dc(d, i, mu=mu)
        if i == n - 1:
            break
        s_next = sig[i + 1]
        eps_hat = (x - d) / s
        c = cfg.eta * s_next * math.sqrt(max(1.0 - (s_next / s) ** 2, 0.0))
        x = x0 + math.sqrt(max(s_next**2 - c**2, 0.0)) * eps_hat + c * batch_noise(shape, gens, dev)
    if not bool(torch.isfinite(torch.view_as_real(x0)).all()):
        raise ReconError("fast sampler diverged (NaN/Inf in the sample)")
    image, std = mean_std(x0 * scale.unsqueeze(1))
    rep = st.report()
    for entry, v in zip(rep["per_slice"], noise_est):
        entry["noise_std_est"] = v
    report = {
        "sampler": "fast",
        "nfe": n,
        "network_calls": runner.calls,
        "dc": cfg.dc,
        "dc_iters": cfg.dc_iters,
        "dc_lam": f"noise-aware, rho {cfg.dc_rho:g}" if bool(known.any()) else cfg.dc_lam,
        "steps": n,
        "start": cfg.start,
        "start_sigma": s0,
        "eta": cfg.eta,
        "final": cfg.final,
        "samples": k_samples,
        "window": _window_report(runner.windows),
        **rep,
    }
    return image.to(torch.complex64), std, report


def _window_report(windows: list | None) -> str:
    """'full' or the window sizes, e.g. '176x224' (one entry per distinct size)."""
    if windows is None:
        return "full"
    return ",".join(sorted({f"{y1 - y0}x{x1 - x0}" for (y0, y1, x0, x1) in windows}))
