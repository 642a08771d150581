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

from ..api import Deadline, Problem, ReconError, StageClock
from ..config import SamplerConfig
from ..dc import DataConsistency

log = logging.getLogger(__name__)

CPU_CHUNK = 2  # images per network call on CPU when sampler.batch = 0: ~5% less network time than 4 on onnx,
# level on torch (benchmarks/throughput.py --set sampler.batch=N, 2 samples x 22 levels, one thread)
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


Window = tuple[int, int, int, int]  # (y0, y1, x0, x1): rows y0:y1, columns x0:x1 of the image


class PriorRunner:
    """Calls the prior on a batch of real images (B, 1, H, W) in chunks of at most ``chunk`` images.

    chunk 0 = auto: on CPU ``CPU_CHUNK`` images per call (measured fastest there, see its comment), on
    CUDA sized from the measured peak memory of one image and the free memory. On CUDA out-of-memory
    the chunk halves (and stays halved) instead of failing. ``calls`` counts the batched calls (one per
    :meth:`__call__` or :meth:`complex`, however many chunks or window sizes it runs as: the report's
    ``network_calls``), i.e. network evaluations per image in the batch; ``clock`` (api.StageClock) times
    them as stage "network"; ``deadline`` (api.Deadline) is checked before every call.

    windows: one (y0, y1, x0, x1) per slice of the complex batches (see :meth:`complex`), or None for the
    whole image; outside its window a slice's image is known to be zero (the coil-map support lies inside),
    so the prior is not asked there: Tweedie's denoiser of a zero background is 0 and its score -x / sigma^2.
    """

    def __init__(self, prior: Any, chunk: int = 0, *, deadline: Deadline | None = None,
                 windows: list[Window] | None = None, device: torch.device | None = None,
                 clock: StageClock | None = None) -> None:
        self.prior = prior
        self.chunk = int(chunk)
        self.calls = 0
        self.deadline = deadline
        self.windows = windows
        self.clock = clock or StageClock(device or torch.device("cpu"))
        if self.chunk <= 0 and device is not None and device.type == "cpu":
            self.chunk = CPU_CHUNK
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

    def _run(self, call: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor,
             sigma: float) -> torch.Tensor:
        b = x.shape[0]
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

    def _start(self) -> None:
        if self.deadline is not None:
            self.deadline.check(self.calls)
        self.calls += 1

    def __call__(self, fn: str, x: torch.Tensor, sigma: float) -> torch.Tensor:
        """fn 'score' or 'denoise'; x (B, 1, H, W) float32; sigma scalar (prior units) -> (B, 1, H, W)."""
        self._start()
        with self.clock("network"):
            return self._run(getattr(self.prior, fn), x, sigma)

    def complex(self, fn: str, z: torch.Tensor, sigma: float) -> torch.Tensor:
        """Complex images (S, ..., H, W) of S slices: real and imaginary parts of all of them through the prior
        in ONE batch (per window size when ``windows`` are set: slices whose windows have the same size share
        a batch)."""
        self._start()
        with self.clock("network"):
            call = getattr(self.prior, fn)
            if self.windows is None:
                return self._complex(call, z, sigma)
            if len(self.windows) != z.shape[0]:
                raise ValueError(f"{len(self.windows)} windows for {z.shape[0]} slices")
            out = torch.zeros_like(z) if fn == "denoise" else z * (-1.0 / (sigma * sigma))
            by_size: dict[tuple[int, int], list[int]] = {}
            for i, (y0, y1, x0, x1) in enumerate(self.windows):
                by_size.setdefault((y1 - y0, x1 - x0), []).append(i)
            for idx in by_size.values():
                boxes = [self.windows[i] for i in idx]
                crops = torch.stack([z[i, ..., y0:y1, x0:x1] for i, (y0, y1, x0, x1) in zip(idx, boxes)])
                res = self._complex(call, crops, sigma)
                for j, (i, (y0, y1, x0, x1)) in enumerate(zip(idx, boxes)):
                    out[i, ..., y0:y1, x0:x1] = res[j]
            return out

    def _complex(self, call: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], z: torch.Tensor,
                 sigma: float) -> torch.Tensor:
        shape = z.shape
        flat = z.reshape(-1, 1, *shape[-2:])
        ri = torch.cat([flat.real, flat.imag], 0).contiguous()
        out = self._run(call, ri, sigma)
        n = flat.shape[0]
        return torch.complex(out[:n], out[n:]).reshape(shape)


