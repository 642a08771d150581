"""What sites run today: Gadgetron's own generic Cartesian GRAPPA chain on a simulated scan, scored against the
file's stored ground truth (for benchmarks/grappa.py and the quality table; test and benchmark support only).

:func:`run_generic_grappa` simulates the scan as a scanner acquires it for GRAPPA (``scoremri simulate --mask
grappa``: every R-th line through the k-space centre plus the ACS block, off-grid ACS lines flagged
calibration only; header acceleration R), sends it through a real Gadgetron server with
``Generic_Cartesian_Grappa_Complex.xml`` (complex output, no ushort scaling) and scores the image with
``recon.metrics.evaluate`` (one least-squares scale on magnitude, both divided by max |gt|; full image and
foreground).

Noise: the server runs without a storage server (``-d true``), so NoiseAdjustGadget cannot take noise scans;
with ``sigma > 0`` the noise scan is left out of the file (the simulated noise is white with the same variance
in every coil, so whitening would be one scalar, which the least-squares scale absorbs).

Why the file needed ``--mask grappa`` (issue 16): the generic chain's image-domain GRAPPA unfolds exactly
R-periodic data with kernels calibrated on the ACS block. A ``random`` mask has no period; the ``equispaced``
mask places its lines at a fractional spacing (its count matches the true acceleration including the ACS
lines) and flagged every ACS line calibration-and-imaging, so extra off-grid lines sat in the data GRAPPA
unfolds: the chain returned a blurred image stretched along the phase-encode axis, below zero-filled.
"""
from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .gadgetron_server import GadgetronInstall, GadgetronServer, find_gadgetron, run_client

log = logging.getLogger(__name__)

GENERIC_CHAIN = "Generic_Cartesian_Grappa_Complex.xml"


@dataclass
class GrappaRun:
    """One scan through the generic chain. image, gt: (ny, nx) complex64 (gt: the file's phantom, in the
    file's units); metrics: ``recon.metrics.evaluate(image, gt)``; seconds: client wall time."""

    name: str
    image: np.ndarray
    gt: np.ndarray
    metrics: dict[str, float]
    accel: int
    acs: int
    coils: int
    true_accel: float
    seconds: float
    raw: Path


def simulate_grappa_file(path: Path, mag: np.ndarray, *, coils: int = 8, accel: int = 4, acs: int = 24,
                         sigma: float = 0.0, seed: int = 0, ro_oversampling: int = 2) -> dict[str, Any]:
    """Write a GRAPPA-pattern scan of one magnitude image (ny, nx) in [0, 1] to ``path``; returns simulate()'s
    dict. With sigma > 0 the noise scan is not written (no storage server, see the module docstring)."""
    from scoremri.gadget.files.simulate import simulate, write_raw

    sim = simulate(np.asarray(mag, np.float32)[None], coils=coils, accel=float(accel), mask_kind="grappa", acs=acs,
                   sigma=sigma, seed=seed, ro_oversampling=ro_oversampling)
    acqs = [a for a in sim["acquisitions"] if not a.is_flag_set(19)]  # ACQ_IS_NOISE_MEASUREMENT
    write_raw(path, {**sim, "acquisitions": acqs})
    return sim


def chain_without_coil_compression(dest: str | Path, install: GadgetronInstall | None = None,
                                   chain: str = GENERIC_CHAIN) -> Path:
    """A copy of the generic chain that keeps every coil: upstream KLT threshold -1 (its default 0.002 keeps 2
    of 8 modes of the smooth birdcage coils of noise-free simulated files), no downstream compression. A
    diagnostic of what the shipped defaults cost, not what sites run."""
    install = install or find_gadgetron()
    text = install.config(chain).read_text()
    for name, value in (("upstream_coil_compression_thres", "-1"), ("downstream_coil_compression", "false")):
        text, n = re.subn(rf"(<name>{name}</name>\s*<value>)[^<]*(</value>)", rf"\g<1>{value}\g<2>", text)
        if n != 1:
            raise ValueError(f"{chain}: property {name} not found once ({n})")
    dest = Path(dest)
    dest.write_text(text)
    return dest


def run_generic_grappa(
    mag: np.ndarray, workdir: str | Path, *, name: str = "case", coils: int = 8, accel: int = 4, acs: int = 24,
    sigma: float = 0.0, seed: int = 0, chain: str = GENERIC_CHAIN, install: GadgetronInstall | None = None,
    server: GadgetronServer | None = None, timeout: float = 300.0,
) -> GrappaRun:
    """Simulate, reconstruct with Gadgetron's ``chain`` (a name in its share/gadgetron/config, or a path) and
    score one case. ``server``: a running server to reuse (else one is started and stopped here)."""
    from scoremri.gadget.files.rawfile import read_images
    from scoremri.gadget.files.simulate import read_ground_truth
    from scoremri.recon.metrics import evaluate

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    raw = workdir / f"{name}_R{accel}_c{coils}.h5"
    out = workdir / f"{name}_R{accel}_c{coils}_grappa.h5"
    out.unlink(missing_ok=True)
    sim = simulate_grappa_file(raw, mag, coils=coils, accel=accel, acs=acs, sigma=sigma, seed=seed)
    gt = read_ground_truth(raw)[0][0]
    install = install or (server.install if server is not None else find_gadgetron())
    own = server is None
    srv = server or GadgetronServer(workdir / "gadgetron", install).start()
    try:
        kw: dict[str, Any] = {"xml": chain} if Path(chain).exists() else {"config_name": chain}
        t0 = time.monotonic()
        res = run_client(srv.port, raw, out, group="grappa", timeout=timeout, install=install, **kw)
        seconds = time.monotonic() - t0
    finally:
        if own:
            srv.stop()
    if res.timed_out or res.returncode != 0 or not out.exists():
        errors = [ln.split("] ", 1)[-1] for ln in srv.log().splitlines() if " ERROR " in ln or "what():" in ln]
        raise RuntimeError(f"{chain} on {raw.name}: client exit {res.returncode} (timed out: {res.timed_out}); "
                           f"server: {errors[-1].strip() if errors else srv.log()[-500:]}")
    images = [im for ims in read_images(out, "grappa").values() for im in ims]
    if len(images) != 1:
        raise RuntimeError(f"{chain} on {raw.name}: expected one image, got {len(images)}")
    image = np.asarray(images[0].data).reshape(images[0].data.shape[-2:]).astype(np.complex64)
    if image.shape != gt.shape:
        raise RuntimeError(f"{chain} on {raw.name}: image {image.shape} but ground truth {gt.shape}")
    lines = np.asarray(sim["mask"], bool)
    return GrappaRun(name=name, image=image, gt=gt, metrics=evaluate(image, gt), accel=int(accel), acs=acs,
                     coils=coils, true_accel=lines.size / lines.sum(), seconds=seconds, raw=raw)
