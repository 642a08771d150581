"""The reconstruction entry points: ``reconstruct(kspace, mask, config, ...) -> Result`` for one slice and
``reconstruct_batch([kspace, ...], [mask, ...], config, ...) -> [Result, ...]`` for several at once.

Everything that turns k-space into an image goes through here: the gadget, replay, benchmarks and tests.
The method named by ``sampler.method`` comes from the registry in :mod:`scoremri.recon.methods`
(``zero_filled``, ``sense`` in ``recon.classical``; ``pc``, ``fast`` in ``recon.samplers``). No sockets, no files.

Batches: a method receives a :class:`Problem` of B slices of one shape (B = 1 for ``reconstruct``) and runs
them through ONE sampler run: every network call takes slices x samples x (real, imag) images (chunked to
memory by ``samplers.common.PriorRunner``). Each slice keeps its own mask, coil maps, prior scale and
seeded generator, so its image does not depend on the batch it ran in (batched and one-by-one images agree
to float rounding; tests/recon/test_batch.py). ``reconstruct_batch`` groups the slices it is given by shape
and by the row of ``sampler.by_accel`` their acceleration selects, and runs each group as one batch.

Deadline: with ``sampler.slice_deadline_s`` > 0 a learned sampler checks the clock before every network
call and raises :class:`SliceDeadlineExceeded` once the batch has run longer than that many seconds per
slice in it (coil maps included); the caller (``gadget.core``) then sends the labelled SENSE image.
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from .config import ReconConfig
from .errors import ReconError
from .methods import MethodInfo, get_method

log = logging.getLogger(__name__)


class SliceDeadlineExceeded(RuntimeError):
    """A learned sampler ran past ``sampler.slice_deadline_s`` (checked between network calls).

    elapsed: seconds the batch had run; allowed: seconds it was given (deadline x slices); slices: batch size;
    calls: network calls done."""

    def __init__(self, elapsed: float, allowed: float, slices: int, calls: int) -> None:
        self.elapsed, self.allowed, self.slices, self.calls = elapsed, allowed, slices, calls
        per = f"{allowed / slices:g} s per slice x {slices} slices = " if slices > 1 else ""
        super().__init__(f"sampler.slice_deadline_s exceeded: {elapsed:.1f} s > {per}{allowed:g} s "
                         f"after {calls} network calls")


@dataclass
class Deadline:
    """When a run must stop: ``start`` (time.monotonic()) + ``allowed`` seconds; ``slices`` share it."""

    start: float
    allowed: float
    slices: int = 1

    def check(self, calls: int) -> None:
        """Raise SliceDeadlineExceeded when the time is up (called before each network call)."""
        elapsed = time.monotonic() - self.start
        if elapsed > self.allowed:
            raise SliceDeadlineExceeded(elapsed, self.allowed, self.slices, calls)


@dataclass
class Result:
    """A reconstructed slice. image (ny, nx) complex64 in units of the (whitened) data; std (ny, nx)
    float32 pixel-wise posterior std or None; maps (C, ny, nx) complex64; report: method, nfe, seconds,
    acceleration, fallback reason, ... (``seconds``: this slice's share of its batch; ``batch``: the number
    of slices run together; ``batch_seconds``: their wall time; ``stages`` / ``stages_cpu``: this slice's share
    of the wall / CPU seconds by stage: maps, sense, network, dc, other)."""

    image: np.ndarray
    std: np.ndarray | None
    maps: np.ndarray
    report: dict[str, Any] = field(default_factory=dict)


@dataclass
class Problem:
    """What a method receives: B slices of one shape, tensors on the target device.

    kspace (B, C, ky, kx) complex64 with unmeasured samples zero; mask (B, ky, kx) float32 {0, 1}; maps
    (B, C, ny, nx) complex64; generators: one per slice, seeded per slice (a slice's noise comes from its own
    generator only, so its image does not depend on the batch); deadline: None or when to stop (learned
    samplers check it before every network call); clock: seconds by stage (``with problem.clock("dc"):``).
    """

    kspace: torch.Tensor
    mask: torch.Tensor
    maps: torch.Tensor
    config: ReconConfig
    device: torch.device
    generators: list[torch.Generator]
    prior: Any = None  # a model.score.ScoreModel for the learned methods
    deadline: Deadline | None = None
    clock: "StageClock | None" = None
    # per slice: std per real/imaginary part of the whitened noise, known from the prewhitening (None = unknown)
    noise_std: list[float | None] | None = None
    calib: list[torch.Tensor | None] | None = None  # per slice: separate calibration lines (C, ky_c, kx) or None

    def __post_init__(self) -> None:
        if self.clock is None:
            self.clock = StageClock(self.device)

    @property
    def batch(self) -> int:
        """B, the number of slices."""
        return int(self.kspace.shape[0])



class StageClock:
    """Seconds by stage: ``wall`` (CUDA synchronised at both ends) and ``cpu`` (this process's user + system
    time, the useful figure where other jobs share the cores). ``with clock("network"): ...``."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        if self.cuda:
            torch.cuda.synchronize()
        w, c = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            if self.cuda:
                torch.cuda.synchronize()
            self.wall[stage] = self.wall.get(stage, 0.0) + time.perf_counter() - w
            self.cpu[stage] = self.cpu.get(stage, 0.0) + time.process_time() - c


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
    noise_std: float | None = None,
) -> Result:
    """Reconstruct one slice.

    kspace: (C, ky, kx) complex64, already whitened, zeros where not measured.
    mask: (ky, kx) bool, True where a sample was measured (from encode indices, not from zeros).
    maps: (C, ky, kx) complex64 coil sensitivities; estimated from the ACS (or ``calib``) when None.
    calib: (C, ky_c, kx) separate calibration lines, optional.
    seed: per-slice seed (defaults to config.sampler.seed). prior: a loaded ScoreModel (learned methods
    load config.model when None). noise_std: std of each of the real and imaginary parts of the whitened
    noise, known from the prewhitening (None = unknown): the sanity check of a learned image
    (:mod:`scoremri.recon.sanity`, its verdict in ``report["sanity"]``) tests the residual against it, or
    against an estimate from the calibration data when unknown.
    """
    return reconstruct_batch([kspace], [mask], config, maps=[maps], calib=[calib], device=device,
                             seeds=[seed], prior=prior, noise_std=[noise_std])[0]


