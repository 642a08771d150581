"""The magnitude cases of benchmarks/grappa.py (what the in-process quality table used before it went through raw
files): dipy's ``t1_coronal_slice.npy``, nibabel ``example4d.nii.gz`` slices (volume 0, z 10 and 14), the BART
and ISMRMRD Shepp-Logan phantoms; each a complex image (smooth random phase) with max |gt| = 1. Evaluation
data only, never trained on.
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from scoremri.model.publish import dipy_slice
from scoremri.recon.simulation import complex_image

log = logging.getLogger("benchmarks.cases")


@dataclass
class Case:
    name: str
    gt: np.ndarray  # (ny, nx) complex64, max |gt| = 1


# ------------------------------------------------------------------------------------------------ data
def _norm(mag: np.ndarray) -> np.ndarray:
    mag = np.abs(np.asarray(mag, dtype=np.float64))
    return (mag / mag.max()).astype(np.float32)


def load_example4d(slices: list[int]) -> list[tuple[str, np.ndarray]]:
    import nibabel

    p = Path(nibabel.__file__).parent / "tests" / "data" / "example4d.nii.gz"
    vol = np.asarray(nibabel.load(p).get_fdata())
    return [(f"ex4d_z{z}", _norm(np.ascontiguousarray(vol[:, :, z, 0]))) for z in slices]  # (128, 96)


def load_bart_phantom(n: int = 256) -> np.ndarray | None:
    if not shutil.which("bart"):
        return None
    from scoremri.gadget.testing.bart import bart

    return _norm(np.squeeze(bart(f"phantom -x {n}")))


def load_ismrmrd_phantom(n: int = 256) -> np.ndarray | None:
    exe = shutil.which("ismrmrd_generate_cartesian_shepp_logan")
    if not exe:
        return None
    import ismrmrd

    from scoremri.recon.fft import ifft2c

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "sl.h5")
        subprocess.run([exe, "-m", str(n), "-c", "8", "-O", "1", "-n", "0", "-o", out], check=True,
                       capture_output=True, cwd=tmp)
        ds = ismrmrd.Dataset(out, "dataset", create_if_needed=False)
        n_acq = ds.number_of_acquisitions()
        first = ds.read_acquisition(0)
        c, nx = first.data.shape
        k = np.zeros((c, n, nx), np.complex64)
        for i in range(n_acq):
            a = ds.read_acquisition(i)
            k[:, a.idx.kspace_encode_step_1, :] = a.data
        ds.close()
    img = ifft2c(torch.from_numpy(k)).abs().pow(2).sum(0).sqrt().numpy()
    return _norm(img)


def cases(which: list[str], seed: int = 0) -> list[Case]:
    rng = np.random.default_rng(seed)
    mags: list[tuple[str, np.ndarray]] = []
    if "t1" in which:
        mags.append(("dipy_t1", dipy_slice()))
    if "ex4d" in which:
        mags += load_example4d([10] if "ex4d1" in which else [10, 14])
    if "phantom" in which:
        p = load_bart_phantom()
        if p is None:
            log.warning("bart not installed: Shepp-Logan phantom row skipped")
        else:
            mags.append(("bart_phantom", p))
    if "ismrmrd" in which:
        p = load_ismrmrd_phantom()
        if p is None:
            log.warning("ismrmrd-tools not installed: ismrmrd Shepp-Logan row skipped")
        else:
            mags.append(("ismrmrd_sl", p))
    return [Case(name, complex_image(m, rng)) for name, m in mags]


