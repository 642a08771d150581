"""Coil sensitivities from the calibration (ACS) region: ESPIRiT (Uecker et al. 2014) and Walsh's method.

torch throughout, so it runs wherever the k-space lives (CPU or CUDA).

ESPIRiT as in BART ``ecalib`` (src/calib/calib.c, calmat.c) and sigpy ``EspiritCalib``:
1. calibration matrix: all ``k x k`` patches of the ACS block (C, ky_c, kx_c) as rows (Hankel structure);
2. SVD; keep the right singular vectors whose singular value exceeds ``threshold * s_max`` (the kernels);
3. image-space covariance ``G(x) = k^-2 sum_j a_j(x) a_j(x)^H`` with ``a_j`` the inverse FFT of kernel j. G is a
   trigonometric polynomial of degree < 2k, so like BART (calone/caltwo, ``sinc_zeropad``) it is evaluated
   exactly on a (2k x 2k) grid and interpolated to the image size by zero-padding its k-space;
4. per pixel, the top eigenvector of G (``torch.linalg.eigh``); pixels whose top eigenvalue is <= ``crop`` are
   zeroed (BART's hard crop, ``crop_thresh_function``);
5. phase fixed relative to the first principal component of the calibration data (BART ``rotphase``/
   ``fixphase2``): the virtual coil u^H S(x) is real and positive;
6. unit norm per pixel, i.e. sum_c |S_c|^2 = 1 where not cropped.

Walsh (adaptive combine, Walsh et al. 2000): low-resolution coil images from the ACS (Hann-windowed,
zero-padded), smoothed per-pixel coil covariance (box of ``walsh_window`` pixels), top eigenvector, same phase
and norm conventions. Used when the ACS is too small for ESPIRiT (``method: auto`` and fewer than
``min_acs`` lines).
"""
from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .errors import ReconError
from .config import CoilConfig
from .fft import fft2c, ifft2c
from .masks import find_acs, find_acs_box

log = logging.getLogger(__name__)

NO_CALIB = "no calibration data: no separate calibration lines and no fully sampled k-space centre"


def _t(a: Any, dtype: torch.dtype | None = None) -> torch.Tensor:
    t = a if isinstance(a, torch.Tensor) else torch.as_tensor(np.asarray(a))
    return t if dtype is None else t.to(dtype)


