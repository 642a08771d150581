"""Samplers ``pc`` and ``fast`` (recon/samplers): exactness against a closed-form Gaussian posterior,
seeds, batching / out-of-memory fallback, per-acceleration table, bad input, shipped-model smoke test.

Exactness setting: a white Gaussian prior on the scaled real and imaginary parts, N(mu, s^2) each, and
y = A x + n with small complex noise (sigma per part). The posterior is Gaussian with covariance
P = (A^H A / (2 sigma^2) + I / (2 s'^2))^-1 and mean mu' + P A^H (y - A mu') / (2 sigma^2) (s', mu' in data
units = prior units times the sampler's scale, which the report gives). Tolerances: the sample mean of K
draws is within 4 Monte-Carlo standard errors (plus 1 % of |x|) of the exact mean; the sample std within 20 %
of the exact posterior std on average.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from scoremri.model.priors import GaussianPrior
from scoremri.recon.api import ReconError, reconstruct
from scoremri.recon.config import ConfigError, load_config
from scoremri.recon.operators import SenseOp
from scoremri.recon.samplers.common import PriorRunner

N = 16
MU, S = 0.5, 0.1


def _setup(c: int = 2, sigma: float = 1e-3, seed: int = 0):
    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    maps = torch.randn(c, N, N, dtype=torch.complex64, generator=g)
    maps = (maps / maps.abs().pow(2).sum(0).sqrt()).numpy()
    mask = np.zeros((N, N), bool)
    mask[::4] = True  # 5 of 16 lines with 2 coils: the posterior has a null space the prior must fill
    mask[N // 2 - 1 : N // 2 + 1] = True
    gt = (MU + S * rng.standard_normal((N, N))) + 1j * (MU + S * rng.standard_normal((N, N)))
    op = SenseOp(torch.from_numpy(maps), torch.from_numpy(mask.astype(np.float32)))
    k = op.forward(torch.from_numpy(gt.astype(np.complex64))).numpy()
    k = k + (sigma * (rng.standard_normal(k.shape) + 1j * rng.standard_normal(k.shape))).astype(np.complex64)
    return maps, mask, (k * mask).astype(np.complex64), gt, op


def _posterior(op: SenseOp, k: np.ndarray, scale: float, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    eye = torch.eye(N * N, dtype=torch.complex64).reshape(N * N, N, N)
    a = op.forward(eye).reshape(N * N, -1).T.numpy().astype(np.complex128)
    s2, mu = (S * scale) ** 2, MU * scale * (1 + 1j)
    p = np.linalg.inv(a.conj().T @ a / (2 * sigma**2) + np.eye(N * N) / (2 * s2))
    m = mu + p @ (a.conj().T @ (k.ravel() - a @ np.full(N * N, mu))) / (2 * sigma**2)
    return m.reshape(N, N), np.sqrt(np.real(np.diag(p))).reshape(N, N)


def _prior(smax: float = 20.0) -> GaussianPrior:
    return GaussianPrior(MU, S, sigma_min=0.005, sigma_max=smax)


def _check_posterior(res, op, k, sigma, k_samples):
    mean, std = _posterior(op, k, res.report["scale"], sigma)
    mc = np.linalg.norm(std) / np.sqrt(k_samples)  # Monte-Carlo standard error of the K-sample mean
    err = np.linalg.norm(res.image - mean)
    assert err < 4 * mc + 0.01 * np.linalg.norm(mean), (err, mc)
    assert res.std is not None
    assert abs(res.std.mean() / std.mean() - 1) < 0.2, (res.std.mean(), std.mean())


@pytest.mark.parametrize("start", ["noise", "sense"])
def test_fast_approaches_gaussian_posterior(start):
    sigma = 1e-3
    maps, mask, k, gt, op = _setup(sigma=sigma)
    over = {"sampler.method": "fast", "sampler.samples": 48, "sampler.steps": 25, "sampler.dc_iters": 30,
            "sampler.eta": 1.0, "sampler.start": start, "sampler.start_sigma": 1.0, "sampler.by_accel": ""}
    res = reconstruct(k, mask, load_config("fast", over), maps=maps, prior=_prior(), seed=1)
    assert res.report["nfe"] == 25 and res.report["sampler"] == "fast"
    _check_posterior(res, op, k, sigma, 48)


def test_pc_small_n_approaches_gaussian_posterior():
    sigma = 1e-3
    maps, mask, k, gt, op = _setup(sigma=sigma)
    over = {"sampler.samples": 32, "sampler.steps": 60, "sampler.dc_iters": 10}
    res = reconstruct(k, mask, load_config("paper", over), maps=maps, prior=_prior(), seed=2)
    assert res.report["nfe"] == 120 and res.report["sampler"] == "pc"
    _check_posterior(res, op, k, sigma, 32)


def test_pc_single_coil_replace_is_exact_noiseless():
    """Single coil, k-space replacement, noiseless data: measured k-space of the output equals the data."""
    rng = np.random.default_rng(3)
    maps = np.ones((1, N, N), np.complex64)
    mask = np.zeros((N, N), bool)
    mask[::2] = True
    gt = (MU + S * rng.standard_normal((N, N))) * (1 + 1j)
    op = SenseOp(torch.from_numpy(maps), torch.from_numpy(mask.astype(np.float32)))
    k = op.forward(torch.from_numpy(gt.astype(np.complex64))).numpy()
    over = {"sampler.dc": "replace", "sampler.steps": 40, "sampler.samples": 16}
    res = reconstruct(k, mask, load_config("paper", over), maps=maps, prior=_prior(), seed=0)
    assert np.abs(op.forward(torch.from_numpy(res.image)).numpy() - k).max() < 1e-4
    # white prior whose mean (a constant) lives in the measured DC sample: the exact posterior mean is the
    # zero-filled image, and the mean of K samples has sqrt(1 + 1/K) times its error (here 1.03x)
    zf = op.adjoint(torch.from_numpy(k)).numpy()
    assert np.linalg.norm(res.image - gt) < 1.1 * np.linalg.norm(zf - gt)
    assert np.linalg.norm(res.image - zf) < 0.5 * np.linalg.norm(zf - gt)


@pytest.mark.parametrize("dc", ["ssos", "hybrid"])
def test_pc_coilwise_variants_run_and_beat_zero_filled(dc):
    maps, mask, k, gt, op = _setup(c=2, sigma=1e-3)
    over = {"sampler.dc": dc, "sampler.steps": 30}
    res = reconstruct(k, mask, load_config("paper", over), maps=maps, prior=_prior(), seed=0)
    assert res.report["nfe"] == 2 * 30 * 2
    zf = op.adjoint(torch.from_numpy(k)).numpy()
    assert np.linalg.norm(np.abs(res.image) - np.abs(gt)) < np.linalg.norm(np.abs(zf) - np.abs(gt))


def test_fast_rejects_coilwise_dc():
    maps, mask, k, _, _ = _setup()
    with pytest.raises(ReconError, match="pc-only"):
        reconstruct(k, mask, load_config("fast", {"sampler.dc": "ssos"}), maps=maps, prior=_prior())


@pytest.mark.parametrize("preset", ["fast", "paper"])
def test_same_seed_same_image(preset):
    maps, mask, k, _, _ = _setup()
    cfg = load_config(preset, {"sampler.steps": 8, "sampler.samples": 2})
    a = reconstruct(k, mask, cfg, maps=maps, prior=_prior(), seed=7)
    b = reconstruct(k, mask, cfg, maps=maps, prior=_prior(), seed=7)
    c = reconstruct(k, mask, cfg, maps=maps, prior=_prior(), seed=8)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.std, b.std)
    assert not np.array_equal(a.image, c.image)


class _OOMPrior(GaussianPrior):
    """Raises CUDA-style out-of-memory for batches larger than ``limit`` images."""

    def __init__(self, limit: int) -> None:
        super().__init__(MU, S, sigma_min=0.005, sigma_max=20.0)
        self.limit, self.sizes = limit, []

    def denoise(self, x, sigma):
        self.sizes.append(x.shape[0])
        if x.shape[0] > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return super().denoise(x, sigma)


def test_out_of_memory_falls_back_to_smaller_chunks_with_same_result():
    maps, mask, k, _, _ = _setup()
    cfg = load_config("fast", {"sampler.steps": 6, "sampler.samples": 4, "sampler.batch": 8})
    ref = reconstruct(k, mask, cfg, maps=maps, prior=_prior(), seed=5)
    p = _OOMPrior(limit=3)
    got = reconstruct(k, mask, cfg, maps=maps, prior=p, seed=5)
    np.testing.assert_allclose(got.image, ref.image, rtol=1e-5, atol=1e-6)
    # 4 samples x (real, imag) = 8 images: 8 and 4 fail, then every call runs in chunks of 2
    assert p.sizes[:2] == [8, 4] and set(p.sizes[2:]) == {2}


def test_batch_option_chunks_network_calls():
    p = _OOMPrior(limit=100)
    r = PriorRunner(p, chunk=3)
    x = torch.randn(8, 1, N, N)
    out = r("denoise", x, 0.5)
    assert p.sizes == [3, 3, 2] and r.calls == 1
    torch.testing.assert_close(out, GaussianPrior(MU, S).denoise(x, torch.full((8,), 0.5)))


def test_by_accel_table():
    table = "[{max_accel: 5, start: noise, start_sigma: 1.0, steps: 30}, {start: sense, start_sigma: 0.2, dc_lam: 0.5}]"
    cfg = load_config("fast", {"sampler.by_accel": table}).sampler
    lo, hi = cfg.for_acceleration(4.0), cfg.for_acceleration(8.0)
    assert (lo.start, lo.start_sigma, lo.steps, lo.dc_lam) == ("noise", 1.0, 30, cfg.dc_lam)
    assert (hi.start, hi.start_sigma, hi.steps, hi.dc_lam) == ("sense", 0.2, cfg.steps, 0.5)
    assert hi.by_accel == [] and hi.for_acceleration(8.0) == hi
    for preset in ("fast", "uncertainty"):  # the shipped tables parse and apply
        load_config(preset).sampler.for_acceleration(4.0)
        load_config(preset).sampler.for_acceleration(12.0)
    with pytest.raises(ConfigError, match="colour"):
        load_config("fast", {"sampler.by_accel": "[{max_accel: 4, colour: red}]"})
    with pytest.raises(ConfigError, match=r"by_accel\[0\].*sampler.start"):
        load_config("fast", {"sampler.by_accel": "[{start: sideways}]"})
    with pytest.raises(ConfigError, match="list of rows"):
        load_config("fast", {"sampler.by_accel": "start=noise"})


def test_bad_inputs_give_clear_errors():
    maps, mask, k, _, _ = _setup()
    cfg = load_config("fast", {"sampler.steps": 4})
    bad = k.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ReconError, match="NaN"):
        reconstruct(bad, mask, cfg, maps=maps, prior=_prior())
    zero = k.copy()
    zero[1] = 0
    with pytest.raises(ReconError, match="only zeros"):
        reconstruct(zero, mask, cfg, maps=maps, prior=_prior())
    with pytest.raises(ReconError, match="maps shape"):
        reconstruct(k, mask, cfg, maps=maps[:, :-1], prior=_prior())
    with pytest.raises(ReconError, match="mask shape"):
        reconstruct(k, mask[:-1], cfg, maps=maps, prior=_prior())
    with pytest.raises(ReconError, match="all zero"):
        reconstruct(k, mask, cfg, maps=np.zeros_like(maps), prior=_prior())
    with pytest.raises(ReconError, match="starting sigma"):
        reconstruct(k, mask, load_config("fast", {"sampler.start_sigma": 100.0, "sampler.start": "sense", "sampler.by_accel": ""}),
                    maps=maps, prior=_prior())


def _psnr_ls(x: np.ndarray, gt: np.ndarray) -> float:
    """PSNR (dB) of |x| against |gt| after one least-squares scale on magnitude, both divided by max|gt|."""
    a, g = np.abs(x).ravel(), np.abs(gt).ravel()
    a = a * (a @ g) / max(a @ a, 1e-30)
    mse = np.mean((a - g) ** 2) / g.max() ** 2
    return float(10 * np.log10(1 / mse))


def test_shipped_model_smoke_beats_zero_filled(repo, dipy_t1):
    """The shipped default model, fast sampler with 10 steps, 64x64 dipy T1 (downsampled), 4 coils, x4."""
    weights = repo / "model" / "weights" / "default.safetensors"
    if not weights.exists():
        pytest.skip(f"shipped default model not built yet ({weights} missing)")
    from scoremri.recon.masks import make_mask
    from scoremri.recon.simulation import birdcage_maps, simulate_kspace

    img = torch.nn.functional.avg_pool2d(torch.from_numpy(dipy_t1)[None, None], 4)[0, 0].numpy()
    rng = np.random.default_rng(0)
    maps = birdcage_maps(4, img.shape)
    mask = make_mask("random", img.shape, 4.0, acs=8, seed=0)
    k = simulate_kspace(img, maps, mask, 0.005 * img.max(), rng)
    over = {"sampler.steps": 10, "sampler.by_accel": "", "sampler.start": "sense", "sampler.start_sigma": 0.1}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the network's many small ops: 2 threads on a busy 2-core box are ~50x slower
    try:
        res = reconstruct(k, mask, load_config("fast", over), maps=maps, device="cpu", seed=0)
    finally:
        torch.set_num_threads(threads)
    zf = reconstruct(k, mask, load_config("zero_filled"), maps=maps, device="cpu")
    assert np.isfinite(res.image).all() and res.report["nfe"] == 10
    assert _psnr_ls(res.image, img) > _psnr_ls(zf.image, img) + 1.0


def test_one_line_acs_errors_without_maps_and_runs_with_given_maps():
    """A 1-line ACS cannot calibrate coil maps: a clear error; with maps supplied the sampler needs no ACS."""
    maps, _, _, gt, _ = _setup()
    mask = np.zeros((N, N), bool)
    mask[::4] = True
    mask[N // 2] = True
    op = SenseOp(torch.from_numpy(maps), torch.from_numpy(mask.astype(np.float32)))
    k = op.forward(torch.from_numpy(gt.astype(np.complex64))).numpy()
    cfg = load_config("fast", {"sampler.steps": 4})
    with pytest.raises(ReconError, match="calibration"):
        reconstruct(k, mask, cfg, prior=_prior())
    res = reconstruct(k, mask, cfg, maps=maps, prior=_prior())
    assert np.isfinite(res.image).all()
