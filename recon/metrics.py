"""Image quality against a ground truth, the one protocol of ARCHITECTURE.md ("Conventions", evaluation protocol).

1. magnitudes ``|x|``, ``|gt|``; one least-squares real scalar ``a = <|x|, |gt|> / <|x|, |x|>`` applied to |x|
   (so any global scale or phase of the reconstruction is irrelevant);
2. both divided by ``max |gt|``;
3. PSNR (data range 1), SSIM (scikit-image ``structural_similarity``, data_range=1, default 7x7 window),
   NMSE ``||x - gt||^2 / ||gt||^2``; on the full image and inside a foreground mask (SSIM there is the mean of the
   SSIM map over the mask).
"""
from __future__ import annotations

from typing import Any

import numpy as np


def _np(a: Any) -> np.ndarray:
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    return np.asarray(a)


def foreground_mask(gt: Any, threshold: float = 0.1, closing: int = 5) -> np.ndarray:
    """Object support (ny, nx) bool: |gt| > threshold * max|gt|, binary closing with a ``closing`` x ``closing``
    square, holes filled, then only the largest connected component kept."""
    from scipy import ndimage

    g = np.abs(_np(gt))
    if g.ndim != 2:
        raise ValueError(f"ground truth must be (ny, nx), got shape {g.shape}")
    m = g > threshold * g.max()
    m = ndimage.binary_closing(m, structure=np.ones((closing, closing)), border_value=0)
    m = ndimage.binary_fill_holes(m)
    lab, n = ndimage.label(m)
    if n > 1:
        sizes = ndimage.sum(m, lab, index=np.arange(1, n + 1))
        m = lab == (1 + int(np.argmax(sizes)))
    return m


def scale_to(x: Any, gt: Any) -> tuple[np.ndarray, np.ndarray, float]:
    """(|x| * a / max|gt|, |gt| / max|gt|, a) with the least-squares scalar a = <|x|,|gt|> / <|x|,|x|>."""
    xa = np.abs(_np(x)).astype(np.float64)
    ga = np.abs(_np(gt)).astype(np.float64)
    if xa.shape != ga.shape:
        raise ValueError(f"image shape {xa.shape} does not match ground truth {ga.shape}")
    if not np.isfinite(xa).all():
        raise ValueError("image contains NaN or Inf values")
    gmax = ga.max()
    if gmax <= 0:
        raise ValueError("ground truth is all zeros")
    den = float((xa * xa).sum())
    a = float((xa * ga).sum()) / den if den > 0 else 0.0
    return xa * a / gmax, ga / gmax, a


def psnr(x: np.ndarray, gt: np.ndarray, mask: np.ndarray | None = None) -> float:
    """PSNR in dB with data range 1 of already scaled magnitudes (inf when identical)."""
    d = (x - gt) ** 2
    mse = float(d[mask].mean() if mask is not None else d.mean())
    return float("inf") if mse == 0 else float(10 * np.log10(1.0 / mse))


def nmse(x: np.ndarray, gt: np.ndarray, mask: np.ndarray | None = None) -> float:
    """||x - gt||^2 / ||gt||^2 (inside mask when given)."""
    if mask is not None:
        x, gt = x[mask], gt[mask]
    return float(((x - gt) ** 2).sum() / max((gt**2).sum(), 1e-30))


def ssim(x: np.ndarray, gt: np.ndarray, mask: np.ndarray | None = None) -> float:
    """scikit-image SSIM, data_range=1; inside mask = mean of the SSIM map over the mask."""
    from skimage.metrics import structural_similarity

    if mask is None:
        return float(structural_similarity(gt, x, data_range=1.0))
    _, smap = structural_similarity(gt, x, data_range=1.0, full=True)
    return float(smap[mask].mean())


def evaluate(x: Any, gt: Any, fg: np.ndarray | None = None) -> dict[str, float]:
    """All metrics of x (ny, nx) real/complex against gt (ny, nx): psnr, ssim, nmse (full image), psnr_fg, ssim_fg,
    nmse_fg (inside ``fg``, default ``foreground_mask(gt)``) and the fitted scale."""
    xs, gs, a = scale_to(x, gt)
    fg = foreground_mask(gt) if fg is None else np.asarray(fg, dtype=bool)
    if fg.shape != gs.shape:
        raise ValueError(f"foreground mask shape {fg.shape} does not match ground truth {gs.shape}")
    return {
        "psnr": psnr(xs, gs),
        "ssim": ssim(xs, gs),
        "nmse": nmse(xs, gs),
        "psnr_fg": psnr(xs, gs, fg),
        "ssim_fg": ssim(xs, gs, fg),
        "nmse_fg": nmse(xs, gs, fg),
        "scale": a,
    }
