"""Test data for the gadget tests: a small multi-coil phantom as hand-made Gadgetron ReconData.

The phantom is dipy's t1_coronal_slice (visible evaluation data, never training), downsampled to 64 x 64,
with birdcage coil maps and a little complex noise.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from scoremri.gadget.testing.harness import header_xml, synthetic_recon_data

NY = NX = 64
NC = 4
ACS = range(NY // 2 - 8, NY // 2 + 8)  # 16 fully sampled centre lines


def phantom() -> np.ndarray:
    """(64, 64) float32 magnitude in [0, 1]."""
    import dipy.data

    path = Path(dipy.data.__file__).parent / "files" / "t1_coronal_slice.npy"
    img = np.load(path).astype(np.float32)
    img = img / img.max()
    ny, nx = img.shape
    img = img[: ny - ny % 4 : 4, : nx - nx % 4 : 4][:NY, :NX]
    out = np.zeros((NY, NX), np.float32)
    out[: img.shape[0], : img.shape[1]] = img
    return out


def kspace(seed: int = 0, sigma: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
    """(C, ky, kx) complex64 fully sampled k-space and the (ny, nx) ground-truth image."""
    from scoremri.recon.simulation import birdcage_maps, simulate_kspace

    rng = np.random.default_rng(seed)
    gt = phantom()
    maps = birdcage_maps(NC, (NY, NX))
    k = simulate_kspace(gt, maps, np.ones((NY, NX), bool), sigma, rng)
    return k, gt


def rows_r2() -> np.ndarray:
    """Acquired E1 lines: every 2nd line plus the 16 centre lines."""
    return np.union1d(np.arange(0, NY, 2), np.asarray(list(ACS)))


def slice_data(slice_: int = 0, repetition: int = 0, *, rows: np.ndarray | None = None, ref: bool = False,
               seed: int = 0, position: tuple[float, float, float] = (1.5, -2.25, 10.0)):
    """ReconData for one slice (2x undersampled + ACS; with ref=True the ACS goes into a ref buffer)."""
    k, _ = kspace(seed)
    if rows is None:
        rows = np.arange(0, NY, 2) if ref else rows_r2()
    return synthetic_recon_data(
        k, rows, slice_=slice_, repetition=repetition, ref_rows=list(ACS) if ref else None,
        position=(position[0], position[1], position[2] + 5.0 * slice_),
    )


def header(slices: int = 1, repetitions: int = 1) -> str:
    return header_xml(NY, NX, NC, slices=slices, repetitions=repetitions, acceleration=2)
