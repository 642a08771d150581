"""Batched slices (reconstruct_batch), network windows, the per-slice deadline and the 1-D normal operator.

The contract: a slice's image does not depend on the batch it ran in. Slices here differ in mask,
acceleration row, scale, coil-map support (so network windows differ in size) and shape; batched and
one-by-one images must agree to a max relative difference of 1e-4 (on CPU they are bit-identical today).
"""
from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from scoremri.model.backends import TorchScoreModel
from scoremri.model.ncsnpp import build_network
from scoremri.model.priors import GaussianPrior
from scoremri.recon.api import ReconError, SliceDeadlineExceeded, reconstruct, reconstruct_batch
from scoremri.recon.config import load_config
from scoremri.recon.dc import DataConsistency
from scoremri.recon.masks import make_mask
from scoremri.recon.operators import SenseOp
from scoremri.recon.samplers.common import PriorRunner, support_window
from scoremri.recon.simulation import birdcage_maps, simulate_kspace


def _disk(shape: tuple[int, int], radius: float, centre: tuple[float, float] | None = None) -> np.ndarray:
    ny, nx = shape
    cy, cx = centre or (ny / 2, nx / 2)
    y, x = np.mgrid[:ny, :nx]
    return (y - cy) ** 2 + (x - cx) ** 2 <= radius**2


def _slice(shape, radius, accel, seed, gain=1.0, coils=4):
    """A disk object with a texture, coil maps zero outside its support, k-space at ``accel``."""
    rng = np.random.default_rng(seed)
    sup = _disk(shape, radius)
    img = sup * (0.6 + 0.3 * rng.random(shape)) * gain
    maps = birdcage_maps(coils, shape) * sup[None]
    maps = maps / np.maximum(np.sqrt((np.abs(maps) ** 2).sum(0)), 1e-12)
    maps = (maps * sup[None]).astype(np.complex64)
    mask = make_mask("random", shape, accel, acs=12, seed=seed)
    k = simulate_kspace(img, maps, mask, 1e-3 * gain, rng).astype(np.complex64)
    return k, mask, maps


@pytest.fixture(scope="module")
def tiny_net():
    torch.manual_seed(0)
    net = build_network("tiny").eval()
    for p in net.parameters():  # non-trivial output: perturb the zero-initialised last layers
        p.data.add_(0.01 * torch.randn_like(p))
    return TorchScoreModel(net, {"sde": {"sigma_min": 0.01, "sigma_max": 378.0}, "size": "tiny"})


@pytest.fixture(scope="module")
def slices():
    """Four slices: two accelerations (x3, x6: two by_accel rows), scales 1 and 5, supports of three sizes,
    and one of another shape."""
    return [
        _slice((48, 48), 14, 3.0, 1),
        _slice((48, 48), 19, 3.0, 2, gain=5.0),
        _slice((48, 48), 10, 6.0, 3),
        _slice((40, 48), 12, 3.0, 4),
    ]


def _max_rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("preset, over", [
    ("fast", {"sampler.steps": 5, "sampler.window_margin": 4}),
    ("uncertainty", {"sampler.steps": 4, "sampler.samples": 3, "sampler.window_margin": 4}),
    ("paper", {"sampler.steps": 4, "sampler.dc_iters": 2}),
    ("sense", {}),
])
def test_batched_equals_one_by_one(slices, tiny_net, preset, over):
    rows = "[{max_accel: 3.5}, {dc_iters: 3, snr: 0.12}]"  # the x6 slice (true acceleration ~4) takes the second row
    cfg = load_config(preset, {**over, "sampler.by_accel": rows} if preset != "sense" else over)
    ks, ms, mps = zip(*slices)
    assert [round(float(m.size / m.sum()), 1) for m in ms] == [3.0, 3.0, 4.0, 3.1]
    seeds = [11, 12, 13, 14]
    one = [reconstruct(k, m, cfg, maps=mp, seed=s, prior=tiny_net, device="cpu")
           for k, m, mp, s in zip(ks, ms, mps, seeds)]
    batch = reconstruct_batch(ks, ms, cfg, maps=mps, seeds=seeds, prior=tiny_net, device="cpu")
    for a, b in zip(batch, one):
        assert a.image.shape == b.image.shape
        assert _max_rel(a.image, b.image) <= 1e-4
        if b.std is not None:
            assert _max_rel(a.std, b.std) <= 1e-4
    # slices 0, 1 share shape and by_accel row: one run of 2; the x6 slice and the 40x48 slice run alone
    assert [r.report["batch"] for r in batch] == ([3, 3, 3, 1] if preset == "sense" else [2, 2, 1, 1])
    if preset == "fast":
        assert batch[0].report["window"] != "full" and batch[0].report["scale"] != batch[1].report["scale"]
    for r in batch:
        assert r.report["seconds"] == pytest.approx(r.report["batch_seconds"] / r.report["batch"])
        assert sum(r.report["stages"].values()) == pytest.approx(r.report["seconds"], rel=1e-6)
        if preset != "sense":
            assert r.report["stages"]["network"] > 0 and r.report["stages"]["dc"] > 0