def support_window(maps: torch.Tensor, margin: int, multiple: int = 1) -> Window | None:
    """The network window of one slice: the bounding box of the coil-map support (maps (C, ny, nx) not all
    zero) grown by ``margin`` pixels and rounded up to a multiple of ``multiple``, inside the image; None
    when it is the whole image (or the support is empty)."""
    support = maps.abs().pow(2).sum(0) > 0
    rows = torch.nonzero(support.any(1)).flatten()
    cols = torch.nonzero(support.any(0)).flatten()
    if rows.numel() == 0:
        return None
    ny, nx = support.shape

    def span(lo: int, hi: int, n: int) -> tuple[int, int]:
        lo, hi = max(lo - margin, 0), min(hi + 1 + margin, n)
        size = min(-(-(hi - lo) // multiple) * multiple, n)
        start = min(max((lo + hi) // 2 - size // 2, 0), n - size)
        return start, start + size

    (y0, y1), (x0, x1) = span(int(rows[0]), int(rows[-1]), ny), span(int(cols[0]), int(cols[-1]), nx)
    if (y0, y1, x0, x1) == (0, ny, 0, nx):
        return None
    return y0, y1, x0, x1


def complex_noise(shape: tuple[int, ...], gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """Standard complex noise whose real and imaginary parts are each N(0, 1) (seeded by ``gen``)."""
    re = torch.randn(shape, generator=gen, device=device)
    im = torch.randn(shape, generator=gen, device=device)
    return torch.complex(re, im)


def batch_noise(shape: tuple[int, ...], gens: list[torch.Generator], device: torch.device) -> torch.Tensor:
    """(S, *shape) complex noise, slice s drawn from ``gens[s]`` alone (the draw a one-slice run makes)."""
    return torch.stack([complex_noise(shape, g, device) for g in gens])


# ----------------------------------------------------------------------------------------------- scale
def sense_image(problem: Problem) -> torch.Tensor:
    """SENSE images (S, ny, nx) of the ``sense`` method: CG on (A^H A + lam I) x = A^H y (sampler.lam,
    sampler.cg_iters iterations, at least 1), each slice its own system."""
    from ..classical import sense_recon

    s = problem.config.sampler
    x, _ = sense_recon(problem.kspace, problem.mask[:, None], problem.maps, s.lam, max(s.cg_iters, 1))
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
    """Coil maps must be finite and not all zero (per slice)."""
    maps = problem.maps
    if not bool(torch.isfinite(torch.view_as_real(maps)).all()):
        raise ReconError("coil maps contain NaN or Inf values")
    if not bool((maps.abs() > 0).flatten(1).any(1).all()):
        raise ReconError("coil maps are all zero")


@dataclass
class SamplerSetup:
    """What every learned sampler starts from: the prior, its batched runner, the SENSE images x_sense
    (S, ny, nx) in data units, the prior scales (S,) (``data_scale`` per slice) as a tensor ``scale``
    (S, 1, 1) that broadcasts against (S, K, ny, nx), and the scaled data y = kspace / scale (S, C, ky, kx)."""

    prior: Any
    runner: PriorRunner
    x_sense: torch.Tensor
    scales: list[float]
    y: torch.Tensor

    @property
    def scale(self) -> torch.Tensor:
        """(S, 1, 1) float32 on the data's device."""
        return torch.tensor(self.scales, dtype=torch.float32, device=self.y.device).view(-1, 1, 1)

    def report(self) -> dict[str, Any]:
        """The report entries naming the prior; the scale per slice."""
        return {
            "prior": getattr(self.prior, "name", type(self.prior).__name__),
            "model_sha256": getattr(self.prior, "sha256", ""),
            "per_slice": [{"scale": s} for s in self.scales],
        }


def sampler_config(problem: Problem) -> SamplerConfig:
    """``sampler`` config with the ``by_accel`` row for the mask's true acceleration applied (the slices of a
    problem share one row: ``api.reconstruct_batch`` groups them so)."""
    m = problem.mask[0]
    accel = float(m.numel() / m.sum())
    return problem.config.sampler.for_acceleration(accel)


def setup_sampler(problem: Problem, cfg: SamplerConfig, *, windows: bool = True) -> SamplerSetup:
    """Check the maps, load the prior (cached), compute the SENSE images and scale each slice's data into the
    prior's range; the runner gets the problem's deadline and, with ``sampler.window = support`` and a prior
    that accepts any image size (``windowable``), each slice's network window."""
    check_maps(problem)
    prior = get_prior(problem)
    with problem.clock("sense"):
        x_sense = sense_image(problem)
        scales = [data_scale(x_sense[i], cfg.scale_percentile) for i in range(problem.batch)]
    win = None
    if windows and cfg.window == "support" and getattr(prior, "windowable", False):
        multiple = int(getattr(prior, "multiple", 1))
        win = [support_window(problem.maps[i], cfg.window_margin, multiple) for i in range(problem.batch)]
        ny, nx = problem.maps.shape[-2:]
        win = None if all(w is None for w in win) else [w or (0, ny, 0, nx) for w in win]
    runner = PriorRunner(prior, cfg.batch, deadline=problem.deadline, windows=win, device=problem.device,
                         clock=problem.clock)
    scale = torch.tensor(scales, dtype=torch.float32, device=problem.device).view(-1, 1, 1, 1)
    return SamplerSetup(prior, runner, x_sense, scales, problem.kspace / scale)


def make_dc(problem: Problem, y: torch.Tensor, cfg: SamplerConfig, n_levels: int) -> DataConsistency:
    """The data-consistency step for scaled data y (S, C, ky, kx); errors name the config entry."""
    try:
        return DataConsistency(y, problem.mask, problem.maps, kind=cfg.dc, iters=cfg.dc_iters, n_levels=n_levels,
                               mu=cfg.dc_lam)
    except ValueError as e:
        raise ReconError(f"sampler.dc: {e}") from e


def mean_std(samples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """K complex samples of S slices (S, K, ny, nx) -> mean (S, ny, nx) complex, std (S, ny, nx) float32 or
    None when K == 1.

    std is the pixel-wise std of the COMPLEX samples, sqrt(sum_k |x_k - mean|^2 / (K - 1)), in data units.
    """
    mean = samples.mean(1)
    if samples.shape[1] < 2:
        return mean, None
    var = (samples - mean.unsqueeze(1)).abs().pow(2).sum(1) / (samples.shape[1] - 1)
    return mean, var.sqrt().float()
