"""Reconstructed slices -> ISMRMRD images with the header rules every wing relies on (ARCHITECTURE.md,
"Images out"): geometry and counters of the slice's centre line, ``field_of_view`` = recon FOV,
``image_type`` 5 (complex) or 1 (magnitude, std maps), ``image_index`` from 1 per series, and meta
``GADGETRON_DataRole``, ``GADGETRON_ImageComment``, ``GADGETRON_SeqDescription``, ``GADGETRON_ImageNumber``.

Labels live here and nowhere else: an image is labelled AI-generated only when the method that actually made
it needs a learned prior (:func:`is_ai_generated`, from :func:`scoremri.recon.methods.needs_prior`); a SENSE
fallback of a learned preset, ``sense`` and ``zero_filled`` images are labelled as classical research
reconstructions (ImageComment, ``GADGETRON_SeqDescription`` ``_SCOREMRI_AI`` vs ``_SCOREMRI_SENSE``,
``_SCOREMRI_SENSE_FALLBACK``, ...). The facts travel with the image as meta (``AIGenerated`` and the
``SCOREMRI_*`` attributes: method used, requested, NFE, role), so every writer (ISMRMRD file, DICOM, NIfTI,
PNG, the wire) reads the same facts back with :func:`image_label`.

The MetaContainer attributes MRD (FIRE / OpenRecon) sites read are set on every image too (harmless on the
Gadgetron path): ``DataRole``, ``ImageIndex``/``ImageSeriesIndex`` (the header's numbers), ``WindowCenter`` /
``WindowWidth`` (from the pixels sent), ``ImageRowDir``/``ImageColumnDir``, ``Keep_image_geometry``,
``ImageProcessingHistory``, ``ImageComments`` (the ImageComment) and, where a learned method made the image,
``SequenceDescriptionAdditional`` = ``SCOREMRI_AI`` and ``AIGenerated`` = ``1`` (``SCOREMRI`` / ``0``
otherwise).

Magnitude images (``output.magnitude``): :func:`magnitude_pixels` = |x| as float32, or as ushort counts the
way Gadgetron's ComplexToFloat -> AutoScale -> FloatToUShort chain makes them (per image: the 99th percentile
-> 2048, rounded, clamped to 0..4095), or with a fixed ``output.ushort_scale``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import ismrmrd
import numpy as np

IMTYPE_MAGNITUDE = 1
IMTYPE_COMPLEX = 5
USHORT_MAX = 4095  # FloatToUShortGadget's clamp (12-bit scanner images)
AUTOSCALE_MAX = 2048.0  # AutoScaleGadget's max_value: the 99th percentile of each image goes here
AUTOSCALE_PERCENTILE = 99.0
WINDOW_PERCENTILE = 99.5  # window: 0 .. this percentile of the pixels sent

AI_LABEL = "AI-generated research image (scoremri, not for diagnosis)"
CLASSICAL_LABEL = "Research reconstruction (scoremri, no learned prior, not for diagnosis)"
ROLE_IMAGE = "image"
ROLE_STD = "std"


def scoremri_version() -> str:
    """Installed scoremri version ('unknown' when not installed)."""
    try:
        from importlib.metadata import version

        return version("scoremri")
    except Exception:  # pragma: no cover - not installed
        return "unknown"


def is_ai_generated(method: str) -> bool:
    """True when the reconstruction method that actually made an image uses the learned prior (a SENSE
    fallback or a classical method is not AI-generated). Method names come from the registry (config
    validation refuses others); an unknown name is not one of our learned methods."""
    from scoremri.recon.methods import needs_prior

    try:
        return bool(needs_prior(method))
    except Exception:
        return False


def image_comment(method: str, requested: str, nfe: int, model_sha256: str, version: str,
                  fallback: str | None) -> str:
    """The ImageComment of one slice: label (AI-generated only for a learned ``method``, the one actually
    used), sampler, NFE, model hash prefix (learned methods), version, and the fallback reason when ``method``
    differs from the ``requested`` one."""
    learned = is_ai_generated(method)
    parts = [AI_LABEL if learned else CLASSICAL_LABEL, f"sampler {method}", f"NFE {nfe}"]
    if learned:
        parts.append(f"model {model_sha256[:12] if model_sha256 else 'none'}")
    parts.append(f"scoremri {version}")
    if fallback:
        parts.append(f"FALLBACK to SENSE ({requested} requested): {fallback}")
    return " | ".join(parts)


@dataclass(frozen=True)
class Label:
    """Who made an image and how: the facts every label and description is derived from.

    method: the method that made this image (``sense`` for a fallback); requested: the configured one;
    nfe: network calls; model_sha256: the prior's hash ('' without one); fallback: the reason of a SENSE
    fallback or None; role: 'image' or 'std' (pixel-wise standard deviation of the posterior samples)."""

    method: str
    requested: str
    nfe: int = 0
    model_sha256: str = ""
    version: str = ""
    fallback: str | None = None
    role: str = ROLE_IMAGE

    @property
    def learned(self) -> bool:
        return is_ai_generated(self.method)

    @property
    def comment(self) -> str:
        text = image_comment(self.method, self.requested, self.nfe, self.model_sha256, self.version, self.fallback)
        return text + (" | pixel-wise std" if self.role == ROLE_STD else "")

    @property
    def seq_description(self) -> str:
        """GADGETRON_SeqDescription (appended to the scanner's series description): ``_SCOREMRI_AI`` for a
        learned method, ``_SCOREMRI_<METHOD>`` otherwise (``_SCOREMRI_SENSE_FALLBACK`` for a fallback)."""
        if self.learned:
            tag = "_SCOREMRI_AI"
        else:
            tag = "_SCOREMRI_" + self.method.upper() + ("_FALLBACK" if self.fallback else "")
        return tag + ("_STD" if self.role == ROLE_STD else "")

    def meta(self) -> dict[str, str]:
        """The label's meta attributes (the MRD ones sites read and scoremri's own)."""
        m = {
            "AIGenerated": "1" if self.learned else "0",
            "SequenceDescriptionAdditional": "SCOREMRI_AI" if self.learned else "SCOREMRI",
            "ImageProcessingHistory": ["SCOREMRI", self.method.upper()],
            "SCOREMRI_Method": self.method,
            "SCOREMRI_Requested": self.requested,
            "SCOREMRI_NFE": str(int(self.nfe)),
            "SCOREMRI_Role": self.role,
            "SCOREMRI_Version": self.version,
        }
        if self.learned and self.model_sha256:
            m["SCOREMRI_Model"] = self.model_sha256[:12]
        if self.fallback:
            m["SCOREMRI_Fallback"] = self.fallback
        return m


@dataclass(frozen=True)
class ImageLabel:
    """A label as read back from an image's meta (:func:`image_label`)."""

    method: str
    requested: str
    learned: bool
    nfe: int
    role: str
    comment: str
    fallback: str | None
    model: str


