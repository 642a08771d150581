"""Reconstructed slices -> ISMRMRD images with the header rules every wing relies on (ARCHITECTURE.md,
"Images out"): geometry and counters of the slice's centre line, ``field_of_view`` = recon FOV,
``image_type`` 5 (complex) or 1 (magnitude, std maps), ``image_index`` from 1 per series, and meta
``GADGETRON_DataRole``, ``GADGETRON_ImageComment``, ``GADGETRON_SeqDescription``, ``GADGETRON_ImageNumber``.

The MetaContainer attributes MRD (FIRE / OpenRecon) sites read are set on every image too (harmless on the
Gadgetron path): ``DataRole``, ``ImageIndex``/``ImageSeriesIndex`` (the header's numbers), ``WindowCenter`` /
``WindowWidth`` (from the pixels sent), ``ImageRowDir``/``ImageColumnDir``, ``Keep_image_geometry``,
``ImageProcessingHistory``, ``ImageComments`` (the ImageComment) and, where a learned method made the image
(:func:`is_ai_generated`), ``SequenceDescriptionAdditional`` = ``SCOREMRI_AI`` and ``AIGenerated`` = ``1``
(``SCOREMRI`` / ``0`` otherwise).

Magnitude images (``output.magnitude``): :func:`magnitude_pixels` = |x| as float32, or as ushort counts the
way Gadgetron's ComplexToFloat -> AutoScale -> FloatToUShort chain makes them (per image: the 99th percentile
-> 2048, rounded, clamped to 0..4095), or with a fixed ``output.ushort_scale``.
"""
from __future__ import annotations

from typing import Any

import ismrmrd
import numpy as np

IMTYPE_MAGNITUDE = 1
IMTYPE_COMPLEX = 5
USHORT_MAX = 4095  # FloatToUShortGadget's clamp (12-bit scanner images)
AUTOSCALE_MAX = 2048.0  # AutoScaleGadget's max_value: the 99th percentile of each image goes here
AUTOSCALE_PERCENTILE = 99.0
WINDOW_PERCENTILE = 99.5  # window: 0 .. this percentile of the pixels sent


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


def is_ai_generated(method: str) -> bool:
    """True when the reconstruction method that actually made an image uses the learned prior (a SENSE
    fallback or a classical method is not AI-generated)."""
    from scoremri.recon.methods import needs_prior

    try:
        return bool(needs_prior(method))
    except Exception:  # an unknown name: not one of our learned methods
        return False


def magnitude_pixels(image: np.ndarray, kind: str, scale: float = 0.0) -> tuple[np.ndarray, float]:
    """(z, ny, nx) complex -> (magnitude pixels, counts per image unit).

    kind ``float``: |x| float32 (scale 1). ``ushort``: uint16 counts ``clip(rint(|x| * scale), 0, 4095)``;
    ``scale`` 0 = per image as AutoScaleGadget (the 99th percentile of |x| -> 2048; 1 for an all-zero image)."""
    mag = np.abs(image).astype(np.float32)
    if kind == "float":
        return mag, 1.0
    if kind != "ushort":
        raise ValueError(f"magnitude kind must be float or ushort, got {kind!r}")
    if scale <= 0:
        p = float(np.percentile(mag, AUTOSCALE_PERCENTILE)) if mag.size else 0.0
        scale = AUTOSCALE_MAX / p if p > 0 else 1.0
    counts = np.clip(np.rint(mag * np.float32(scale)), 0, USHORT_MAX).astype(np.uint16)
    return counts, float(scale)


def window(pixels: np.ndarray) -> tuple[float, float]:
    """(centre, width) of a display window from 0 to the 99.5th percentile of |pixels| (1 for an empty image)."""
    mag = np.abs(pixels)
    hi = float(np.percentile(mag, WINDOW_PERCENTILE)) if mag.size else 0.0
    if not hi > 0:
        hi = float(mag.max()) if mag.size and mag.max() > 0 else 1.0
    return hi / 2.0, hi


def _fmt(v: float) -> str:
    return f"{v:.6g}"


def make_image(array: np.ndarray, centre: Any, sampling: Any, series: int, index: int, image_type: int,
               comment: str, *, ai: bool = False, method: str = "", extra_meta: dict[str, str] | None = None
               ) -> ismrmrd.Image:
    """(z, ny, nx) complex64 (``image_type`` 5), float32 or uint16 (1) -> ismrmrd.Image with the geometry and
    counters of ``centre`` (the AcquisitionHeader of the line nearest the k-space centre) and the recon FOV of
    ``sampling`` (a Gadgetron SamplingDescription); ``index`` is the image_index within ``series``.
    ai: a learned method made it (labels); method: the method that made it (ImageProcessingHistory);
    extra_meta: further attributes (e.g. the ushort scale)."""
    if image_type == IMTYPE_COMPLEX:
        dtype = np.complex64
    else:
        dtype = np.uint16 if array.dtype == np.uint16 else np.float32
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
    wc, ww = window(data)
    img.meta = {
        "GADGETRON_DataRole": "Image",
        "GADGETRON_ImageComment": comment,
        "GADGETRON_SeqDescription": "_SCOREMRI_AI",
        "GADGETRON_ImageNumber": str(index),
        # what MRD (FIRE / OpenRecon) sites read
        "DataRole": "Image",
        "ImageIndex": str(index),
        "ImageSeriesIndex": str(series),
        "WindowCenter": _fmt(wc),
        "WindowWidth": _fmt(ww),
        "ImageRowDir": [f"{float(v):.18f}" for v in centre.read_dir],
        "ImageColumnDir": [f"{float(v):.18f}" for v in centre.phase_dir],
        "Keep_image_geometry": "1",
        "ImageProcessingHistory": ["SCOREMRI", method.upper()] if method else ["SCOREMRI"],
        "ImageComments": comment,
        "SequenceDescriptionAdditional": "SCOREMRI_AI" if ai else "SCOREMRI",
        "AIGenerated": "1" if ai else "0",
        **(extra_meta or {}),
    }
    return img


__all__ = ["IMTYPE_COMPLEX", "IMTYPE_MAGNITUDE", "image_comment", "is_ai_generated", "magnitude_pixels", "make_image",
           "scoremri_version", "window"]
