"""Data consistency (recon/dc.py): projections leave measured samples equal to the data, gradient/CG steps
lower the residual, CG agrees with dense least squares."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from scoremri.recon.dc import DataConsistency, cg, linear_lambda
from scoremri.recon.fft import fft2c
from scoremri.recon.operators import SenseOp


def _problem(c: int = 4, n: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    maps = torch.randn(c, n, n, dtype=torch.complex64, generator=g)
    maps = maps / maps.abs().pow(2).sum(0).sqrt()  # sum_c |S_c|^2 = 1
    mask = torch.zeros(n, n)
    mask[:: 2] = 1
    mask[n // 2 - 2 : n // 2 + 2] = 1
    x = torch.randn(n, n, dtype=torch.complex64, generator=g)
    op = SenseOp(maps, mask)
    y = op.forward(x)
    return maps, mask, x, y, op


def _dense(op: SenseOp, n: int) -> np.ndarray:
    eye = torch.eye(n * n, dtype=torch.complex64).reshape(n * n, n, n)
    return op.forward(eye).reshape(n * n, -1).T.numpy()  # (C*n*n, n*n)


def test_cg_matches_dense_regularised_solve():
    maps, mask, x, y, op = _problem()
    n = x.shape[-1]
    a = _dense(op, n)
    lam = 0.05
    rhs = op.adjoint(y)
    want = np.linalg.solve(a.conj().T @ a + lam * np.eye(n * n), rhs.numpy().ravel()).reshape(n, n)
    got = cg(op.normal, rhs, torch.zeros_like(rhs), 200, lam=lam, tol=1e-7).numpy()
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-4


def test_cg_is_batched_per_image():
    maps, mask, x, y, op = _problem()
    rhs = torch.stack([op.adjoint(y), 3 * op.adjoint(y)])
    out = cg(op.normal, rhs, torch.zeros_like(rhs), 60, lam=0.01)
    assert torch.allclose(out[1], 3 * out[0], rtol=1e-3, atol=1e-4)


def test_replace_keeps_measured_samples_equal_to_data():
    n = 16
    maps = torch.ones(1, n, n, dtype=torch.complex64)
    _, mask, x, _, _ = _problem(c=1, n=n)
    y = mask * fft2c(x)[None]
    dc = DataConsistency(y, mask, maps, kind="replace")
    g = torch.Generator().manual_seed(1)
    z = torch.randn(3, n, n, dtype=torch.complex64, generator=g)
    out = dc(z)
    k = fft2c(out)
    m = mask.bool()
    assert torch.allclose(k[:, m], y[0][m].expand(3, -1), atol=1e-5)
    assert torch.allclose(k[:, ~m], fft2c(z)[:, ~m], atol=1e-5)  # unmeasured samples untouched
    assert dc.residual(out).max() < 1e-4


def test_replace_refuses_multicoil():
    maps, mask, _, y, _ = _problem(c=3)
    with pytest.raises(ValueError, match="single-coil"):
        DataConsistency(y, mask, maps, kind="replace")


def test_ssos_replaces_every_coils_kspace():
    maps, mask, x, y, _ = _problem(c=3)
    dc = DataConsistency(y, mask, maps, kind="ssos")
    z = torch.randn(2, 3, *x.shape, dtype=torch.complex64, generator=torch.Generator().manual_seed(2))
    out = dc(z)
    m = mask.bool()
    assert torch.allclose(fft2c(out)[..., m], y[..., m].expand(2, -1, -1), atol=1e-5)
    with pytest.raises(ValueError, match="coil images"):
        dc(z[:, 0])


def test_hybrid_sense_step_lowers_combined_residual_and_follows_schedule():
    maps, mask, x, y, op = _problem(c=4)
    z = torch.randn(1, 4, *x.shape, dtype=torch.complex64, generator=torch.Generator().manual_seed(3))
    ssos = DataConsistency(y, mask, maps, kind="ssos")(z)
    dc = DataConsistency(y, mask, maps, kind="hybrid", n_levels=100, every=50)
    res = lambda v: torch.linalg.vector_norm(op.forward(dc.combine(v)) - y)  # noqa: E731
    out = dc(z, level=0)
    assert res(out) < res(ssos)
    assert torch.allclose(dc(z, level=1), ssos)  # no SENSE step between multiples of `every`
    assert torch.allclose(dc(z, level=0, end_of_level=False), ssos)
    assert linear_lambda(0, 100) == pytest.approx(1.0) and linear_lambda(100, 100) == pytest.approx(0.2)
    assert linear_lambda(50, 100) == pytest.approx(0.6)


@pytest.mark.parametrize("kind", ["sense", "sense_grad"])
def test_sense_dc_lowers_residual(kind):
    maps, mask, x, y, op = _problem(c=4)
    z = torch.randn(2, *x.shape, dtype=torch.complex64, generator=torch.Generator().manual_seed(4))
    dc = DataConsistency(y, mask, maps, kind=kind, iters=5, n_levels=10)
    r0 = dc.residual(z)
    r1 = dc.residual(dc(z, level=0))
    assert (r1 < 0.9 * r0).all()


def test_sense_cg_converges_to_projection_onto_data():
    """From x0, CG on A^H A x = A^H y converges to x0 + A^+ (y - A x0): data matched, null part unchanged."""
    maps, mask, x, y, op = _problem(c=2)
    n = x.shape[-1]
    a = _dense(op, n)
    z = torch.randn(1, n, n, dtype=torch.complex64, generator=torch.Generator().manual_seed(5))
    out = DataConsistency(y, mask, maps, kind="sense", iters=300)(z)
    zz = z.numpy().ravel()
    want = zz + np.linalg.pinv(a, rcond=1e-6) @ (y.numpy().ravel() - a @ zz)
    assert np.linalg.norm(out.numpy().ravel() - want) / np.linalg.norm(want) < 1e-3


def test_bad_kind_and_shapes():
    maps, mask, _, y, _ = _problem(c=2)
    with pytest.raises(ValueError, match="not one of"):
        DataConsistency(y, mask, maps, kind="magic")
    with pytest.raises(ValueError, match="differ in shape"):
        DataConsistency(y[:1], mask, maps)


def test_cg_domain_normal_equals_sense_normal_odd_and_even_sizes():
    for shape in [(16, 16), (15, 12)]:
        g = torch.Generator().manual_seed(6)
        maps = torch.randn(3, *shape, dtype=torch.complex64, generator=g)
        mask = (torch.rand(*shape, generator=g) > 0.5).float()
        x = torch.randn(5, *shape, dtype=torch.complex64, generator=g)
        op = SenseOp(maps, mask)
        sn = SenseOp(maps, mask, chunk_bytes=1)  # chunks of one image: exercises the chunked path
        got = sn.from_cg(sn.normal_cg(sn.to_cg(x)))
        torch.testing.assert_close(got, op.adjoint(op.forward(x)), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(op.normal(x), op.adjoint(op.forward(x)), rtol=1e-4, atol=1e-5)


def test_proximal_sense_dc_solves_regularised_problem():
    """mu > 0: CG converges to argmin ||A x - y||^2 + mu ||x - x0||^2 (between x0 and the data fit)."""
    maps, mask, x, y, op = _problem(c=2)
    n = x.shape[-1]
    a = _dense(op, n)
    z = torch.randn(1, n, n, dtype=torch.complex64, generator=torch.Generator().manual_seed(7))
    mu = 0.3
    out = DataConsistency(y, mask, maps, kind="sense", iters=200, mu=mu)(z).numpy().ravel()
    zz = z.numpy().ravel()
    want = np.linalg.solve(a.conj().T @ a + mu * np.eye(n * n), a.conj().T @ y.numpy().ravel() + mu * zz)
    assert np.linalg.norm(out - want) / np.linalg.norm(want) < 1e-3


def test_combined_dc_zeroes_image_outside_the_map_support():
    maps, mask, x, y, op = _problem(c=2)
    maps = maps.clone()
    maps[:, :3] = 0  # ESPIRiT-style crop: no coil sees the first rows
    y = SenseOp(maps, mask).forward(x)
    z = torch.randn(2, *x.shape, dtype=torch.complex64, generator=torch.Generator().manual_seed(8))
    for kind in ("sense", "sense_grad"):
        out = DataConsistency(y, mask, maps, kind=kind, iters=3, n_levels=5)(z)
        assert out[:, :3].abs().max() == 0 and out[:, 3:].abs().min() > 0
