"""Cartesian undersampling masks with a fully sampled centre, and the true acceleration of a mask.

All masks are ``(ky, kx)`` bool, ky (phase encode) on axis -2. Line masks (``random``, ``equispaced``,
``gaussian``) sample whole kx lines; ``poisson`` is a 2-D variable-density Poisson-disc pattern (for 3-D
phase/partition encoding, or 2-D tests).

ACS rule (``default_acs``): 24 centre lines when ky >= 192, else ``round(0.08 * ky)`` (at least 2); the block
is ``[ky//2 - acs//2, ky//2 - acs//2 + acs)``. For ``poisson`` the fully sampled centre is an ``acs x acs``
box (acs clipped to kx).

The number of sampled lines (or points) is chosen so that the TRUE acceleration ``mask.size / mask.sum()``
is as close as possible to the requested ``accel``. Lines are always drawn without replacement (the official
score-MRI code draws gaussian lines with replacement, so its nominal x8 is really about x5.7).
"""
from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger(__name__)

KINDS = ("random", "equispaced", "gaussian", "poisson")


def default_acs(ny: int) -> int:
    """Number of fully sampled centre lines: 24 when ny >= 192, else round(0.08 * ny), at least 2."""
    return 24 if ny >= 192 else max(2, int(round(0.08 * ny)))


def true_acceleration(mask: np.ndarray) -> float:
    """mask.size / number of sampled points (inf for an empty mask)."""
    m = np.asarray(mask, dtype=bool)
    n = int(m.sum())
    return float("inf") if n == 0 else m.size / n


def _acs_slice(ny: int, acs: int) -> slice:
    start = ny // 2 - acs // 2
    return slice(start, start + acs)


def _target_count(total: int, accel: float, minimum: int) -> int:
    """Integer count n >= minimum making total / n closest to accel."""
    x = total / accel
    cands = {max(minimum, int(np.floor(x))), max(minimum, int(np.ceil(x)))}
    cands = {min(total, c) for c in cands if c > 0}
    return min(cands, key=lambda n: (abs(total / n - accel), -n))