def reconstruct_batch(
    kspace: Sequence[np.ndarray | torch.Tensor] | np.ndarray | torch.Tensor,
    mask: Sequence[np.ndarray | torch.Tensor] | np.ndarray | torch.Tensor,
    config: ReconConfig,
    *,
    maps: Sequence[np.ndarray | torch.Tensor | None] | None = None,
    calib: Sequence[np.ndarray | torch.Tensor | None] | None = None,
    device: str | torch.device | None = None,
    seeds: Sequence[int | None] | None = None,
    prior: Any = None,
    noise_std: Sequence[float | None] | None = None,
) -> list[Result]:
    """Reconstruct several slices, each group of equal shape and ``by_accel`` row in ONE sampler run.

    kspace: B arrays (C, ky, kx) (or one (B, C, ky, kx) array); mask: B arrays (ky, kx); maps / calib / seeds /
    noise_std: None or B entries (each may be None), as for :func:`reconstruct`. Slices may differ in shape, mask,
    coil maps and scale. Returns B Results in the order given; slice i's image equals
    ``reconstruct(kspace[i], mask[i], ...)`` to float rounding.
    """
    n = len(kspace)
    if n == 0:
        return []
    if len(mask) != n:
        raise ReconError(f"{n} k-space slices but {len(mask)} masks")
    maps_l = [None] * n if maps is None else list(maps)
    calib_l = [None] * n if calib is None else list(calib)
    seeds_l = [None] * n if seeds is None else list(seeds)
    noise_l = [None] * n if noise_std is None else list(noise_std)
    for name, seq in (("maps", maps_l), ("calib", calib_l), ("seeds", seeds_l), ("noise_std", noise_l)):
        if len(seq) != n:
            raise ReconError(f"{n} k-space slices but {len(seq)} {name}")
    dev = resolve_device(device)
    info = _get_method(config.sampler.method)
    checked = []
    for i in range(n):
        where = f"slice {i} of the batch: " if n > 1 else ""
        try:
            k, m = _check_inputs(kspace[i], mask[i])
        except ReconError as e:
            raise ReconError(f"{where}{e}") from None
        checked.append((k, m))
    # one batch per (shape, by_accel row): the sampler settings of a run are shared by its slices
    groups: dict[tuple, list[int]] = {}
    for i, (k, m) in enumerate(checked):
        accel = float(m.numel() / m.sum())
        row = repr(config.sampler.for_acceleration(accel)) if info.needs_prior else ""
        groups.setdefault((tuple(k.shape), row), []).append(i)
    results: list[Result | None] = [None] * n
    for idx in groups.values():
        out = _run_group(info, [checked[i] for i in idx], [maps_l[i] for i in idx], [calib_l[i] for i in idx],
                         [seeds_l[i] for i in idx], config, dev, prior, n > 1, idx, [noise_l[i] for i in idx])
        for i, r in zip(idx, out):
            results[i] = r
    return results  # type: ignore[return-value]


