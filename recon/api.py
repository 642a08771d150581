"""The one reconstruction entry point: ``reconstruct(kspace, mask, config, ...) -> Result``.

Everything that turns k-space into an image goes through here: the gadget, replay, benchmarks and tests.
The method named by ``sampler.method`` comes from the registry in :mod:`scoremri.recon.methods`
(``zero_filled``, ``sense`` in ``recon.classical``; ``pc``, ``fast`` in ``recon.samplers``). No sockets, no files.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .config import ReconConfig
from .errors import ReconError
from .methods import MethodInfo, get_method

log = logging.getLogger(__name__)


@dataclass
class Result:
    """A reconstructed slice. image (ny, nx) complex64 in units of the (whitened) data; std (ny, nx)
    float32 pixel-wise posterior std or None; maps (C, ny, nx) complex64; report: method, nfe, seconds,
    acceleration, fallback reason, ..."""

    image: np.ndarray
    std: np.ndarray | None
    maps: np.ndarray
    report: dict[str, Any] = field(default_factory=dict)


@dataclass
class Problem:
    """What a method receives: tensors on the target device. kspace (C, ky, kx) complex64 with unmeasured
    samples zero; mask (ky, kx) float32 {0, 1}; maps (C, ny, nx) complex64; generator seeded per slice."""

    kspace: torch.Tensor
    mask: torch.Tensor
    maps: torch.Tensor
    config: ReconConfig
    device: torch.device
    generator: torch.Generator
    prior: Any = None  # a model.score.ScoreModel for the learned methods


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """'auto'/None -> cuda when available, else cpu. An explicit 'cuda' without a GPU is an error."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ReconError("device 'cuda' requested but no CUDA GPU is available")
    return dev


def reconstruct(
    kspace: np.ndarray | torch.Tensor,
    mask: np.ndarray | torch.Tensor,
    config: ReconConfig,
    *,
    maps: np.ndarray | torch.Tensor | None = None,
    calib: np.ndarray | torch.Tensor | None = None,
    device: str | torch.device | None = None,
    seed: int | None = None,
    prior: Any = None,
) -> Result:
    """Reconstruct one slice.

    kspace: (C, ky, kx) complex64, already whitened, zeros where not measured.
    mask: (ky, kx) bool, True where a sample was measured (from encode indices, not from zeros).
    maps: (C, ky, kx) complex64 coil sensitivities; estimated from the ACS (or ``calib``) when None.
    calib: (C, ky_c, kx) separate calibration lines, optional.
    seed: per-slice seed (defaults to config.sampler.seed). prior: a loaded ScoreModel (learned methods
    load config.model when None).
    """
    t0 = time.perf_counter()
    dev = resolve_device(device)
    k, m = _check_inputs(kspace, mask)
    k = k.to(dev)
    m = m.to(dev)
    if calib is not None:
        calib = _as_complex("calib", calib, ndim=3).to(dev)
        if calib.shape[0] != k.shape[0]:
            raise ReconError(f"calib has {calib.shape[0]} coils but kspace has {k.shape[0]}")
    report: dict[str, Any] = {"method": config.sampler.method, "acceleration": float(m.numel() / m.sum())}
    if maps is None:
        from .coils import estimate_maps

        maps_t, coil_report = estimate_maps(k, m, config.coils, calib=calib)
        report.update(coil_report)
    else:
        maps_t = _as_complex("maps", maps, ndim=3).to(dev)
        if maps_t.shape != k.shape:
            raise ReconError(f"maps shape {tuple(maps_t.shape)} does not match kspace {tuple(k.shape)}")
    method = _get_method(config.sampler.method).fn
    gen = torch.Generator(device=dev)
    gen.manual_seed(int(config.sampler.seed if seed is None else seed) & 0x7FFFFFFFFFFFFFFF)
    problem = Problem(kspace=k * m, mask=m, maps=maps_t, config=config, device=dev, generator=gen, prior=prior)
    image, std, extra = method(problem)
    report.update(extra)
    report["seconds"] = time.perf_counter() - t0
    return Result(
        image=image.detach().to("cpu", torch.complex64).numpy(),
        std=None if std is None else std.detach().to("cpu", torch.float32).numpy(),
        maps=maps_t.detach().to("cpu", torch.complex64).numpy(),
        report=report,
    )


def _get_method(name: str) -> MethodInfo:
    try:
        return get_method(name)
    except ValueError as e:
        raise ReconError(str(e)) from None


def _as_complex(name: str, a: np.ndarray | torch.Tensor, ndim: int) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(a) if not isinstance(a, torch.Tensor) else a)
    if t.dim() != ndim:
        raise ReconError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if not torch.is_complex(t):
        raise ReconError(f"{name} must be complex, got {t.dtype}")
    t = t.to(torch.complex64)
    if not torch.isfinite(torch.view_as_real(t)).all():
        raise ReconError(f"{name} contains NaN or Inf values")
    return t


def _check_inputs(kspace: Any, mask: Any) -> tuple[torch.Tensor, torch.Tensor]:
    k = _as_complex("kspace", kspace, ndim=3)
    m = torch.as_tensor(np.asarray(mask) if not isinstance(mask, torch.Tensor) else mask)
    if m.shape != k.shape[-2:]:
        raise ReconError(f"mask shape {tuple(m.shape)} does not match kspace (ky, kx) {tuple(k.shape[-2:])}")
    m = m.to(torch.float32) != 0
    if not m.any():
        raise ReconError("mask has no measured samples")
    if not bool((k.abs().sum(dim=(-2, -1)) > 0).all()):
        bad = [int(i) for i in torch.nonzero(k.abs().sum(dim=(-2, -1)) == 0).flatten()]
        raise ReconError(f"coil(s) {bad} contain only zeros: drop them before reconstructing")
    return k, m.to(torch.float32)
