"""Reconstructed slices -> ISMRMRD images with the header rules every wing relies on (ARCHITECTURE.md,
"Images out"): geometry and counters of the slice's centre line, ``field_of_view`` = recon FOV,
``image_type`` 5 (complex) or 1 (magnitude, std maps), ``image_index`` from 1 per series, and meta
``GADGETRON_DataRole``, ``GADGETRON_ImageComment``, ``GADGETRON_SeqDescription``, ``GADGETRON_ImageNumber``.
"""
from __future__ import annotations

from typing import Any

import ismrmrd
import numpy as np

IMTYPE_MAGNITUDE = 1
IMTYPE_COMPLEX = 5


def scoremri_version() -> str:
    """Installed scoremri version ('unknown' when not installed)."""
    try:
        from importlib.metadata import version

        return version("scoremri")
    except Exception:  # pragma: no cover - not installed
        return "unknown"


def image_comment(method: str, requested: str, nfe: int, model_sha256: str, version: str,
                  fallback: str | None) -> str:
    """The ImageComment of one slice: label, sampler actually used, NFE, model hash prefix, version, and the
    fallback reason when ``method`` differs from the ``requested`` one."""
    parts = [
        "AI-generated research image (scoremri, not for diagnosis)",
        f"sampler {method}",
        f"NFE {nfe}",
        f"model {model_sha256[:12] if model_sha256 else 'none'}",
        f"scoremri {version}",
    ]
    if fallback:
        parts.append(f"FALLBACK to SENSE ({requested} requested): {fallback}")
    return " | ".join(parts)


def make_image(array: np.ndarray, centre: Any, sampling: Any, series: int, index: int, image_type: int,
               comment: str) -> ismrmrd.Image:
    """(z, ny, nx) complex64 (``image_type`` 5) or float32 (1) -> ismrmrd.Image with the geometry and counters
    of ``centre`` (the AcquisitionHeader of the line nearest the k-space centre) and the recon FOV of
    ``sampling`` (a Gadgetron SamplingDescription); ``index`` is the image_index within ``series``."""
    dtype = np.complex64 if image_type == IMTYPE_COMPLEX else np.float32
    data = np.ascontiguousarray(array[None], dtype=dtype)  # (cha=1, z, y, x)
    img = ismrmrd.Image(head=ismrmrd.ImageHeader(), data=data)
    head = img.getHead()
    for f in ("position", "read_dir", "phase_dir", "slice_dir", "patient_table_position",
              "physiology_time_stamp", "user_int", "user_float"):
        setattr(head, f, getattr(centre, f))
    head.version = 1
    head.measurement_uid = centre.measurement_uid
    head.acquisition_time_stamp = centre.acquisition_time_stamp
    for f in ("average", "slice", "contrast", "phase", "repetition", "set"):
        setattr(head, f, getattr(centre.idx, f))
    head.field_of_view[:] = [float(v) for v in sampling.recon_FOV]
    head.image_type = image_type
    head.image_index = index
    head.image_series_index = series
    img.setHead(head)
    img.data[:] = data  # setHead may have resized; restore the exact pixels
    img.meta = {
        "GADGETRON_DataRole": "Image",
        "GADGETRON_ImageComment": comment,
        "GADGETRON_SeqDescription": "_SCOREMRI_AI",
        "GADGETRON_ImageNumber": str(index),
    }
    return img


__all__ = ["IMTYPE_COMPLEX", "IMTYPE_MAGNITUDE", "image_comment", "make_image", "scoremri_version"]