def test_batch_seeds_and_errors_name_the_slice(slices, tiny_net):
    cfg = load_config("fast", {"sampler.steps": 3})
    (k, m, mp), = slices[:1]
    a, b = reconstruct_batch([k, k], [m, m], cfg, maps=[mp, mp], seeds=[1, 2], prior=tiny_net, device="cpu")
    assert _max_rel(a.image, b.image) > 1e-4  # different seeds, different noise
    bad = k.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ReconError, match="slice 1 of the batch: kspace contains NaN"):
        reconstruct_batch([k, bad], [m, m], cfg, maps=[mp, mp], prior=tiny_net, device="cpu")
    with pytest.raises(ReconError, match="2 k-space slices but 1 maps"):
        reconstruct_batch([k, k], [m, m], cfg, maps=[mp], prior=tiny_net, device="cpu")


def test_support_window_contains_the_support_and_fits_the_network():
    maps = torch.zeros(2, 64, 80, dtype=torch.complex64)
    maps[:, 20:31, 5:40] = 1
    y0, y1, x0, x1 = support_window(maps, margin=3, multiple=8)
    assert y0 <= 20 - 3 and y1 >= 31 + 3 and x0 <= 0 + 5 and x1 >= 40 + 3
    assert (y1 - y0) % 8 == 0 and (x1 - x0) % 8 == 0 and 0 <= y0 and y1 <= 64 and 0 <= x0 and x1 <= 80
    assert support_window(torch.ones(2, 16, 16, dtype=torch.complex64), margin=2, multiple=4) is None


def test_windowed_runner_asks_the_prior_inside_windows_only():
    """Inside each window the prior's output; outside, a zero background: denoise 0, score -x / sigma^2.
    Slices with windows of one size share a network batch."""

    class Recording(GaussianPrior):
        def __init__(self) -> None:
            super().__init__(0.3, 0.2)
            self.shapes: list[tuple[int, ...]] = []

        def score(self, x, sigma):
            self.shapes.append(tuple(x.shape))
            return super().score(x, sigma)

    prior = Recording()
    wins = [(0, 8, 4, 12), (8, 16, 0, 8), (2, 14, 2, 14)]
    runner = PriorRunner(prior, 0, windows=wins)
    z = torch.randn(3, 2, 16, 16, dtype=torch.complex64)
    s = 0.7
    for fn in ("denoise", "score"):
        prior.shapes.clear()
        out = runner.complex(fn, z, s)
        # sizes 8x8 (slices 0, 1: 2 slices x 2 samples x re/im = 8 images) and 12x12 (1 x 2 x 2 = 4)
        assert sorted(prior.shapes) == [(4, 1, 12, 12), (8, 1, 8, 8)]
        for i, (y0, y1, x0, x1) in enumerate(wins):
            crop = z[i, :, y0:y1, x0:x1]
            flat = crop.reshape(-1, 1, y1 - y0, x1 - x0)
            ref = getattr(GaussianPrior(0.3, 0.2), fn)
            sig = torch.full((flat.shape[0],), s)
            want = torch.complex(ref(flat.real, sig), ref(flat.imag, sig))
            torch.testing.assert_close(out[i, :, y0:y1, x0:x1], want.reshape(crop.shape))
            outside = torch.ones(16, 16, dtype=torch.bool)
            outside[y0:y1, x0:x1] = False
            bg = torch.zeros_like(z[i]) if fn == "denoise" else -z[i] / s**2
            torch.testing.assert_close(out[i][:, outside], bg[:, outside])
    assert runner.calls == 2


