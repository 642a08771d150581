"""Sanity check of a learned reconstruction against the measured data: is the image one the data allow?

Two tests, on the image x (ny, nx) a learned method returned, in the units of the whitened data:

1. Discrepancy principle. With whitened noise of known std ``noise_std`` per real and imaginary part, the
   residual of the truth on the M measured complex samples (coils x measured k-space points) is pure noise:
   ``||A x_true - y|| ~ noise_std * sqrt(2 M)``. A reconstruction whose residual ratio
   ``rho = ||A x - y|| / (noise_std * sqrt(2 M))`` exceeds ``sampler.sanity_residual`` (default 2) contradicts
   the measurement by more than the noise explains: the prior put in something the data deny. Good
   reconstructions sit near rho = 1 (SENSE slightly below: it fits some noise); a prior that returns garbage
   leaves rho of 10 and more. Where the data are nearly noise-free (simulations; SNR beyond any scanner's) the
   principle asks for more than a finite-step sampler's image gives: a good one leaves ~0.3 % of the data's norm
   (measured: dipy T1, 4 coils, x3, noise-free -> rho 149; sigma 1e-4 -> rho 7; sigma 1e-3 -> rho 1.2 at
   0.6 %; the benchmark's sigma 5e-3 -> rho 1.0 at 2.3 %). So a residual below ``sampler.sanity_floor``
   (default 1 %) of the measured data's norm passes whatever the noise level. The noise level: known from
   the prewhitening where the caller whitened the data
   (replay, the MRD server: ``gadget.gadgetron.preprocess.whitened_noise_std`` -> ``noise_std``), else
   estimated from the calibration block (``recon.noise.kspace_noise_std``; inside Gadgetron, whose
   NoiseAdjustGadget keeps the noise scans to itself).
2. Support. Energy where every coil map is zero (outside the ESPIRiT support) is unmeasurable: no data
   constrain it. More than ``sampler.sanity_outside`` (default 1 %) of the image energy there is invented.

``recon.api`` runs the check on every learned slice and puts the verdict in its report (``sanity``: the
measures, the limits, ``failed`` = the reason or None); the slice orchestrator (gadget/core.py) sends a failed
slice as the labelled SENSE fallback and logs the reason as a WARNING, unless ``sampler.sanity = false``.
"""
from __future__ import annotations

import logging
import math
from typing import Any

import torch

from .api import Problem
from .operators import SenseOp

log = logging.getLogger(__name__)


def measure(kspace: torch.Tensor, mask: torch.Tensor, maps: torch.Tensor, image: torch.Tensor,
            noise_std: float | None) -> dict[str, Any]:
    """{"residual_ratio": rho or None, "relative_residual": ||A x - y|| / ||y|| or None, "outside_fraction": f,
    "measured": M} of image (ny, nx) complex against one slice's data: kspace (C, ky, kx) whitened, zeros where
    not measured; mask (ky, kx); maps (C, ny, nx)."""
    x = torch.as_tensor(image).to(device=maps.device, dtype=torch.complex64)
    power = maps.abs().pow(2).sum(0)
    energy = float(x.abs().pow(2).sum())
    outside = float(x.abs().pow(2)[power <= 0].sum()) / energy if energy > 0 else 0.0
    m = int(mask.sum()) * int(maps.shape[0])
    measured = kspace * mask
    r = torch.linalg.vector_norm(SenseOp(maps, mask).forward(x) - measured).item()
    y = torch.linalg.vector_norm(measured).item()
    relative = r / y if y > 0 else None
    ratio = None
    if noise_std is not None and noise_std > 0 and m > 0:
        ratio = r / (noise_std * math.sqrt(2.0 * m))
    return {"residual_ratio": ratio, "relative_residual": relative, "outside_fraction": outside, "measured": m}


def check(problem: Problem, j: int, image: torch.Tensor, noise_estimate: float | None = None) -> dict[str, Any]:
    """The sanity verdict of slice ``j`` of ``problem`` for its image (ny, nx): the measures of :func:`measure`,
    the limits (``sampler.sanity_residual``, ``sampler.sanity_outside``), the noise level used and its source,
    and ``failed``: why the image fails, or None.

    The noise level: ``problem.noise_std[j]`` (known from the prewhitening) when given, else ``noise_estimate``
    (a sampler's estimate from the calibration data), else that estimate made here
    (:func:`scoremri.recon.noise.kspace_noise_std`: 0 to +10 % of the true level on the visible benchmark, so
    the test errs on the lenient side); without any only the support test runs."""
    from .noise import kspace_noise_std

    s = problem.config.sampler
    known = None if problem.noise_std is None else problem.noise_std[j]
    noise_std, source = (known, "prewhitening") if known is not None else (noise_estimate, "calibration estimate")
    if noise_std is None:
        noise_std = kspace_noise_std(problem.kspace[j], problem.mask[j],
                                     None if problem.calib is None else problem.calib[j])
    rep = measure(problem.kspace[j], problem.mask[j], problem.maps[j], image, noise_std)
    reasons = []
    rho = rep["residual_ratio"]
    rel = rep["relative_residual"]
    # NaN fails too; below the floor the residual passes whatever the noise level (see the module docstring)
    if rho is not None and not rho <= s.sanity_residual and not (rel is not None and rel <= s.sanity_floor):
        reasons.append(f"residual {rho:.2f} x the noise level (discrepancy limit {s.sanity_residual:g}; "
                       f"{100 * rel:.2g} % of the data's norm): the image contradicts the measured data")
    if not rep["outside_fraction"] <= s.sanity_outside:
        reasons.append(f"{100 * rep['outside_fraction']:.1f} % of the image energy lies where the coil maps are "
                       f"zero (limit {100 * s.sanity_outside:g} %)")
    rep.update(residual_limit=s.sanity_residual, outside_limit=s.sanity_outside, noise_std=noise_std,
               noise_source=source if noise_std is not None else None, failed="; ".join(reasons) or None)
    if reasons and not s.sanity:
        log.info("sanity check would fail (sampler.sanity off): %s", rep["failed"])
    return rep