def _meta_get(meta: Any, key: str, default: str = "") -> str:
    try:
        v = meta[key]
    except (KeyError, TypeError):
        return default
    if isinstance(v, (list, tuple)):
        v = v[0] if v else default
    return default if v is None else str(v)


def image_label(img: ismrmrd.Image) -> ImageLabel:
    """The label an image carries. Images without scoremri's label (e.g. from another reconstruction) count
    as AI-generated of unknown method: a label read back may err towards 'AI-generated', never away from it."""
    meta = img.meta
    method = _meta_get(meta, "SCOREMRI_Method", "unknown")
    ai = _meta_get(meta, "AIGenerated", "1") != "0"
    nfe = _meta_get(meta, "SCOREMRI_NFE", "0")
    return ImageLabel(
        method=method,
        requested=_meta_get(meta, "SCOREMRI_Requested", method),
        learned=ai,
        nfe=int(nfe) if nfe.isdigit() else 0,
        role=_meta_get(meta, "SCOREMRI_Role", ROLE_IMAGE),
        comment=_meta_get(meta, "GADGETRON_ImageComment", AI_LABEL if ai else CLASSICAL_LABEL),
        fallback=_meta_get(meta, "SCOREMRI_Fallback") or None,
        model=_meta_get(meta, "SCOREMRI_Model"),
    )


def short_label(label: ImageLabel) -> str:
    """One line for a picture: 'fast | NFE 100 | AI-generated', 'sense (FALLBACK, fast requested) | ...'."""
    name = label.method + (f" (FALLBACK, {label.requested} requested)" if label.fallback else "")
    parts = [name]
    if label.learned or label.nfe:
        parts.append(f"NFE {label.nfe}")
    parts.append("AI-generated" if label.learned else "no learned prior")
    if label.role == ROLE_STD:
        parts.insert(0, "std map")
    return " | ".join(parts)


def series_description(labels: list[ImageLabel], protocol: str = "", limit: int = 64) -> str:
    """A series' description from the labels of all its images (DICOM LO: at most 64 characters):
    ``<protocol> scoremri fast AI-generated``; ``... + SENSE fallback 2/5`` when some slices fell back; no
    AI label when no image of the series came from a learned method."""
    if not labels:
        return (protocol + " scoremri").strip()[:limit]
    requested = labels[0].requested
    ai = [lab for lab in labels if lab.learned]
    fell = [lab for lab in labels if lab.fallback]
    if ai:
        text = f"scoremri {requested} AI-generated"
        if fell:
            text += f" + SENSE fallback {len(fell)}/{len(labels)}"
    else:
        methods = sorted({lab.method for lab in labels})
        text = "scoremri " + "+".join(methods) + (f" (fallback from {requested})" if fell else "")
    if labels[0].role == ROLE_STD:
        text += " std"
    room = limit - len(text) - 1
    if protocol and room > 0:
        text = f"{protocol[:room]} {text}"
    return text[:limit]


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
               label: Label, *, extra_meta: dict[str, str] | None = None) -> ismrmrd.Image:
    """(z, ny, nx) complex64 (``image_type`` 5), float32 or uint16 (1) -> ismrmrd.Image with the geometry and
    counters of ``centre`` (the AcquisitionHeader of the line nearest the k-space centre), the recon FOV of
    ``sampling`` (a Gadgetron SamplingDescription) and the meta of ``label`` (who made it);
    ``index`` is the image_index within ``series``; extra_meta: further attributes (e.g. the ushort scale)."""
    if not isinstance(label, Label):
        raise TypeError(f"make_image needs a Label (who made the image), got {type(label).__name__}")
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
    comment = label.comment
    img.meta = {
        "GADGETRON_DataRole": "Image",
        "GADGETRON_ImageComment": comment,
        "GADGETRON_SeqDescription": label.seq_description,
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
        "ImageComments": comment,
        **label.meta(),
        **(extra_meta or {}),
    }
    return img


__all__ = ["AI_LABEL", "CLASSICAL_LABEL", "IMTYPE_COMPLEX", "IMTYPE_MAGNITUDE", "ImageLabel", "Label",
           "ROLE_IMAGE", "ROLE_STD", "image_comment", "image_label", "is_ai_generated", "magnitude_pixels",
           "make_image", "scoremri_version", "series_description", "short_label", "window"]
