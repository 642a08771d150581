"""The sanity fallback (recon/sanity.py): the discrepancy principle on whitened data and the coil-support test;
replay sends a broken prior's slice as the labelled SENSE fallback (WARNING with the reason), never the shipped
prior's; ``sampler.sanity = false`` turns the fallback off but still reports."""
from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch

from scoremri.gadget.files.rawfile import read_images
from scoremri.gadget.files.replay import replay
from scoremri.gadget.files.simulate import read_ground_truth, simulate, write_raw
from scoremri.recon.api import Problem
from scoremri.recon.config import load_config
from scoremri.recon.metrics import evaluate
from scoremri.recon.operators import SenseOp
from scoremri.recon.sanity import check, measure


def _problem(sigma: float, seed: int = 0, support: bool = True) -> tuple[Problem, torch.Tensor]:
    """A one-slice batch, 48x48 with 6 coils, exact maps and complex noise of std sigma per part (known, as
    from the prewhitening); returns (problem, truth)."""
    g = torch.Generator().manual_seed(seed)
    n, c = 48, 6
    maps = torch.randn(c, n, n, dtype=torch.complex64, generator=g)
    maps = maps / maps.abs().pow(2).sum(0).sqrt()
    if not support:
        maps[:, :, :4] = 0  # the ESPIRiT crop: no coil sees the left edge
    mask = torch.zeros(n, n)
    mask[::3] = 1
    mask[n // 2 - 4: n // 2 + 4] = 1
    x = torch.randn(n, n, dtype=torch.complex64, generator=g) * 10
    if not support:
        x[:, :4] = 0
    noise = torch.complex(torch.randn(c, n, n, generator=g), torch.randn(c, n, n, generator=g)) * sigma
    y = (SenseOp(maps, mask).forward(x) + noise) * mask
    p = Problem(y[None], mask[None], maps[None], load_config("fast"), torch.device("cpu"), [torch.Generator()],
                noise_std=[sigma])
    return p, x


def test_discrepancy_of_the_truth_is_the_noise_level():
    p, x = _problem(sigma=0.7)
    m = measure(p.kspace[0], p.mask[0], p.maps[0], x, noise_std=0.7)
    assert m["measured"] == 6 * int(p.mask.sum())
    assert m["residual_ratio"] == pytest.approx(1.0, abs=0.03)  # ||n|| / (sigma sqrt(2 M)) over ~12 k samples
    assert measure(p.kspace[0], p.mask[0], p.maps[0], x, 0.35)["residual_ratio"] == pytest.approx(2.0, abs=0.06)
    assert measure(p.kspace[0], p.mask[0], p.maps[0], x, None)["residual_ratio"] is None  # unknown: no test
    rep = check(p, 0, x)
    assert rep["failed"] is None and rep["noise_source"] == "prewhitening"
    rep = check(p, 0, 3 * x)  # a wrong intensity scale contradicts the data
    assert "residual" in rep["failed"] and "x the noise level" in rep["failed"] and rep["residual_ratio"] > 4
    p.noise_std = None  # unknown: the sampler's estimate, when it gives one, stands in
    assert check(p, 0, 3 * x, noise_estimate=0.7)["noise_source"] == "calibration estimate"


def test_nearly_noise_free_data_pass_below_the_relative_floor():
    """Noise-free data (simulations) make any finite-step image fail the discrepancy principle by orders of
    magnitude; below sampler.sanity_floor (1 %) of the data's norm the residual passes, above it it fails."""
    p, x = _problem(sigma=1e-6)
    close = check(p, 0, x * 1.003)  # 0.3 % off: what a good sampler leaves on noise-free data
    assert close["residual_ratio"] > 100 and close["relative_residual"] == pytest.approx(0.003, rel=0.05)
    assert close["failed"] is None
    far = check(p, 0, x * 1.05)
    assert far["relative_residual"] == pytest.approx(0.05, rel=0.05) and "x the noise level" in far["failed"]
    p.config.sampler.sanity_floor = 0.0  # the pure discrepancy principle
    assert check(p, 0, x * 1.003)["failed"] is not None


def test_energy_outside_the_coil_support():
    p, x = _problem(sigma=0.7, support=False)
    assert check(p, 0, x)["outside_fraction"] == 0.0
    bad = x.clone()
    bad[:, :4] = 5.0  # invented signal where no coil map is non-zero (invisible to the data)
    rep = check(p, 0, bad)
    assert rep["residual_ratio"] == pytest.approx(1.0, abs=0.03) and rep["outside_fraction"] > 0.01
    assert "where the coil maps are zero" in rep["failed"]


def test_noise_level_from_the_calibration_block():
    """Low-rank multi-coil k-space (a smooth object seen by 8 smooth coils) plus white noise: the Hankel-tail
    estimate with its Marchenko-Pastur reference finds the noise std per part within 10 %, in any units."""
    from scoremri.recon.noise import calibration_noise_std, kspace_noise_std
    from scoremri.recon.simulation import birdcage_maps
    from scoremri.recon.fft import fft2c

    yy, xx = np.mgrid[:128, :128] / 128.0
    img = torch.from_numpy(((np.hypot(yy - 0.5, xx - 0.5) < 0.35) * (1 + np.sin(9 * xx))).astype(np.complex64))
    k = fft2c(torch.from_numpy(birdcage_maps(8, (128, 128))) * img)
    g = torch.Generator().manual_seed(1)
    for sigma in (0.05, 0.2):
        noisy = k + sigma * torch.complex(torch.randn(k.shape, generator=g), torch.randn(k.shape, generator=g))
        est = calibration_noise_std(noisy[:, 52:76, :])
        assert est == pytest.approx(sigma, rel=0.1), (sigma, est)
        assert calibration_noise_std(1e3 * noisy[:, 52:76, :]) == pytest.approx(1e3 * est, rel=1e-3)
    mask = torch.zeros(128, 128)
    mask[52:76] = 1
    mask[::4] = 1
    assert kspace_noise_std(noisy * mask, mask) == pytest.approx(0.2, rel=0.1)  # the ACS lines found in the mask
    assert calibration_noise_std(noisy[:, 60:64, :]) is None  # 4 lines: too small for a kernel of 5


@pytest.fixture(scope="module")
def brain_scan(tmp_path_factory, dipy_t1):
    img = torch.nn.functional.interpolate(torch.from_numpy(dipy_t1)[None, None], size=(96, 96), mode="area")[0, 0]
    sim = simulate(img.numpy() / float(img.max()), coils=8, accel=4, acs=12, sigma=0.005, seed=1)
    path = tmp_path_factory.mktemp("sanity") / "brain96.h5"
    write_raw(path, sim)
    return path


@pytest.fixture(scope="module")
def broken_prior(tmp_path_factory, repo):
    """The shipped prior with its output layer multiplied by 1000: loads fine, denoises into garbage."""
    from scoremri.model.checkpoint import load_model, save_model
    from scoremri.model.ncsnpp import net_config
    from scoremri.model.sde import VESDE

    net, card = load_model(repo / "model" / "weights" / "default.safetensors")
    sd = {k: v * 1000 if k.startswith("conv_out") else v for k, v in net.state_dict().items()}
    path = tmp_path_factory.mktemp("broken") / "broken.safetensors"
    save_model(sd, net_config(card["config"]), VESDE(**{k: v for k, v in card["sde"].items() if k != "type"}), path)
    return path


def test_replay_falls_back_on_a_broken_prior_not_on_the_shipped_one(brain_scan, broken_prior, tmp_path, caplog):
    gt = read_ground_truth(brain_scan)[0][0]
    ok = replay(brain_scan, tmp_path / "ok.h5", overrides={"sampler.steps": "6"}, progress=False)
    assert ok["report"]["fallbacks"] == []
    (s,) = ok["report"]["sanity"]
    assert s["noise_std"] == pytest.approx(1 / math.sqrt(2)) and 0.7 < s["residual_ratio"] < 1.3
    assert s["noise_source"] == "prewhitening"
    good = evaluate(read_images(tmp_path / "ok.h5")[1][0].data[0, 0], gt)["psnr_fg"]

    with caplog.at_level(logging.WARNING, logger="scoremri.gadget.core"):
        bad = replay(brain_scan, tmp_path / "bad.h5", overrides={"sampler.steps": "6", "model.path": str(broken_prior)},
                     progress=False)
    (fb,) = bad["report"]["fallbacks"]
    assert "sanity check: residual" in fb["reason"] and bad["report"]["methods"] == {"sense": 1}
    assert any(r.levelno == logging.WARNING and "sanity check" in r.getMessage() for r in caplog.records)
    (img,) = read_images(tmp_path / "bad.h5")[1]
    assert "fallback" in img.meta["GADGETRON_ImageComment"].lower()
    sense = evaluate(img.data[0, 0], gt)["psnr_fg"]

    off = replay(brain_scan, tmp_path / "off.h5", progress=False,
                 overrides={"sampler.steps": "6", "model.path": str(broken_prior), "sampler.sanity": "false"})
    assert off["report"]["fallbacks"] == [] and off["report"]["sanity"][0]["residual_ratio"] > 10
    garbage = evaluate(read_images(tmp_path / "off.h5")[1][0].data[0, 0], gt)["psnr_fg"]
    assert garbage < sense - 10 and sense < good + 1  # the fallback saved the slice; the shipped prior was fine