class _SlowPrior(GaussianPrior):
    """A Gaussian prior whose every network call takes ``delay`` seconds."""

    def __init__(self, delay: float) -> None:
        super().__init__(0.5, 0.1, sigma_min=0.005, sigma_max=20.0)
        self.delay = delay
        self.calls = 0

    def denoise(self, x, sigma):
        self.calls += 1
        time.sleep(self.delay)
        return super().denoise(x, sigma)


def test_slice_deadline_stops_the_sampler_between_network_calls(slices):
    k, m, mp = slices[0]
    cfg = load_config("fast", {"sampler.steps": 40, "sampler.slice_deadline_s": 0.25, "sampler.batch": 100})
    prior = _SlowPrior(0.05)
    t0 = time.monotonic()
    with pytest.raises(SliceDeadlineExceeded, match=r"slice_deadline_s exceeded: .* > 0.25 s") as e:
        reconstruct(k, m, cfg, maps=mp, prior=prior, device="cpu")
    assert time.monotonic() - t0 < 0.25 + 0.05 + 0.5  # stopped at the first check past the deadline
    assert 2 <= prior.calls < 40 and e.value.calls == prior.calls and e.value.slices == 1
    # a batch of 3 slices gets 3 x the deadline
    prior = _SlowPrior(0.05)
    with pytest.raises(SliceDeadlineExceeded, match=r"0.25 s per slice x 3 slices = 0.75 s") as e:
        reconstruct_batch([k] * 3, [m] * 3, cfg, maps=[mp] * 3, prior=prior, device="cpu")
    assert e.value.slices == 3 and prior.calls > 10
    # no deadline: all 40 levels, one call each (all K samples' parts in one batch)
    prior = _SlowPrior(0.0)
    reconstruct(k, m, load_config("fast", {"sampler.steps": 40, "sampler.batch": 100}), maps=mp, prior=prior,
                device="cpu")
    assert prior.calls == 40


@pytest.mark.parametrize("kind", ["rows", "cols", "2d"])
def test_normal_operator_1d_path_equals_2d_and_is_self_adjoint(kind):
    g = torch.Generator().manual_seed(0)
    c, ny, nx = 3, 24, 20
    maps = torch.randn(c, ny, nx, dtype=torch.complex64, generator=g)
    mask = torch.zeros(ny, nx)
    if kind == "rows":
        mask[::3] = 1
    elif kind == "cols":
        mask[:, ::3] = 1
    else:
        mask = (torch.rand(ny, nx, generator=g) > 0.6).float()
    op = SenseOp(maps, mask)
    assert op.axis == {"rows": -2, "cols": -1, "2d": None}[kind]
    x = torch.randn(5, ny, nx, dtype=torch.complex64, generator=g)
    ref = op.adjoint(op.forward(x))
    torch.testing.assert_close(op.normal(x), ref, rtol=1e-5, atol=1e-5)
    y = torch.randn(5, ny, nx, dtype=torch.complex64, generator=g)
    lhs = torch.vdot(op.normal(x).flatten(), y.flatten())
    rhs = torch.vdot(x.flatten(), op.normal(y).flatten())
    assert abs(lhs - rhs) < 1e-3 * abs(lhs)


def test_batched_dc_and_chunked_normal_equal_per_slice():
    g = torch.Generator().manual_seed(1)
    s, c, n = 3, 2, 16
    maps = torch.randn(s, c, n, n, dtype=torch.complex64, generator=g)
    masks = torch.stack([(torch.rand(n, 1, generator=g) > 0.5).float().expand(n, n) for _ in range(s)])
    y = torch.randn(s, c, n, n, dtype=torch.complex64, generator=g) * masks[:, None]
    x = torch.randn(s, 4, n, n, dtype=torch.complex64, generator=g)
    batched = DataConsistency(y, masks, maps, kind="sense", iters=4, mu=0.3)
    batched.op.chunk_bytes = 1  # one slice per chunk
    out = batched(x)
    for i in range(s):
        single = DataConsistency(y[i], masks[i], maps[i], kind="sense", iters=4, mu=0.3)(x[i])
        torch.testing.assert_close(out[i], single, rtol=1e-5, atol=1e-6)
    assert batched.residual(out).shape == (s, 4)
