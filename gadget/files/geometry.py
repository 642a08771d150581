"""Where an ISMRMRD image lies in the patient: the one place its header becomes DICOM and NIfTI geometry.

Conventions (ISMRMRD ``doc/mrd_image_data.md``, DICOM PS3.3 C.7.6.2, NIfTI-1):

- ISMRMRD ``position``, ``read_dir``, ``phase_dir``, ``slice_dir`` are in the DICOM patient coordinate system
  (LPS: +x towards the patient's Left, +y Posterior, +z Superior/head), in mm, relative to the isocentre.
  They are copied from the acquisitions, so the patient position (HFS, FFS, ...) is already accounted for.
- Image data ``(cha, z, y, x)``: ``x`` (a row of pixels, the column index) runs along ``read_dir``, ``y``
  (the row index) along ``phase_dir``, ``z`` (3-D partitions) along ``slice_dir``.
- ``position`` is the centre of the field of view. With centred FFTs (``fftshift(ifft(ifftshift(k)))``) the
  FOV centre is the voxel of index ``n // 2`` along each axis, so the centre of voxel (0, 0) is
  ``position - read_dir * (nx // 2) * dx - phase_dir * (ny // 2) * dy``: Gadgetron's DicomFinishGadget formula
  ``position - fov_x / 2 * read_dir - fov_y / 2 * phase_dir`` for even matrices.
- DICOM: ImageOrientationPatient = (row direction = read_dir, column direction = phase_dir);
  ImagePositionPatient = centre of voxel (0, 0); PixelSpacing = (row spacing = dy, column spacing = dx).
- NIfTI (RAS+, as NIfTI and nibabel expect): world = diag(-1, -1, 1) @ LPS.

Rows and columns are never swapped: a 128 x 96 image (ny = 128 rows, nx = 96 columns) gives DICOM Rows 128,
Columns 96. Absent direction cosines (ismrmrd_generate_cartesian_shepp_logan writes zeros) become an axial
plane (read = +x, phase = +y) with a warning: a guess, flagged as such in :attr:`Plane.guessed`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
GUESSED_NOTE = "geometry absent in the raw data: orientation assumed axial at the isocentre"
_warned: set[tuple[int, int]] = set()
_AXES = (("L", "R"), ("P", "A"), ("H", "F"))  # letter for +/- x, y, z of LPS (DICOM Patient Orientation)


@dataclass(frozen=True)
class Plane:
    """One 2-D image plane (one z partition of an ISMRMRD image) in LPS patient coordinates, mm.

    rows, cols: pixel matrix (ny, nx). row_dir: unit vector along a row (increasing column index) = read_dir;
    col_dir: along a column (increasing row index) = phase_dir; normal = row_dir x col_dir.
    spacing: (dy, dx) = (distance between rows, distance between columns), DICOM PixelSpacing order.
    thickness: slice thickness. origin: centre of voxel (row 0, column 0). centre: FOV centre.
    """

    rows: int
    cols: int
    row_dir: np.ndarray
    col_dir: np.ndarray
    normal: np.ndarray
    spacing: tuple[float, float]
    thickness: float
    origin: np.ndarray
    centre: np.ndarray
    guessed: bool = False

    @property
    def orientation(self) -> list[float]:
        """DICOM ImageOrientationPatient: row direction then column direction (6 values)."""
        return [float(v) for v in np.concatenate([self.row_dir, self.col_dir])]

    @property
    def distance(self) -> float:
        """Signed position of the plane along its normal (mm): the key slices are sorted by."""
        return float(np.dot(self.origin, self.normal))

    def voxel_to_lps(self) -> np.ndarray:
        """(4, 4) affine from (column, row, 0, 1) voxel indices to LPS mm (third column: normal x thickness)."""
        a = np.eye(4)
        a[:3, 0] = self.row_dir * self.spacing[1]
        a[:3, 1] = self.col_dir * self.spacing[0]
        a[:3, 2] = self.normal * self.thickness
        a[:3, 3] = self.origin
        return a

    def lps(self, row: float, col: float) -> np.ndarray:
        """LPS coordinates (mm) of the centre of pixel (row, col)."""
        return self.origin + self.col_dir * row * self.spacing[0] + self.row_dir * col * self.spacing[1]


def _unit(v: Any) -> np.ndarray:
    a = np.asarray(v, dtype=np.float64).reshape(3)
    n = float(np.linalg.norm(a))
    return a / n if n > 0 else a


def planes(head: Any) -> list[Plane]:
    """The planes of an ISMRMRD image header (``ismrmrd.ImageHeader`` or an Image), one per z partition.

    Read/phase directions are normalised and made orthogonal (float32 cosines are not exactly); zero or
    parallel directions become an axial plane, logged and flagged ``guessed``."""
    nx, ny, nz = (int(v) for v in head.matrix_size)
    fov = [float(v) for v in head.field_of_view]
    read, phase, slc = _unit(head.read_dir), _unit(head.phase_dir), _unit(head.slice_dir)
    guessed = False
    if not np.any(read) or not np.any(phase) or abs(float(np.dot(read, phase))) > 0.1:
        key = (int(head.measurement_uid), int(head.image_series_index))
        if key not in _warned:
            _warned.add(key)
            log.warning("series %s: no usable read/phase directions in the image headers (read %s, phase %s): "
                        "orientation assumed axial at the isocentre, marked as assumed", head.image_series_index,
                        np.round(read, 4).tolist(), np.round(phase, 4).tolist())
        read, phase, guessed = np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0]), True
    phase = _unit(phase - np.dot(phase, read) * read)
    normal = np.cross(read, phase)
    if not np.any(slc) or guessed:
        slc = normal
    dx = fov[0] / nx if fov[0] > 0 and nx > 0 else 1.0
    dy = fov[1] / ny if fov[1] > 0 and ny > 0 else 1.0
    dz = fov[2] / max(nz, 1) if fov[2] > 0 else 1.0
    position = np.zeros(3) if guessed else np.asarray(head.position, dtype=np.float64).reshape(3)
    out = []
    for p in range(max(nz, 1)):
        centre = position + slc * (p - nz // 2) * dz if nz > 1 else position
        origin = centre - read * (nx // 2) * dx - phase * (ny // 2) * dy
        out.append(Plane(ny, nx, read, phase, normal, (dy, dx), dz, origin, centre, guessed))
    return out


def direction_letters(v: Any, head_foot: tuple[str, str] = ("H", "F"), threshold: float = 1e-3) -> str:
    """Patient-orientation letters of a direction (LPS vector), most significant first, e.g. (1, 0, 0) -> 'L',
    (0, 0.6, -0.8) -> 'FP'. ``head_foot``: the letters for +z/-z ('H', 'F' in DICOM; 'S', 'I' in viewers)."""
    a = _unit(v)
    axes = (_AXES[0], _AXES[1], head_foot)
    order = np.argsort(-np.abs(a), kind="stable")
    return "".join(axes[i][0 if a[i] > 0 else 1] for i in order if abs(a[i]) > threshold)


def edge_letters(plane: Plane) -> dict[str, str]:
    """What lies beyond each edge of the displayed image (rows top to bottom, columns left to right), with
    S/I for head/foot as viewers show: {'left', 'right', 'top', 'bottom'}."""
    hf = ("S", "I")
    return {
        "left": direction_letters(-plane.row_dir, hf),
        "right": direction_letters(plane.row_dir, hf),
        "top": direction_letters(-plane.col_dir, hf),
        "bottom": direction_letters(plane.col_dir, hf),
    }


def plane_name(plane: Plane) -> str:
    """'axial', 'coronal', 'sagittal' (normal within 1 degree of an axis) or 'oblique'."""
    i = int(np.argmax(np.abs(plane.normal)))
    if abs(plane.normal[i]) < np.cos(np.deg2rad(1.0)):
        return "oblique"
    return ("sagittal", "coronal", "axial")[i]


__all__ = ["GUESSED_NOTE", "LPS_TO_RAS", "Plane", "direction_letters", "edge_letters", "plane_name", "planes"]
