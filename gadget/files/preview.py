"""Magnitude PNG previews of ISMRMRD images, windowed at the 99.5th percentile."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

import ismrmrd
import numpy as np


def preview(data: np.ndarray, percentile: float = 99.5) -> np.ndarray:
    """Magnitude preview (ny, nx) uint8 of an image array (cha, z, y, x) or (y, x): RSS over channels, first
    z, window [0, percentile]."""
    a = np.asarray(data)
    if a.ndim == 4:
        a = np.sqrt(np.sum(np.abs(a[:, 0]) ** 2, axis=0))
    a = np.abs(a).astype(np.float64)
    if a.ndim != 2:
        raise ValueError(f"preview needs (cha, z, y, x) or (y, x), got shape {np.shape(data)}")
    a = np.nan_to_num(a)
    top = float(np.percentile(a, percentile)) if a.size else 0.0
    if top <= 0:
        top = float(a.max()) or 1.0
    return (np.clip(a / top, 0, 1) * 255 + 0.5).astype(np.uint8)


def write_png(directory: str | Path, images: Iterable[ismrmrd.Image], prefix: str = "image") -> list[Path]:
    """One magnitude PNG per image: ``<prefix>_s<series>_<index>.png`` (std maps land in their own series)."""
    from PIL import Image as PILImage

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for n, img in enumerate(images):
        series = int(img.image_series_index)
        index = int(img.image_index) or n + 1
        p = d / f"{prefix}_s{series}_{index:03d}.png"
        PILImage.fromarray(preview(img.data)).save(p)
        paths.append(p)
    return paths