def _run_group(info: MethodInfo, checked: list[tuple[torch.Tensor, torch.Tensor]], maps: list[Any],
               calib: list[Any], seeds: list[int | None], config: ReconConfig, dev: torch.device, prior: Any,
               batched: bool, index: list[int], noise_std: list[float | None]) -> list[Result]:
    """One sampler run over slices of one shape (maps estimated per slice where not given)."""
    t0 = time.perf_counter()
    b = len(checked)
    deadline_s = float(config.sampler.slice_deadline_s)
    deadline = Deadline(time.monotonic(), deadline_s * b, b) if deadline_s > 0 and info.needs_prior else None
    c0 = time.process_time()
    clock = StageClock(dev)
    ks, ms, mps, cals, reports = [], [], [], [], []
    for j, ((k, m), mp, cal) in enumerate(zip(checked, maps, calib)):
        where = f"slice {index[j]} of the batch: " if batched else ""
        k, m = k.to(dev), m.to(dev)
        report: dict[str, Any] = {"method": config.sampler.method, "acceleration": float(m.numel() / m.sum())}
        try:
            if cal is not None:
                cal = _as_complex("calib", cal, ndim=3).to(dev)
                if cal.shape[0] != k.shape[0]:
                    raise ReconError(f"calib has {cal.shape[0]} coils but kspace has {k.shape[0]}")
            if mp is None:
                from .coils import estimate_maps

                with clock("maps"):
                    mp, coil_report = estimate_maps(k, m, config.coils, calib=cal)
                report.update(coil_report)
            else:
                mp = _as_complex("maps", mp, ndim=3).to(dev)
                if mp.shape != k.shape:
                    raise ReconError(f"maps shape {tuple(mp.shape)} does not match kspace {tuple(k.shape)}")
        except ReconError as e:
            raise ReconError(f"{where}{e}") from None
        ks.append(k * m)
        ms.append(m)
        mps.append(mp)
        cals.append(cal)
        reports.append(report)
    gens = []
    for s in seeds:
        g = torch.Generator(device=dev)
        g.manual_seed(int(config.sampler.seed if s is None else s) & 0x7FFFFFFFFFFFFFFF)
        gens.append(g)
    problem = Problem(kspace=torch.stack(ks), mask=torch.stack(ms), maps=torch.stack(mps), config=config,
                      device=dev, generators=gens, prior=prior, deadline=deadline, clock=clock,
                      noise_std=list(noise_std), calib=cals)
    image, std, extra = info.fn(problem)
    per_slice = [dict(d) for d in (extra.pop("per_slice", None) or [{}] * b)]
    if info.needs_prior:  # is each learned image one the data allow? (the core falls back on a failure)
        from .sanity import check

        for j in range(b):
            per_slice[j]["sanity"] = check(problem, j, image[j], per_slice[j].get("noise_std_est"))
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    clock.wall["other"] = max(seconds - sum(clock.wall.values()), 0.0)
    clock.cpu["other"] = max(cpu - sum(clock.cpu.values()), 0.0)
    image = image.detach().to("cpu", torch.complex64).numpy()
    std = None if std is None else std.detach().to("cpu", torch.float32).numpy()
    maps_np = problem.maps.detach().to("cpu", torch.complex64).numpy()
    out = []
    for j in range(b):
        rep = {**reports[j], **extra, **per_slice[j], "seconds": seconds / b, "batch": b, "batch_seconds": seconds,
               "stages": {k: v / b for k, v in clock.wall.items()},
               "stages_cpu": {k: v / b for k, v in clock.cpu.items()}}
        out.append(Result(image=image[j], std=None if std is None else std[j], maps=maps_np[j], report=rep))
    return out


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