def _centre_window(n: int, size: int, lo: int = 0, hi: int | None = None) -> slice:
    """A window of at most ``size`` indices centred at n//2, clipped to [lo, hi)."""
    hi = n if hi is None else hi
    start = max(lo, n // 2 - size // 2)
    stop = min(hi, start + size)
    return slice(start, stop)


def extract_acs(
    kspace: torch.Tensor | np.ndarray,
    mask: torch.Tensor | np.ndarray,
    calib: torch.Tensor | np.ndarray | None = None,
    max_size: int = 24,
) -> torch.Tensor:
    """Calibration block (C, ky_c, kx_c), at most ``max_size`` in each direction, centred on the k-space centre.

    From the separate ``calib`` lines (C, ky_c, kx) when given, else from the fully sampled centre of ``kspace``
    (C, ky, kx) according to ``mask`` (ky, kx): whole fully sampled lines (``find_acs``), or for 2-D patterns the
    fully sampled centre box (``find_acs_box``). Raises ReconError when there is neither.
    """
    if calib is not None:
        c = _t(calib)
        if c.dim() != 3 or c.shape[-2] < 1:
            raise ReconError(f"calib must be (C, ky_c, kx), got shape {tuple(c.shape)}")
        ny, nx = c.shape[-2:]
        return c[:, _centre_window(ny, max_size), _centre_window(nx, max_size)]
    k = _t(kspace)
    m = _t(mask).to(torch.bool).cpu().numpy()
    ny, nx = m.shape
    start, stop = find_acs(m)
    if stop - start >= 2:
        return k[:, _centre_window(ny, max_size, start, stop), _centre_window(nx, max_size)]
    y0, y1, x0, x1 = find_acs_box(m)
    if y1 - y0 >= 2 and x1 - x0 >= 2:
        return k[:, _centre_window(ny, max_size, y0, y1), _centre_window(nx, max_size, x0, x1)]
    raise ReconError(NO_CALIB)


def _principal_coil(acs: torch.Tensor) -> torch.Tensor:
    """First principal component (C,) of the calibration data (BART scc rotation)."""
    d = acs.reshape(acs.shape[0], -1)
    u, _, _ = torch.linalg.svd(d @ d.conj().T)
    return u[:, 0]


def _fix_phase_and_norm(maps: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """maps (C, ny, nx): make u^H S real positive per pixel and normalise sum|S|^2 = 1 (zeros stay zero)."""
    p = torch.einsum("c,cyx->yx", ref.conj(), maps)
    ph = torch.where(p.abs() > 0, p.conj() / p.abs().clamp_min(1e-30), torch.ones_like(p))
    maps = maps * ph
    nrm = maps.abs().pow(2).sum(0).sqrt()
    return torch.where(nrm > 0, maps / nrm.clamp_min(1e-30), torch.zeros_like(maps))


def _top_eig(cov: torch.Tensor, chunk: int = 65536) -> tuple[torch.Tensor, torch.Tensor]:
    """cov (P, C, C) Hermitian -> top eigenvalue (P,), eigenvector (P, C). Chunked to bound memory."""
    vals, vecs = [], []
    for i in range(0, cov.shape[0], chunk):
        w, v = torch.linalg.eigh(cov[i : i + chunk])
        vals.append(w[:, -1])
        vecs.append(v[:, :, -1])
    return torch.cat(vals), torch.cat(vecs)


def espirit_maps(
    acs: torch.Tensor,
    shape: tuple[int, int],
    kernel: int = 6,
    threshold: float = 0.02,
    crop: float = 0.95,
    return_eigenvalues: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """ESPIRiT maps (C, ny, nx) complex64 from the calibration block acs (C, ky_c, kx_c) (see module doc).

    threshold: singular values kept above threshold * s_max (sigpy's convention). BART ``ecalib -t t`` keeps
    s / s_max > sqrt(t) (calib.c ``number_of_kernels``), so BART's -t t equals threshold = sqrt(t) here.
    crop: pixels with top eigenvalue <= crop are 0 (eigenvalues are 1 in the signal region, as BART's).
    """
    acs = _t(acs).to(torch.complex64)
    C, cy, cx = acs.shape
    if cy < kernel or cx < kernel:
        raise ReconError(f"calibration region {cy}x{cx} is smaller than the ESPIRiT kernel {kernel}")
    ny, nx = int(shape[0]), int(shape[1])
    dev = acs.device
    # 1. calibration matrix (patches, C*k*k)
    pr = torch.view_as_real(acs).permute(3, 0, 1, 2).reshape(2 * C, 1, cy, cx)  # real/imag x coils
    blocks = F.unfold(pr.reshape(1, 2 * C, cy, cx), kernel_size=kernel)  # (1, 2C*k*k, P)
    blocks = blocks.reshape(2, C * kernel * kernel, -1)
    A = torch.complex(blocks[0], blocks[1]).T  # (P, C*k*k), column index = (c, dy, dx)
    # 2. SVD via the Gram matrix (C*k*k square, small)
    _, s, vh = torch.linalg.svd(A, full_matrices=False)
    keep = s > threshold * s[0]
    kernels = vh[keep].reshape(-1, C, kernel, kernel)  # (nk, C, k, k)
    log.debug("espirit: %d of %d kernels kept (threshold %.4g)", kernels.shape[0], s.numel(), threshold)
    # 3. image-space covariance on a (M x M) grid, M = 2k (exact: degree < 2k)
    M = 2 * kernel
    pad = torch.zeros(kernels.shape[0], C, M, M, dtype=torch.complex64, device=dev)
    o = M // 2 - kernel // 2
    pad[:, :, o : o + kernel, o : o + kernel] = kernels
    a = ifft2c(pad)  # (nk, C, M, M), orthonormal: |a|^2 scaled by 1/M^2
    G = torch.einsum("jcxy,jdxy->cdxy", a, a.conj()) * (M * M / (kernel * kernel))  # (C, C, M, M)
    # interpolate to (ny, nx): zero-pad the (band-limited) k-space, keep values (scale sqrt(ny*nx)/M)
    Gk = fft2c(G)
    big = torch.zeros(C, C, ny, nx, dtype=torch.complex64, device=dev)
    oy, ox = ny // 2 - M // 2, nx // 2 - M // 2
    if oy < 0 or ox < 0:
        raise ReconError(f"image {ny}x{nx} is smaller than the ESPIRiT covariance grid {M}x{M}")
    big[:, :, oy : oy + M, ox : ox + M] = Gk
    del G, Gk
    Gbig = ifft2c(big) * (float(np.sqrt(ny * nx)) / M)
    del big
    cov = Gbig.permute(2, 3, 0, 1).reshape(ny * nx, C, C)
    cov = 0.5 * (cov + cov.conj().transpose(-1, -2))
    # 4. per-pixel top eigenvector, crop
    vals, vecs = _top_eig(cov)
    del cov, Gbig
    maps = vecs.T.reshape(C, ny, nx)  # top eigenvector of cov[c, d] = sum_j a_jc conj(a_jd): proportional to S
    vals = vals.reshape(ny, nx)
    maps = maps * (vals > crop)
    maps = _fix_phase_and_norm(maps, _principal_coil(acs))
    if return_eigenvalues:
        return maps, vals
    return maps


def walsh_maps(acs: torch.Tensor, shape: tuple[int, int], window: int = 7) -> torch.Tensor:
    """Walsh adaptive-combine maps (C, ny, nx) complex64 from the calibration block acs (C, ky_c, kx_c).

    Low-resolution coil images (Hann-windowed ACS zero-padded to ``shape``), per-pixel covariance smoothed over
    ``window x window`` pixels, top eigenvector; phase relative to the first principal coil; unit norm.
    Pixels with no signal get their maps from the smoothed covariance anyway (no crop).
    """
    acs = _t(acs).to(torch.complex64)
    C, cy, cx = acs.shape
    ny, nx = int(shape[0]), int(shape[1])
    dev = acs.device
    wy = torch.hann_window(cy + 2, periodic=False, device=dev)[1:-1]
    wx = torch.hann_window(cx + 2, periodic=False, device=dev)[1:-1]
    k = torch.zeros(C, ny, nx, dtype=torch.complex64, device=dev)
    oy, ox = ny // 2 - cy // 2, nx // 2 - cx // 2
    k[:, oy : oy + cy, ox : ox + cx] = acs * (wy[:, None] * wx[None, :])
    img = ifft2c(k)  # (C, ny, nx)
    R = torch.einsum("cyx,dyx->cdyx", img, img.conj()).reshape(C * C, ny, nx)
    Rr = torch.view_as_real(R).permute(0, 3, 1, 2).reshape(1, 2 * C * C, ny, nx)
    Rr = F.avg_pool2d(Rr, window, stride=1, padding=window // 2, count_include_pad=False)
    Rr = Rr.reshape(C * C, 2, ny, nx).permute(0, 2, 3, 1).contiguous()
    R = torch.view_as_complex(Rr).reshape(C, C, ny, nx)
    cov = R.permute(2, 3, 0, 1).reshape(ny * nx, C, C)
    _, vecs = _top_eig(cov)
    maps = vecs.T.reshape(C, ny, nx)
    return _fix_phase_and_norm(maps, _principal_coil(acs))


def estimate_maps(
    kspace: torch.Tensor | np.ndarray,
    mask: torch.Tensor | np.ndarray,
    cfg: CoilConfig,
    calib: torch.Tensor | np.ndarray | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Coil maps (C, ny, nx) complex64 on kspace's device, and a report {coil_method, acs_lines, calib_shape}.

    kspace (C, ky, kx); mask (ky, kx); calib optional (C, ky_c, kx). ``cfg.method``: espirit | walsh | auto
    (ESPIRiT when the calibration block has >= ``cfg.min_acs`` lines and is at least the kernel size, else
    Walsh).
    """
    k = _t(kspace)
    if k.dim() != 3:
        raise ReconError(f"kspace must be (C, ky, kx), got shape {tuple(k.shape)}")
    acs = extract_acs(k, mask, calib, cfg.calib_size).to(k.device, torch.complex64)
    lines = int(acs.shape[-2])
    method = cfg.method
    if method == "auto":
        ok = lines >= cfg.min_acs and min(acs.shape[-2:]) >= cfg.kernel
        method = "espirit" if ok else "walsh"
    shape = (int(k.shape[-2]), int(k.shape[-1]))
    if method == "espirit":
        maps = espirit_maps(acs, shape, cfg.kernel, cfg.threshold, cfg.crop)
    elif method == "walsh":
        maps = walsh_maps(acs, shape)
    else:
        raise ReconError(f"unknown coil method '{method}'")
    if not bool((maps.abs().sum(0) > 0).any()):
        raise ReconError(f"coil estimation ({method}) cropped every pixel: lower coils.crop ({cfg.crop})")
    log.info("coil maps: %s from %d calibration lines (%s)", method, lines, "calib" if calib is not None else "ACS")
    return maps, {"coil_method": method, "acs_lines": lines, "calib_shape": tuple(int(s) for s in acs.shape[-2:])}
