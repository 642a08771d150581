"""ISMRMRD images -> NIfTI-1 volumes (nibabel), one file per image series, with a JSON sidecar.

The affine comes from the same image headers as the DICOM geometry (:mod:`.geometry`), converted from
DICOM's LPS to NIfTI's RAS+ (``diag(-1, -1, 1)``). The voxel layout is the one Debian's ``dcm2niix`` writes
for the DICOM series of the same images, so that both files hold the same array under the same affine
(the tests check exactly that, on axial, coronal, sagittal and oblique multi-slice scans):

- i: the column index (along read_dir), j: the row index reversed (rows are stored bottom-up, along
  -phase_dir), k: the slice planes sorted by their position along the normal read_dir x phase_dir,
  ascending; t: images at the same position (contrasts, phases, repetitions, sets, in that order).
- qform and sform both the scanner affine (code 1; code 0 when the raw data had no geometry), units mm; pixel values float32 magnitude (RSS over
  channels) in the units of the whitened data.

``NiftiWriter(path).add(image)`` collects; ``close()`` writes ``path`` for the image series, ``<stem>_std``
for std-map series (``<stem>_s<N>`` for any further series) and a ``.json`` sidecar per file (method, NFE,
AI label, image comments). A series whose planes do not form one grid (different orientations or matrices,
unequal slice gaps, in-plane shifts) is refused with :class:`NiftiError` naming the problem.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ismrmrd
import numpy as np

from ..images import ROLE_STD, ImageLabel, image_label, series_description
from .geometry import GUESSED_NOTE, LPS_TO_RAS, Plane, planes

log = logging.getLogger(__name__)

GRID_TOL_MM = 1e-2


class NiftiError(ValueError):
    """Images that cannot form one NIfTI volume; the message names the series and the problem."""


@dataclass
class _Plane:
    plane: Plane
    magnitude: np.ndarray  # (rows, cols) float32
    counters: tuple[int, ...]  # contrast, phase, repetition, set, average
    label: ImageLabel


def volume_affine(first: Plane, spacing: float) -> np.ndarray:
    """RAS+ affine of the dcm2niix layout (see the module docstring) for a stack whose lowest plane along the
    normal is ``first`` and whose planes are ``spacing`` mm apart."""
    m = np.eye(4)
    m[:3, :3] = LPS_TO_RAS
    a = np.eye(4)
    a[:3, 0] = first.row_dir * first.spacing[1]
    a[:3, 1] = -first.col_dir * first.spacing[0]
    a[:3, 2] = first.normal * spacing
    a[:3, 3] = first.lps(first.rows - 1, 0)
    return m @ a


def nifti_paths(path: str | Path, series: list[tuple[int, str]]) -> dict[int, Path]:
    """{series number: file} for the series (number, role): the first image series -> ``path``, std maps ->
    ``<stem>_std<ext>``, others -> ``<stem>_s<N><ext>``."""
    p = Path(path)
    name = p.name
    ext = ".nii.gz" if name.endswith(".nii.gz") else (".nii" if name.endswith(".nii") else "")
    stem = name[: len(name) - len(ext)] if ext else name
    ext = ext or ".nii.gz"
    out: dict[int, Path] = {}
    main_done = std_done = False
    for number, role in sorted(series):
        if role == ROLE_STD and not std_done:
            out[number], std_done = p.with_name(f"{stem}_std{ext}"), True
        elif role != ROLE_STD and not main_done:
            out[number], main_done = p.with_name(stem + ext), True
        else:
            out[number] = p.with_name(f"{stem}_s{number}{ext}")
    return out


class NiftiWriter:
    """Collects ISMRMRD images and writes one NIfTI volume per series on :meth:`close`."""

    def __init__(self, path: str | Path) -> None:
        try:
            import nibabel  # noqa: F401
        except ImportError as e:  # pragma: no cover - nibabel is an install requirement
            raise NiftiError("NIfTI output needs nibabel (pip install nibabel)") from e
        self.path = Path(path)
        self.series: dict[int, list[_Plane]] = {}

    def add(self, img: ismrmrd.Image) -> None:
        head = img.getHead()
        data = np.asarray(img.data)
        mag = np.sqrt(np.sum(np.abs(data) ** 2, axis=0)) if data.shape[0] > 1 else np.abs(data[0])
        mag = np.nan_to_num(mag.astype(np.float32))
        counters = tuple(int(getattr(head, f)) for f in ("contrast", "phase", "repetition", "set", "average"))
        label = image_label(img)
        for p, plane in enumerate(planes(head)):
            self.series.setdefault(int(head.image_series_index), []).append(_Plane(plane, mag[p], counters, label))

    def close(self) -> list[Path]:
        """Write every series; returns the NIfTI paths (sidecars beside them)."""
        import nibabel as nib

        roles = [(n, items[0].label.role) for n, items in self.series.items() if items]
        paths = nifti_paths(self.path, roles)
        written = []
        for number, items in sorted(self.series.items()):
            if not items:
                continue
            vol, affine, spacing = stack(items, number)
            img = nib.Nifti1Image(vol, affine)
            hdr = img.header
            hdr.set_xyzt_units("mm", "sec")
            guessed = any(i.plane.guessed for i in items)
            code = 0 if guessed else 1  # 0: unknown (the raw data had no geometry), 1: scanner coordinates
            img.set_qform(affine, code=code)
            img.set_sform(affine, code=code)
            desc = series_description([i.label for i in items])
            hdr["descrip"] = desc.encode("ascii", "replace")[:79]
            out = paths[number]
            out.parent.mkdir(parents=True, exist_ok=True)
            nib.save(img, str(out))
            labels = [i.label for i in items]
            side = {
                "SeriesNumber": number,
                "SeriesDescription": desc,
                "AIGenerated": any(lab.learned for lab in labels),
                "Methods": sorted({lab.method for lab in labels}),
                "RequestedMethod": labels[0].requested,
                "Role": labels[0].role,
                "NFE": sorted({lab.nfe for lab in labels}),
                "Fallbacks": sum(1 for lab in labels if lab.fallback),
                "ImageComments": list(dict.fromkeys(lab.comment for lab in labels)),
                "SliceThickness": items[0].plane.thickness,
                "SpacingBetweenSlices": spacing,
                "Units": "magnitude in the units of the whitened raw data",
            }
            if guessed:
                side["GeometryNote"] = GUESSED_NOTE
            sidecar = out.with_name(out.name[: -len(".nii.gz")] if out.name.endswith(".nii.gz") else out.stem)
            sidecar = sidecar.with_name(sidecar.name + ".json")
            sidecar.write_text(json.dumps(side, indent=1) + "\n")
            log.info("NIfTI series %d: %s %s (%s)", number, out, tuple(vol.shape), desc)
            written.append(out)
        return written


def stack(items: list[_Plane], number: int) -> tuple[np.ndarray, np.ndarray, float]:
    """(volume (cols, rows, slices[, frames]) float32, RAS affine, slice spacing) of one series' planes."""
    first = items[0].plane
    for it in items:
        q = it.plane
        if (q.rows, q.cols) != (first.rows, first.cols):
            raise NiftiError(f"series {number}: images of {q.rows}x{q.cols} and {first.rows}x{first.cols} pixels "
                             "cannot form one NIfTI volume")
        if (not np.allclose(q.row_dir, first.row_dir, atol=1e-4) or not np.allclose(q.col_dir, first.col_dir, atol=1e-4)
                or not np.allclose(q.spacing, first.spacing, atol=1e-4)):
            raise NiftiError(f"series {number}: images differ in orientation or pixel size; NIfTI needs one grid")
    dist = np.array([it.plane.distance for it in items])
    keys = np.round(dist / GRID_TOL_MM).astype(np.int64)
    positions = np.unique(keys)
    groups = [[it for it, k in zip(items, keys) if k == pos] for pos in positions]
    frames = {len(g) for g in groups}
    if len(frames) != 1:
        raise NiftiError(f"series {number}: {len(positions)} slice positions hold different numbers of images "
                         f"({sorted(frames)}); NIfTI needs the same at each")
    groups = [sorted(g, key=lambda it: it.counters) for g in groups]
    base = groups[0][0].plane
    centres = [g[0].plane.distance for g in groups]
    if len(groups) > 1:
        gaps = np.diff(centres)
        if np.ptp(gaps) > GRID_TOL_MM:
            raise NiftiError(f"series {number}: slice gaps differ ({', '.join(f'{g:.3f}' for g in gaps)} mm); "
                             "NIfTI needs equidistant slices")
        spacing = round(float(np.mean(gaps)), 4)  # positions are float32: no spurious digits
        for g, d in zip(groups, centres):
            expect = base.origin + base.normal * (d - centres[0])
            if np.linalg.norm(g[0].plane.origin - expect) > GRID_TOL_MM * 10:
                raise NiftiError(f"series {number}: slices are shifted in-plane; NIfTI needs one grid")
    else:
        spacing = float(base.thickness)
    nframes = frames.pop()
    vol = np.zeros((base.cols, base.rows, len(groups), nframes), np.float32)
    for k, g in enumerate(groups):
        for t, it in enumerate(g):
            vol[:, :, k, t] = it.magnitude[::-1, :].T  # rows bottom-up, (cols, rows)
    if nframes == 1:
        vol = vol[..., 0]
    return vol, volume_affine(base, spacing), spacing


__all__ = ["NiftiError", "NiftiWriter", "nifti_paths", "stack", "volume_affine"]
