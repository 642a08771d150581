"""Physics layer: FFT and SENSE adjointness, CG, the classical methods through the entry point, BART axis
convention."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from scoremri.recon.api import ReconError, reconstruct
from scoremri.recon.cg import cg
from scoremri.recon.classical import rss, sense_recon
from scoremri.recon.config import ReconConfig
from scoremri.recon.fft import fft1c, fft2c, ifft1c, ifft2c
from scoremri.recon.masks import make_mask
from scoremri.recon.metrics import evaluate
from scoremri.recon.operators import SenseOp
from scoremri.recon.simulation import birdcage_maps, complex_image, simulate_kspace


def _crandn(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.complex(torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)).to(torch.complex64)


def _inner(a, b):
    return complex((a.conj() * b).sum().to(torch.complex128))


@pytest.mark.parametrize("shape", [(32, 32), (31, 20), (2, 3, 17, 24)])
def test_fft_dot_product_and_unitarity(shape):
    x, y = _crandn(*shape, seed=1), _crandn(*shape, seed=2)
    lhs, rhs = _inner(fft2c(x), y), _inner(x, ifft2c(y))
    assert abs(lhs - rhs) / abs(lhs) < 1e-5
    torch.testing.assert_close(ifft2c(fft2c(x)), x, rtol=1e-5, atol=1e-5)
    assert float(fft2c(x).abs().pow(2).sum()) == pytest.approx(float(x.abs().pow(2).sum()), rel=1e-5)
    l1, r1 = _inner(fft1c(x, -2), y), _inner(x, ifft1c(y, -2))
    assert abs(l1 - r1) / abs(l1) < 1e-5


def test_fft_centre_convention():
    x = torch.zeros(16, 16, dtype=torch.complex64)
    x[8, 8] = 1  # image centre at N//2 -> flat k-space, no phase ramp
    torch.testing.assert_close(fft2c(x), torch.full((16, 16), 1 / 16, dtype=torch.complex64))


@pytest.mark.parametrize("batch", [(), (3,)])
def test_sense_dot_product(batch):
    C, ny, nx = 6, 24, 20
    maps = torch.from_numpy(birdcage_maps(C, (ny, nx)))
    mask = torch.from_numpy(make_mask("random", (ny, nx), 3, seed=0))
    op = SenseOp(maps, mask)
    x = _crandn(*batch, ny, nx, seed=3)
    y = _crandn(*batch, C, ny, nx, seed=4)
    lhs, rhs = _inner(op.forward(x), y), _inner(x, op.adjoint(y))
    assert abs(lhs - rhs) / abs(lhs) < 1e-5
    # normal operator is Hermitian PSD with norm <= 1 for normalised maps
    n = op.normal(x)
    assert _inner(x, n).real >= 0 and abs(_inner(x, n).imag) / abs(_inner(x, n)) < 1e-5
    assert float(n.abs().pow(2).sum()) <= float(x.abs().pow(2).sum()) * (1 + 1e-5)


def test_cg_small_spd_and_batched():
    g = torch.Generator().manual_seed(0)
    n = 20
    B = torch.randn(2, n, n, generator=g, dtype=torch.float64)
    A = (B @ B.transpose(-1, -2) + 0.5 * torch.eye(n, dtype=torch.float64)).to(torch.complex128)
    b = torch.complex(torch.randn(2, n, generator=g, dtype=torch.float64), torch.randn(2, n, generator=g, dtype=torch.float64))
    normal = lambda v: (A @ v.unsqueeze(-1)).squeeze(-1)  # noqa: E731
    x, info = cg(normal, b, lam=0.1, iters=200, tol=1e-10, batch_dims=1)
    ref = torch.linalg.solve(A + 0.1 * torch.eye(n), b.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(x, ref, rtol=1e-7, atol=1e-8)
    assert info["iterations"] <= 200 and info["max_rel_residual"] < 1e-9
    # the two systems are independent: solving the first alone gives the same answer
    x0, _ = cg(lambda v: A[0] @ v, b[0], lam=0.1, iters=200, tol=1e-10)
    torch.testing.assert_close(x0, x[0], rtol=1e-7, atol=1e-8)
    # residual decreases with iterations; 0 iterations returns the start
    _, i5 = cg(normal, b, lam=0.1, iters=5, tol=0, batch_dims=1)
    _, i15 = cg(normal, b, lam=0.1, iters=15, tol=0, batch_dims=1)
    assert i15["max_rel_residual"] < i5["max_rel_residual"]
    xz, _ = cg(normal, b, iters=0, batch_dims=1)
    assert torch.all(xz == 0)


@pytest.fixture(scope="module")
def brain_problem(dipy_t1):
    rng = np.random.default_rng(0)
    S = birdcage_maps(8, dipy_t1.shape)
    mask = make_mask("random", dipy_t1.shape, 4, acs=24, seed=0)
    k = simulate_kspace(complex_image(dipy_t1, rng), S, mask, 0.005, rng)
    return k, mask, S


def test_sense_beats_zero_filled_on_dipy(brain_problem, dipy_t1):
    k, mask, _ = brain_problem
    res = {}
    for method in ("zero_filled", "sense"):
        cfg = ReconConfig()
        cfg.sampler.method = method
        r = reconstruct(k, mask, cfg, device="cpu")
        assert r.image.shape == dipy_t1.shape and r.image.dtype == np.complex64
        assert r.report["nfe"] == 0 and r.report["coil_method"] == "espirit"
        res[method] = evaluate(r.image, dipy_t1)
    assert res["sense"]["psnr"] > res["zero_filled"]["psnr"] + 3, res
    assert res["sense"]["ssim_fg"] > res["zero_filled"]["ssim_fg"] + 0.05, res
    assert res["sense"]["psnr_fg"] > res["zero_filled"]["psnr_fg"] + 3, res
    assert res["sense"]["psnr"] > 33, res


def test_sense_with_true_maps_is_near_exact_without_noise(dipy_t1):
    img = dipy_t1[::2, ::2].copy()
    S = birdcage_maps(8, img.shape)
    mask = make_mask("equispaced", img.shape, 2, acs=8, seed=0)
    k = simulate_kspace(img, S, mask, 0.0, np.random.default_rng(0))
    x, info = sense_recon(torch.from_numpy(k), torch.from_numpy(mask), torch.from_numpy(S), lam=0.0, iters=100, tol=1e-7)
    assert evaluate(x.numpy(), img)["psnr"] > 50
    # rss of the fully sampled coil images = |image| for normalised maps
    full = simulate_kspace(img, S, np.ones(img.shape, bool), 0.0, np.random.default_rng(0))
    torch.testing.assert_close(rss(ifft2c(torch.from_numpy(full))), torch.from_numpy(img), rtol=1e-4, atol=1e-5)


def test_sense_batched_matches_single(brain_problem, dipy_t1):
    """A batch of two different slices solves each slice's own system. The second slice is the transposed
    image, not a multiple of the first, so a CG step shared across the batch would show (7.0e-4 with batch_dims=0);
    float32 rounding of the batched FFTs at 2 threads is 3e-6 on |x| <= 0.92."""
    k, mask, S = brain_problem
    rng = np.random.default_rng(1)
    k2 = simulate_kspace(complex_image(np.ascontiguousarray(dipy_t1.T), rng), S, mask, 0.005, rng)
    kt, k2t, mt, St = (torch.from_numpy(a) for a in (k, k2, mask, S))
    xb, _ = sense_recon(torch.stack([kt, k2t]), mt, St, lam=0.01, iters=10)
    for i, ki in enumerate((kt, k2t)):
        xi, _ = sense_recon(ki, mt, St, lam=0.01, iters=10)
        torch.testing.assert_close(xb[i], xi, rtol=1e-4, atol=2e-5)


def test_reconstruct_bad_input(brain_problem):
    k, mask, _ = brain_problem
    cfg = ReconConfig()
    cfg.sampler.method = "sense"
    holes = np.zeros_like(mask)
    holes[::4] = True
    with pytest.raises(ReconError, match="no calibration data"):
        reconstruct(k * holes, holes, cfg)
    bad = k.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ReconError, match="NaN"):
        reconstruct(bad, mask, cfg)


def test_bart_axis_convention_round_trip(bart_available):
    from scoremri.gadget.testing import bart as B

    x = _crandn(3, 16, 12, seed=5).numpy()
    k = B.from_bart(B.bart("fft -u 3", B.to_bart(x)), 3)
    np.testing.assert_allclose(k, fft2c(torch.from_numpy(x)).numpy(), atol=1e-5)
    back = B.from_bart(B.bart("fft -u -i 3", B.to_bart(k)), 3)
    np.testing.assert_allclose(back, x, atol=1e-5)
    img = x[0]
    np.testing.assert_array_equal(B.from_bart(B.bart("scale 1", B.to_bart(img)), 2), img)
    with pytest.raises(B.BartError, match="failed"):
        B.bart("nosuchtool", B.to_bart(img))


def test_bart_pics_sense_agrees_with_ours(bart_available, brain_problem, dipy_t1):
    from scoremri.gadget.testing import bart as B

    k, mask, S = brain_problem
    ours, _ = sense_recon(torch.from_numpy(k), torch.from_numpy(mask), torch.from_numpy(S), lam=0.01, iters=30)
    theirs = B.pics_sense(k, S)
    p_ours, p_bart = evaluate(ours.numpy(), dipy_t1)["psnr"], evaluate(theirs, dipy_t1)["psnr"]
    assert abs(p_ours - p_bart) < 1.0, (p_ours, p_bart)
