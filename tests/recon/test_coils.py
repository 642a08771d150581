"""Coil sensitivities: ESPIRiT against BART ecalib (same threshold, crop, calibration size) on BART's phantom and
on an ismrmrd_generate_cartesian_shepp_logan file; SENSE with our maps vs with BART's maps; Walsh; ACS extraction."""
from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from scoremri.gadget.testing import bart as B
from scoremri.recon.api import ReconError
from scoremri.recon.classical import sense_recon
from scoremri.recon.coils import espirit_maps, estimate_maps, extract_acs, walsh_maps
from scoremri.recon.config import CoilConfig
from scoremri.recon.fft import ifft2c
from scoremri.recon.masks import make_mask
from scoremri.recon.metrics import evaluate
from scoremri.recon.simulation import birdcage_maps, complex_image, simulate_kspace

THRESH, CROP, CALIB = 0.001, 0.8, 24  # BART 0.8 ecalib defaults, -r 24
# BART keeps singular values with s/s_max > sqrt(t) (calib.c number_of_kernels); ours (sigpy) s/s_max > threshold
OUR_THRESH = float(np.sqrt(THRESH))


def _coil_corr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per pixel |<a, b>| / (|a| |b|) over coils (phase-invariant), 0 where either is zero."""
    num = np.abs((a * b.conj()).sum(0))
    den = np.linalg.norm(a, axis=0) * np.linalg.norm(b, axis=0)
    return np.where(den > 0, num / np.maximum(den, 1e-30), 0.0)


def _compare_with_bart(kfull: np.ndarray, tmp_path: Path) -> dict[str, float]:
    C, ny, nx = kfull.shape
    mask = make_mask("random", (ny, nx), 4, acs=CALIB, seed=0)
    k = (kfull * mask).astype(np.complex64)
    ours = espirit_maps(extract_acs(torch.from_numpy(k), torch.from_numpy(mask), max_size=CALIB), (ny, nx),
                        kernel=6, threshold=OUR_THRESH, crop=CROP).numpy()
    theirs = B.ecalib(k, calib=CALIB, threshold=THRESH, crop=CROP)
    coil_imgs = ifft2c(torch.from_numpy(kfull)).numpy()
    gt = np.sqrt((np.abs(coil_imgs) ** 2).sum(0))
    obj = gt > 0.1 * gt.max()
    corr = _coil_corr(ours, theirs)[obj]
    kt, mt = torch.from_numpy(k), torch.from_numpy(mask)
    x_ours, _ = sense_recon(kt, mt, torch.from_numpy(ours), lam=0.01, iters=30)
    x_bart, _ = sense_recon(kt, mt, torch.from_numpy(theirs), lam=0.01, iters=30)
    return {
        "median": float(np.median(corr)),
        "p5": float(np.percentile(corr, 5)),
        "psnr_ours": evaluate(x_ours.numpy(), gt, fg=obj)["psnr_fg"],
        "psnr_bart": evaluate(x_bart.numpy(), gt, fg=obj)["psnr_fg"],
        "support_agree": float(((np.abs(ours).sum(0) > 0) == (np.abs(theirs).sum(0) > 0))[obj].mean()),
    }


def test_espirit_matches_bart_on_bart_phantom(bart_available, tmp_path):
    kfull = B.from_bart(B.bart("phantom -k -s 8 -x 128"), 3)
    assert kfull.shape == (8, 128, 128)
    r = _compare_with_bart(kfull, tmp_path)
    # median AND 5th percentile of the per-pixel coil-vector correlation inside the object
    assert r["median"] > 0.999 and r["p5"] > 0.99, r
    assert r["support_agree"] > 0.95, r
    assert abs(r["psnr_ours"] - r["psnr_bart"]) < 0.5, r


def _read_ismrmrd(path: Path) -> np.ndarray:
    import ismrmrd

    ds = ismrmrd.Dataset(str(path), "dataset", create_if_needed=False)
    try:
        acqs = [ds.read_acquisition(i) for i in range(ds.number_of_acquisitions())]
    finally:
        ds.close()
    acqs = [a for a in acqs if not a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)]
    ny = max(a.idx.kspace_encode_step_1 for a in acqs) + 1
    C, nx = acqs[0].data.shape
    k = np.zeros((C, ny, nx), np.complex64)
    for a in acqs:
        k[:, a.idx.kspace_encode_step_1, :] = a.data
    return k


def test_espirit_matches_bart_on_ismrmrd_shepp_logan(bart_available, shepp_logan_generator, tmp_path):
    out = tmp_path / "sl.h5"
    subprocess.run([shepp_logan_generator, "-m", "128", "-c", "8", "-O", "1", "-n", "0.01", "-o", str(out)],
                   check=True, capture_output=True)
    kfull = _read_ismrmrd(out)
    assert kfull.shape == (8, 128, 128)
    r = _compare_with_bart(kfull, tmp_path)
    assert r["median"] > 0.999 and r["p5"] > 0.99, r
    assert abs(r["psnr_ours"] - r["psnr_bart"]) < 0.5, r


def test_espirit_and_walsh_recover_birdcage_maps(dipy_t1):
    img = dipy_t1
    S = birdcage_maps(8, img.shape)
    rng = np.random.default_rng(0)
    mask = make_mask("random", img.shape, 4, seed=0)
    k = simulate_kspace(complex_image(img, rng), S, mask, 0.005, rng)
    obj = img > 0.1
    for method in ("espirit", "walsh"):
        maps, rep = estimate_maps(torch.from_numpy(k), torch.from_numpy(mask), CoilConfig(method=method))
        assert rep["coil_method"] == method and rep["acs_lines"] == 24
        m = maps.numpy()
        assert m.dtype == np.complex64 and m.shape == S.shape
        corr = _coil_corr(m, S)[obj]
        assert np.percentile(corr, 5) > 0.99, (method, np.percentile(corr, 5))
        nrm = (np.abs(m) ** 2).sum(0)
        np.testing.assert_allclose(nrm[nrm > 0], 1.0, atol=1e-4)


def test_auto_uses_walsh_for_small_acs(dipy_t1):
    img = dipy_t1
    S = birdcage_maps(4, img.shape)
    mask = make_mask("random", img.shape, 4, acs=8, seed=0)
    k = simulate_kspace(img, S, mask, 0.0, np.random.default_rng(0))
    maps, rep = estimate_maps(torch.from_numpy(k), torch.from_numpy(mask), CoilConfig(method="auto", min_acs=12))
    assert rep["coil_method"] == "walsh" and rep["acs_lines"] >= 8
    assert np.median(_coil_corr(maps.numpy(), S)[img > 0.1]) > 0.98


def test_extract_acs_sources_and_errors():
    rng = np.random.default_rng(0)
    k = (rng.normal(size=(4, 64, 48)) + 1j * rng.normal(size=(4, 64, 48))).astype(np.complex64)
    mask = make_mask("random", (64, 48), 4, acs=10, seed=1)
    acs = extract_acs(torch.from_numpy(k * mask), torch.from_numpy(mask), max_size=24)
    assert acs.shape[0] == 4 and acs.shape[1] >= 10 and acs.shape[2] == 24
    assert torch.all(acs.abs() > 0)
    calib = k[:, 20:44, :]
    acs2 = extract_acs(torch.from_numpy(k), torch.zeros(64, 48), calib=torch.from_numpy(calib), max_size=16)
    assert tuple(acs2.shape) == (4, 16, 16)
    np.testing.assert_array_equal(acs2.numpy(), calib[:, 4:20, 16:32])
    holes = np.zeros((64, 48), bool)
    holes[::4] = True  # equispaced, no fully sampled centre
    with pytest.raises(ReconError, match="no calibration data"):
        extract_acs(torch.from_numpy(k), torch.from_numpy(holes))
    with pytest.raises(ReconError, match="smaller than the ESPIRiT kernel"):
        espirit_maps(torch.from_numpy(k[:, :4, :4]), (64, 48))


def test_poisson_mask_acs_box_gives_maps(dipy_t1):
    img = dipy_t1[::2, ::2].copy()
    S = birdcage_maps(4, img.shape)
    mask = make_mask("poisson", img.shape, 3, acs=16, seed=0)
    k = simulate_kspace(img, S, mask, 0.0, np.random.default_rng(0))
    maps, rep = estimate_maps(torch.from_numpy(k), torch.from_numpy(mask), CoilConfig(method="espirit"))
    assert rep["calib_shape"][0] >= 16 and rep["calib_shape"][1] >= 16
    assert np.median(_coil_corr(maps.numpy(), S)[img > 0.1]) > 0.99
    w = walsh_maps(extract_acs(torch.from_numpy(k), torch.from_numpy(mask)), img.shape)
    assert np.median(_coil_corr(w.numpy(), S)[img > 0.1]) > 0.98


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_espirit_cuda_matches_cpu(dipy_t1):
    S = birdcage_maps(8, dipy_t1.shape)
    mask = make_mask("random", dipy_t1.shape, 4, seed=0)
    k = torch.from_numpy(simulate_kspace(dipy_t1, S, mask, 0.005, np.random.default_rng(0)))
    m = torch.from_numpy(mask)
    cpu, _ = estimate_maps(k, m, CoilConfig(method="espirit"))
    gpu, _ = estimate_maps(k.cuda(), m.cuda(), CoilConfig(method="espirit"))
    assert gpu.device.type == "cuda"
    corr = _coil_corr(cpu.numpy(), gpu.cpu().numpy())[dipy_t1 > 0.1]
    assert np.percentile(corr, 5) > 0.999