def make_mask(kind: str, shape: tuple[int, int], accel: float, acs: int | None = None, seed: int = 0) -> np.ndarray:
    """Undersampling mask ``(ky, kx)`` bool.

    kind: random (uniform random lines) | equispaced | gaussian (Gaussian-density lines, std = ky*15/128 as in
    score-MRI, drawn without replacement) | poisson (2-D variable-density Poisson disc).
    accel: requested true acceleration (>= 1). acs: fully sampled centre lines (default ``default_acs``).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown mask kind '{kind}' (available: {', '.join(KINDS)})")
    if len(shape) != 2 or min(shape) < 1:
        raise ValueError(f"mask shape must be (ky, kx) with positive sizes, got {shape}")
    if not accel >= 1:
        raise ValueError(f"acceleration must be >= 1, got {accel}")
    ny, nx = int(shape[0]), int(shape[1])
    acs = default_acs(ny) if acs is None else int(acs)
    if acs < 0 or acs > ny:
        raise ValueError(f"acs lines must be in [0, {ny}], got {acs}")
    rng = np.random.default_rng(seed)
    if kind == "poisson":
        return _poisson(ny, nx, accel, acs, rng)
    n_lines = _target_count(ny, accel, max(acs, 1))
    flags = np.zeros(ny, dtype=bool)
    flags[_acs_slice(ny, acs)] = True
    n_extra = n_lines - int(flags.sum())
    free = np.flatnonzero(~flags)
    if n_extra > 0:
        if kind == "random":
            flags[rng.choice(free, size=n_extra, replace=False)] = True
        elif kind == "gaussian":
            std = ny * 15.0 / 128.0
            w = np.exp(-0.5 * ((free - ny // 2) / std) ** 2)
            w = np.maximum(w, 1e-12)
            flags[rng.choice(free, size=n_extra, replace=False, p=w / w.sum())] = True
        else:  # equispaced
            flags = _equispaced(ny, acs, n_lines, rng)
    mask = np.repeat(flags[:, None], nx, axis=1)
    log.debug("mask %s %s: requested x%.2f, true x%.3f, %d lines", kind, shape, accel, true_acceleration(mask), flags.sum())
    return mask


def _equispaced(ny: int, acs: int, n_lines: int, rng: np.random.Generator) -> np.ndarray:
    """ACS block plus lines at a regular (fractional, rounded) spacing, total as close to n_lines as possible."""
    base = np.zeros(ny, dtype=bool)
    base[_acs_slice(ny, acs)] = True
    offset = rng.random()

    def build(step: float) -> np.ndarray:
        f = base.copy()
        pos = np.round(np.arange(offset * step, ny, step)).astype(int)
        f[pos[pos < ny]] = True
        return f

    lo, hi = 1.0, float(ny)  # larger step -> fewer lines
    best = build(hi)
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        f = build(mid)
        if abs(int(f.sum()) - n_lines) < abs(int(best.sum()) - n_lines):
            best = f
        if f.sum() > n_lines:
            lo = mid
        elif f.sum() < n_lines:
            hi = mid
        else:
            return f
    return best


def grappa_lines(ny: int, accel: int, acs: int) -> tuple[np.ndarray, np.ndarray]:
    """A scanner's GRAPPA / SENSE line pattern: ``(sampled, on_grid)``, both ``(ny,)`` bool.

    ``on_grid``: every ``accel``-th line through the k-space centre line ``ny // 2`` (an integer reduction
    factor R, as the header's ``accelerationFactor`` states it); ``sampled``: the grid plus the fully sampled
    ACS block (``_acs_slice``). Unlike :func:`make_mask` the TRUE acceleration is below R (the ACS lines
    are extra): R = 4 with 24 ACS lines of 256 samples 82 lines, x3.12. Gadgetron's GRAPPA needs exactly this
    (lines at fractional spacing, as ``equispaced`` draws them, break its R-periodic kernels), and the
    ISMRMRD convention flags ACS lines on the grid PARALLEL_CALIBRATION_AND_IMAGING and the others
    PARALLEL_CALIBRATION (ismrmrd_generate_cartesian_shepp_logan does).
    """
    if int(accel) != accel or accel < 1:
        raise ValueError(f"a GRAPPA pattern needs an integer acceleration >= 1, got {accel}")
    if not 0 <= acs <= ny:
        raise ValueError(f"acs lines must be in [0, {ny}], got {acs}")
    on_grid = (np.arange(ny) - ny // 2) % int(accel) == 0
    sampled = on_grid.copy()
    sampled[_acs_slice(ny, acs)] = True
    return sampled, on_grid


def _poisson(ny: int, nx: int, accel: float, acs: int, rng: np.random.Generator) -> np.ndarray:
    """2-D variable-density Poisson disc (after sigpy.mri.poisson): the minimum distance between samples grows
    linearly with the normalised radius, ``radius = max(1, (1 + slope * r) * n / max(ny, nx))`` per axis; the
    slope is found by bisection so the true acceleration matches ``accel``. Sampling is random sequential
    dart throwing on the grid (points in random order, accepted when outside every accepted point's
    ellipse). Corners outside the unit circle are not sampled; an ``acs x acs`` centre box is fully sampled.
    """
    y, x = np.mgrid[:ny, :nx].astype(np.float64)
    ax = min(acs, nx)
    xr = np.maximum(np.abs(x - nx / 2) - ax / 2, 0)
    yr = np.maximum(np.abs(y - ny / 2) - acs / 2, 0)
    xr /= max(xr.max(), 1e-9)
    yr /= max(yr.max(), 1e-9)
    r = np.sqrt(xr**2 + yr**2)
    order = rng.permutation(ny * nx)
    target = _target_count(ny * nx, accel, 1)
    box = np.zeros((ny, nx), dtype=bool)
    box[_acs_slice(ny, acs), _acs_slice(nx, ax)] = True

    def sample(slope: float) -> np.ndarray:
        rx = np.clip((1 + r * slope) * nx / max(ny, nx), 1, None)
        ry = np.clip((1 + r * slope) * ny / max(ny, nx), 1, None)
        blocked = np.zeros((ny, nx), dtype=bool)
        m = np.zeros((ny, nx), dtype=bool)
        for idx in order:
            i, j = divmod(int(idx), nx)
            if blocked[i, j] or r[i, j] > 1:
                continue
            m[i, j] = True
            hy, hx = ry[i, j], rx[i, j]
            i0, i1 = max(0, int(np.ceil(i - hy)) + 0), min(ny, int(np.floor(i + hy)) + 1)
            j0, j1 = max(0, int(np.ceil(j - hx))), min(nx, int(np.floor(j + hx)) + 1)
            dy = (np.arange(i0, i1) - i)[:, None] / hy
            dx = (np.arange(j0, j1) - j)[None, :] / hx
            blocked[i0:i1, j0:j1] |= dy**2 + dx**2 < 1
        return m | box

    lo, hi = 0.0, float(max(ny, nx))
    best = None
    for _ in range(30):
        slope = 0.5 * (lo + hi)
        m = sample(slope)
        if best is None or abs(int(m.sum()) - target) < abs(int(best.sum()) - target):
            best = m
        if abs(true_acceleration(m) - accel) < 0.01 * accel:
            break
        if m.sum() > target:
            lo = slope
        else:
            hi = slope
    assert best is not None
    return best


def find_acs(mask_or_line_flags: np.ndarray) -> tuple[int, int]:
    """The contiguous fully sampled ky block around ky//2: ``(start, stop)`` (stop exclusive; (c, c) if none).

    Accepts ky line flags ``(ky,)`` or a mask ``(ky, kx)`` (a row counts when all its kx samples are measured;
    for 2-D patterns use ``find_acs_box``).
    """
    a = np.asarray(mask_or_line_flags).astype(bool)
    if a.ndim == 2:
        a = a.all(axis=1)
    if a.ndim != 1:
        raise ValueError(f"expected (ky,) line flags or a (ky, kx) mask, got shape {a.shape}")
    c = a.shape[0] // 2
    if not a[c]:
        return c, c
    start, stop = c, c + 1
    while start > 0 and a[start - 1]:
        start -= 1
    while stop < a.shape[0] and a[stop]:
        stop += 1
    return start, stop


def find_acs_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """The largest fully sampled box grown around the centre ``(ky0, ky1, kx0, kx1)`` (stops exclusive).

    Grows one side at a time (ky and kx alternately) while the new row/column of the box is fully measured;
    an empty box ``(c, c, c, c)`` when the centre sample is missing.
    """
    m = np.asarray(mask).astype(bool)
    if m.ndim != 2:
        raise ValueError(f"expected a (ky, kx) mask, got shape {m.shape}")
    ny, nx = m.shape
    cy, cx = ny // 2, nx // 2
    if not m[cy, cx]:
        return cy, cy, cx, cx
    y0, y1, x0, x1 = cy, cy + 1, cx, cx + 1
    grown = True
    while grown:
        grown = False
        if y0 > 0 and m[y0 - 1, x0:x1].all():
            y0 -= 1
            grown = True
        if y1 < ny and m[y1, x0:x1].all():
            y1 += 1
            grown = True
        if x0 > 0 and m[y0:y1, x0 - 1].all():
            x0 -= 1
            grown = True
        if x1 < nx and m[y0:y1, x1].all():
            x1 += 1
            grown = True
    return y0, y1, x0, x1
