"""A thin wrapper over the BART command line (the independent reference of the baselines).

Axis convention: our k-space/maps ``(C, ky, kx)`` (C order, kx fastest) are BART arrays with dims
``[kx, ky, 1, C]`` (BART is column-major, dim 0 fastest), i.e. exactly the same bytes: dim 0 = readout,
dim 1 = phase encode, dim 3 = coils. Images ``(ny, nx)`` are BART ``[nx, ny]``. ``to_bart``/``from_bart`` do the
(free) reinterpretation; ``bart()`` itself takes and returns arrays in BART's dim order (numpy shape = BART
dims, as BART's own python/cfl.py).

Every tool runs with ``OMP_NUM_THREADS=1`` in a temporary directory; the command lines are those of
ARCHITECTURE.md, "Baselines": ``ecalib -m1 -r 24``, ``pics -d0 -S -l2 -r 0.01`` (SENSE), ``pics -d0 -S -l1 -r LAMBDA``.
"""
from __future__ import annotations

import logging
import os
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)


class BartError(RuntimeError):
    """BART is missing or a BART command failed; the message names the command and its output."""


def bart_executable() -> str:
    exe = os.environ.get("BART_EXE") or shutil.which("bart")
    if not exe:
        raise BartError("BART is not installed: 'bart' not found on PATH (apt-get install bart, or set BART_EXE)")
    return exe


def write_cfl(base: str | Path, array: np.ndarray) -> None:
    """Write ``base.hdr``/``base.cfl``; numpy shape = BART dims (column-major data, complex64)."""
    a = np.asarray(array, dtype=np.complex64)
    dims = list(a.shape) or [1]
    Path(f"{base}.hdr").write_text("# Dimensions\n" + " ".join(str(d) for d in dims) + "\n")
    np.asfortranarray(a).ravel(order="F").tofile(f"{base}.cfl")


def read_cfl(base: str | Path) -> np.ndarray:
    """Read ``base.hdr``/``base.cfl`` -> complex64 array with numpy shape = BART dims (trailing 1s dropped)."""
    lines = Path(f"{base}.hdr").read_text().splitlines()
    dims = [int(d) for d in lines[1].split()]
    while len(dims) > 1 and dims[-1] == 1:
        dims.pop()
    data = np.fromfile(f"{base}.cfl", dtype=np.complex64)
    return data.reshape(dims, order="F")


def to_bart(a: np.ndarray) -> np.ndarray:
    """(C, ky, kx) -> BART [kx, ky, 1, C]; (ny, nx) -> [nx, ny]."""
    a = np.asarray(a)
    if a.ndim == 3:
        return a.transpose(2, 1, 0)[:, :, None, :]
    if a.ndim == 2:
        return a.T
    raise ValueError(f"expected (C, ky, kx) or (ny, nx), got shape {a.shape}")


def from_bart(a: np.ndarray, ndim: int) -> np.ndarray:
    """BART [kx, ky, 1, C] -> (C, ky, kx) (ndim=3); [nx, ny] -> (ny, nx) (ndim=2). C-contiguous complex64."""
    a = np.asarray(a)
    if ndim == 3:
        a = a.reshape(a.shape[0], a.shape[1], -1)  # [kx, ky, C] (drops the singleton z)
        return np.ascontiguousarray(a.transpose(2, 1, 0)).astype(np.complex64)
    if ndim == 2:
        return np.ascontiguousarray(a.reshape(a.shape[0], a.shape[1]).T).astype(np.complex64)
    raise ValueError(f"ndim must be 2 or 3, got {ndim}")


def bart(cmd: str, *inputs: np.ndarray, nout: int = 1, timeout: float = 600) -> np.ndarray | tuple[np.ndarray, ...]:
    """Run ``bart <cmd> in0 in1 ... out0 ...`` on arrays in BART dim order; returns nout arrays.

    Example: ``bart("fft -u 3", k)``. Raises BartError with BART's output when it fails.
    """
    exe = bart_executable()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with tempfile.TemporaryDirectory(prefix="scoremri-bart-") as tmp:
        ins = [os.path.join(tmp, f"in{i}") for i in range(len(inputs))]
        outs = [os.path.join(tmp, f"out{i}") for i in range(nout)]
        for name, arr in zip(ins, inputs):
            write_cfl(name, arr)
        args = [exe, *shlex.split(cmd), *ins, *outs]
        log.debug("bart: %s", " ".join(args))
        proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=timeout)
        if proc.returncode != 0:
            raise BartError(f"'bart {cmd}' failed ({proc.returncode}): {(proc.stderr or proc.stdout).strip()[-2000:]}")
        res = tuple(read_cfl(o) for o in outs)
    return res[0] if nout == 1 else res


def ecalib(kspace: np.ndarray, calib: int = 24, threshold: float | None = None, crop: float | None = None) -> np.ndarray:
    """``bart ecalib -m1 -r <calib> [-t threshold] [-c crop]``: maps (C, ky, kx) from k-space (C, ky, kx).

    Defaults of BART 0.8 when None: threshold 0.001, crop 0.8, kernel 6.
    """
    opts = f"ecalib -m1 -r {int(calib)}"
    if threshold is not None:
        opts += f" -t {threshold}"
    if crop is not None:
        opts += f" -c {crop}"
    return from_bart(bart(opts, to_bart(kspace)), 3)


def pics_sense(kspace: np.ndarray, maps: np.ndarray, lam: float = 0.01) -> np.ndarray:
    """``bart pics -d0 -S -l2 -r 0.01``: SENSE image (ny, nx) from k-space and maps (C, ky, kx)."""
    return from_bart(bart(f"pics -d0 -S -l2 -r {lam}", to_bart(kspace), to_bart(maps)), 2)


def pics_l1(kspace: np.ndarray, maps: np.ndarray, lam: float) -> np.ndarray:
    """``bart pics -d0 -S -l1 -r LAMBDA``: L1-wavelet compressed sensing image (ny, nx)."""
    return from_bart(bart(f"pics -d0 -S -l1 -r {lam}", to_bart(kspace), to_bart(maps)), 2)
