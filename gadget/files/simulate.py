"""``scoremri simulate``: a magnitude image -> a simulated multi-coil ISMRMRD raw ``.h5`` Gadgetron accepts.

The image (NIfTI slice, .npy, PNG/JPEG, DICOM via pydicom) is scaled to [0, 1], given a smooth random phase,
multiplied by N birdcage coil maps, Fourier transformed (centred orthonormal FFT), corrupted by complex
Gaussian noise (``sigma`` = std of each of real and imaginary part) and undersampled by a line mask. Rows of
the image are phase encodes (ky, E1), columns the readout (kx, RO).

File layout (group ``dataset``):
- ``xml``: a complete header (strict ismrmrd 1.15 xsd classes; no ``<version>``, see ARCHITECTURE.md, "Protocols"):
  measurementInformation, acquisitionSystemInformation (receiverChannels, relativeReceiverNoiseBandwidth
  0.5), experimentalConditions, one cartesian encoding (encoded/recon space, limits with centres,
  parallelImaging with the acceleration and calibrationMode embedded), sequenceParameters.
- ``data``: first one noise scan per slice group (flag ACQ_IS_NOISE_MEASUREMENT, ``--noise-samples`` samples,
  same dwell time as the imaging lines), then per slice the sampled lines in ascending ky, ACS lines flagged
  PARALLEL_CALIBRATION_AND_IMAGING, first/last-in-slice/encode-step flags, geometry. With
  ``--ro-oversampling 2`` the readout has 2*nx samples over twice the FOV (object centred).
- ``--mask grappa``: what a scanner acquires for GRAPPA with reduction factor R = ``--accel`` (an integer):
  every R-th line through the k-space centre plus the ACS block; ACS lines on that grid are flagged
  PARALLEL_CALIBRATION_AND_IMAGING, the others PARALLEL_CALIBRATION only (the ISMRMRD convention, as
  ``ismrmrd_generate_cartesian_shepp_logan`` writes it), so the data Gadgetron's GRAPPA unfolds are exactly
  R-periodic and the extra ACS lines reach it as calibration only. The header states R; the true
  acceleration is lower (the ACS lines are extra). The other masks keep their line positions and flags
  (a ``random``/``equispaced`` mask has no R-grid: fine for SENSE-type and learned reconstructions, not for
  GRAPPA, whose kernels assume one).
- ``phantom`` (S, ny, nx) and ``csm`` (S, C, ny, nx): ground truth as ``ismrmrd_generate_cartesian_shepp_logan``
  stores it (compound real/imag float32), in the units replay produces after prewhitening.

Units of the ground truth: NoiseAdjustGadget whitens with ``inv(chol(Cov)) * sqrt(2 * dt_acq/dt_noise * bw)``.
Here Cov = 2 sigma^2 I, dt_acq = dt_noise and bw = 0.5 (the noise scan sees exactly the imaging noise, so
the bandwidth correction must be 1), hence whitening divides by ``sigma * sqrt(2)`` and the whitened noise has
unit complex variance. ``phantom = image * GT_SCALE`` with ``GT_SCALE = 1 / (sigma * sqrt(2))``
(the ``ground_truth_scale`` attribute; 1 when sigma = 0, where no noise scan is written).
"""
from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path
from typing import Any

import h5py
import ismrmrd
import ismrmrd.xsd as xsd
import numpy as np

from ..cli import UsageError

log = logging.getLogger(__name__)

DWELL_TIME_US = 5.0  # imaging and noise dwell time
NOISE_BANDWIDTH = 0.5  # relativeReceiverNoiseBandwidth: sqrt(2 * 1 * 0.5) = 1, no bandwidth correction
PIXEL_MM = 1.0
SLICE_MM = 5.0
TABLE_POSITION = (0.0, 0.0, -50.0)
# slice orientations in LPS patient coordinates (read_dir, phase_dir); slice_dir = read x phase. "oblique" is
# the axial plane tilted 25 degrees about the left-right axis, then 15 degrees about the anterior-posterior axis.
ORIENTATIONS = ("axial", "coronal", "sagittal", "oblique")
SLICE_ORDERS = ("ascending", "descending", "interleaved")
COMPLEX_DTYPE = np.dtype([("real", "<f4"), ("imag", "<f4")])
MASKS = ("random", "equispaced", "gaussian", "grappa")


class SimulateError(ValueError):
    """Bad simulate input; the message names the problem."""


class SimulateOptionError(SimulateError, UsageError):
    """A simulation parameter (a command-line option of ``scoremri simulate``) is out of range; the message
    names the option and the value (exit 2 on the command line)."""


# ------------------------------------------------------------------------------------------ image input


def load_image(path: str | Path, axis: int = 2, index: int | None = None, slices: int = 1,
               volume: int | None = None) -> np.ndarray:
    """Magnitude slices (S, ny, nx) float32 scaled to [0, 1] from .npy, .nii/.nii.gz, .png/.jpg, .dcm.

    3-D volumes (.npy or NIfTI): ``slices`` consecutive slices along ``axis`` centred on ``index``
    (default: the middle). 4-D NIfTI (a time series): ``volume`` picks one 3-D volume; without it a
    4-D input is an error naming ``--volume`` (which volume to use is the user's choice, not ours).
    2-D images: ``slices`` copies.
    """
    p = Path(path)
    if not p.exists():
        raise SimulateError(f"{p}: no such image file")
    name = p.name.lower()
    if name.endswith(".npy"):
        arr = np.load(p)
    elif name.endswith(".nii") or name.endswith(".nii.gz"):
        try:
            import nibabel as nib
        except ImportError as e:
            raise SimulateError("reading NIfTI needs nibabel (pip install nibabel)") from e
        arr = np.asarray(nib.load(str(p)).dataobj)
        if arr.ndim == 4 and arr.shape[3] == 1:
            arr = arr[..., 0]
        elif arr.ndim == 4:
            if volume is None:
                raise SimulateOptionError(f"{p} holds {arr.shape[3]} volumes: choose one with --volume N "
                                          f"(0..{arr.shape[3] - 1})")
            if not 0 <= volume < arr.shape[3]:
                raise SimulateOptionError(f"--volume {volume} is outside the {arr.shape[3]} volumes of {p} "
                                          f"(0..{arr.shape[3] - 1})")
            arr = arr[..., volume]
    elif name.endswith((".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")):
        from PIL import Image

        arr = np.asarray(Image.open(p).convert("F"))
    elif name.endswith((".dcm", ".ima")):
        try:
            import pydicom
        except ImportError as e:
            raise SimulateError("reading DICOM needs pydicom (pip install pydicom)") from e
        arr = pydicom.dcmread(str(p)).pixel_array
    else:
        raise SimulateError(f"{p}: unknown image type (use .npy, .nii, .nii.gz, .png, .jpg or .dcm)")
    arr = np.asarray(arr)
    if np.iscomplexobj(arr):
        arr = np.abs(arr)
    arr = arr.astype(np.float64)
    if arr.ndim == 2:
        vol = np.repeat(arr[None], slices, axis=0)
    elif arr.ndim == 3:
        if not -3 <= axis < 3:
            raise SimulateOptionError(f"--axis {axis} is out of range for a 3-D volume (0, 1, 2 or -1..-3)")
        arr = np.moveaxis(arr, axis, 0)
        n = arr.shape[0]
        centre = n // 2 if index is None else int(index)
        start = centre - slices // 2
        if start < 0 or start + slices > n or not 0 <= centre < n:
            raise SimulateOptionError(f"--index/--slices: slices {start}..{start + slices - 1} are outside the {n} slices of {p} along axis {axis}")
        vol = arr[start : start + slices]
    else:
        raise SimulateError(f"{p}: need a 2-D image or a 3-D volume, got shape {arr.shape}")
    if not np.all(np.isfinite(vol)):
        raise SimulateError(f"{p}: image contains NaN or Inf")
    vol = np.clip(vol, 0, None)
    top = vol.max()
    if top <= 0:
        raise SimulateError(f"{p}: image is all zero")
    if min(vol.shape[1:]) < 16:
        raise SimulateError(f"{p}: image {vol.shape[1:]} is too small (need at least 16 x 16)")
    return (vol / top).astype(np.float32)


# ----------------------------------------------------------------------------------------------- header


def _limit(lo: int, hi: int, centre: int) -> Any:
    return xsd.limitType(minimum=lo, maximum=hi, center=centre)


def orientation_dirs(orientation: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(read_dir, phase_dir, slice_dir) unit vectors in LPS of a named orientation (:data:`ORIENTATIONS`)."""
    if orientation == "axial":
        read, phase = np.array([1.0, 0, 0]), np.array([0, 1.0, 0])  # rows run to the left, columns posterior
    elif orientation == "coronal":
        read, phase = np.array([1.0, 0, 0]), np.array([0, 0, -1.0])  # rows to the left, columns to the feet
    elif orientation == "sagittal":
        read, phase = np.array([0, 1.0, 0]), np.array([0, 0, -1.0])  # rows posterior, columns to the feet
    elif orientation == "oblique":
        a, b = np.deg2rad(25.0), np.deg2rad(15.0)
        rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
        ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
        rot = ry @ rx
        read, phase = rot @ np.array([1.0, 0, 0]), rot @ np.array([0, 1.0, 0])
    else:
        raise SimulateOptionError(f"--orientation must be one of {', '.join(ORIENTATIONS)}, got '{orientation}'")
    return read + 0.0, phase + 0.0, np.cross(read, phase) + 0.0  # + 0.0: no negative zeros in headers


def slice_offsets(slices: int, spacing: float, order: str = "ascending") -> np.ndarray:
    """Offset (mm) along slice_dir of each slice index: centred on 0, ``spacing`` apart; ``order`` says how the
    slice counter maps to position (ascending, descending, interleaved: 0, 2, 4, ..., 1, 3, ...)."""
    if order not in SLICE_ORDERS:
        raise SimulateOptionError(f"--slice-order must be one of {', '.join(SLICE_ORDERS)}, got '{order}'")
    pos = (np.arange(slices) - (slices - 1) / 2.0) * spacing
    if order == "descending":
        return pos[::-1].copy()
    if order == "interleaved":
        rank = np.concatenate([np.arange(0, slices, 2), np.arange(1, slices, 2)])
        return pos[rank]
    return pos


def make_header(ny: int, nx: int, ncoils: int, accel: int, slices: int, ro_os: int, seed: int,
                pixel_mm: tuple[float, float] = (PIXEL_MM, PIXEL_MM), slice_mm: float = SLICE_MM) -> Any:
    """The ismrmrdHeader (strict xsd classes) of a simulated cartesian 2-D multi-slice scan; ``pixel_mm`` =
    (dy, dx): phase-encode (row) and readout (column) pixel size."""
    fov_x, fov_y = nx * pixel_mm[1], ny * pixel_mm[0]
    enc = xsd.encodingType(
        encodedSpace=xsd.encodingSpaceType(
            matrixSize=xsd.matrixSizeType(x=nx * ro_os, y=ny, z=1),
            fieldOfView_mm=xsd.fieldOfViewMm(x=fov_x * ro_os, y=fov_y, z=slice_mm),
        ),
        reconSpace=xsd.encodingSpaceType(
            matrixSize=xsd.matrixSizeType(x=nx, y=ny, z=1),
            fieldOfView_mm=xsd.fieldOfViewMm(x=fov_x, y=fov_y, z=slice_mm),
        ),
        encodingLimits=xsd.encodingLimitsType(
            kspace_encoding_step_0=_limit(0, nx * ro_os - 1, nx * ro_os // 2),
            kspace_encoding_step_1=_limit(0, ny - 1, ny // 2),
            kspace_encoding_step_2=_limit(0, 0, 0),
            average=_limit(0, 0, 0),
            slice=_limit(0, slices - 1, 0),
            contrast=_limit(0, 0, 0),
            phase=_limit(0, 0, 0),
            repetition=_limit(0, 0, 0),
            set=_limit(0, 0, 0),
            segment=_limit(0, 0, 0),
        ),
        trajectory=xsd.trajectoryType.CARTESIAN,
        parallelImaging=xsd.parallelImagingType(
            accelerationFactor=xsd.accelerationFactorType(kspace_encoding_step_1=accel, kspace_encoding_step_2=1),
            calibrationMode=xsd.calibrationModeType.EMBEDDED,
        ),
    )
    return xsd.ismrmrdHeader(
        subjectInformation=xsd.subjectInformationType(patientID="SCOREMRI_SIMULATION"),
        studyInformation=xsd.studyInformationType(studyID="SCOREMRI"),
        measurementInformation=xsd.measurementInformationType(
            measurementID=f"SCOREMRI_0_{seed}_1",
            patientPosition=xsd.patientPositionType.HFS,
            protocolName="scoremri_simulate",
            seriesDescription="scoremri simulated raw data",
        ),
        acquisitionSystemInformation=xsd.acquisitionSystemInformationType(
            systemVendor="scoremri",
            systemModel="simulation",
            systemFieldStrength_T=3.0,
            relativeReceiverNoiseBandwidth=NOISE_BANDWIDTH,
            receiverChannels=ncoils,
            institutionName="scoremri",
        ),
        experimentalConditions=xsd.experimentalConditionsType(H1resonanceFrequency_Hz=123_250_000),
        encoding=[enc],
        sequenceParameters=xsd.sequenceParametersType(
            TR=[500.0], TE=[10.0], flipAngle_deg=[90.0], sequence_type="simulated"
        ),
    )


def header_xml(header: Any) -> str:
    """Serialise with ismrmrd's xsd classes (no <version>, no trailing NUL)."""
    xml = xsd.ToXML(header)
    return xml.decode() if isinstance(xml, bytes) else str(xml)


# -------------------------------------------------------------------------------------------- simulation


def _acquisition(data: np.ndarray, *, scan: int, ky: int, slice_: int, flags: list[int], centre: int,
                 position: Any, uid: int, dirs: tuple[np.ndarray, np.ndarray, np.ndarray]) -> ismrmrd.Acquisition:
    acq = ismrmrd.Acquisition.from_array(np.ascontiguousarray(data, dtype=np.complex64))
    h = acq.getHead()
    h.version = 1
    h.measurement_uid = uid
    h.scan_counter = scan
    h.acquisition_time_stamp = scan * 200  # 2.5 ms ticks, arbitrary but monotonic
    h.center_sample = centre
    h.encoding_space_ref = 0
    h.sample_time_us = DWELL_TIME_US
    h.position[:] = [float(v) for v in position]
    h.read_dir[:], h.phase_dir[:], h.slice_dir[:] = ([float(v) for v in d] for d in dirs)
    h.patient_table_position[:] = TABLE_POSITION
    h.idx.kspace_encode_step_1 = ky
    h.idx.slice = slice_
    h.flags = 0
    for f in flags:
        h.flags |= 1 << (f - 1)
    acq.setHead(h)
    acq.data[:] = data
    return acq


def simulate(
    mag: np.ndarray,
    *,
    coils: int = 8,
    accel: float = 4.0,
    mask_kind: str = "random",
    acs: int = 24,
    sigma: float = 0.005,
    seed: int = 0,
    ro_oversampling: int = 2,
    noise_samples: int = 256,
    orientation: str = "axial",
    offset_mm: tuple[float, float, float] = (0.0, 0.0, 0.0),
    pixel_mm: tuple[float, float] = (PIXEL_MM, PIXEL_MM),
    slice_mm: float = SLICE_MM,
    slice_spacing_mm: float | None = None,
    slice_order: str = "ascending",
) -> dict[str, Any]:
    """Simulate a scan of magnitude slices ``mag`` (S, ny, nx) in [0, 1].

    Geometry (LPS patient coordinates, see :mod:`scoremri.gadget.files.geometry`): rows of ``mag`` run along
    ``phase_dir``, columns along ``read_dir`` of ``orientation`` (:func:`orientation_dirs`); pixel (ny // 2,
    nx // 2) of slice s lies at ``offset_mm + slice_dir * slice_offsets(...)[s]``; ``pixel_mm`` = (dy, dx);
    slices ``slice_mm`` thick, ``slice_spacing_mm`` (default: ``slice_mm``) apart, counter-to-position map
    ``slice_order``.

    Returns {"header", "xml", "acquisitions", "phantom" (S, ny, nx) complex64 in whitened units, "csm"
    (S, C, ny, nx) complex64, "mask" (ny,) bool, "kspace" (S, C, ny, nx*os) complex64 as acquired (zeros
    where not sampled), "image" (S, ny, nx) complex64 in [0, 1] units, "scale"}.
    """
    from scoremri.recon.masks import grappa_lines, make_mask, true_acceleration
    from scoremri.recon.simulation import birdcage_maps, complex_image, simulate_kspace

    mag = np.asarray(mag, dtype=np.float32)
    if mag.ndim == 2:
        mag = mag[None]
    if mag.ndim != 3:
        raise SimulateError(f"magnitude must be (S, ny, nx), got shape {mag.shape}")
    nslices, ny, nx = mag.shape
    if coils < 1:
        raise SimulateOptionError(f"--coils must be >= 1, got {coils}")
    if ro_oversampling not in (1, 2):
        raise SimulateOptionError(f"--ro-oversampling must be 1 or 2, got {ro_oversampling}")
    if sigma < 0:
        raise SimulateOptionError(f"--sigma must be >= 0, got {sigma}")
    if accel < 1:
        raise SimulateOptionError(f"--accel must be >= 1, got {accel}")
    if not 0 <= acs <= ny:
        raise SimulateOptionError(f"--acs must be in [0, {ny}], got {acs}")
    if mask_kind not in MASKS:
        raise SimulateOptionError(f"--mask must be one of {', '.join(MASKS)}, got '{mask_kind}'")
    if mask_kind == "grappa" and accel != int(accel):
        raise SimulateOptionError(f"--mask grappa needs an integer --accel (the reduction factor R), got {accel:g}")
    if min(pixel_mm) <= 0 or slice_mm <= 0 or (slice_spacing_mm is not None and slice_spacing_mm <= 0):
        raise SimulateOptionError(f"--pixel-mm, --slice-mm and --slice-spacing must be > 0, got {pixel_mm}, "
                                  f"{slice_mm}, {slice_spacing_mm}")
    dirs = orientation_dirs(orientation)
    offsets = slice_offsets(nslices, slice_mm if slice_spacing_mm is None else slice_spacing_mm, slice_order)
    centre_mm = np.asarray(offset_mm, dtype=np.float64).reshape(3)
    if sigma > 0 and noise_samples < 2 * coils:
        raise SimulateOptionError(f"--noise-samples must be >= 2 x coils = {2 * coils} for a usable noise covariance")
    rng = np.random.default_rng(seed)
    nro = nx * ro_oversampling
    if mask_kind == "grappa":
        lines, on_grid = grappa_lines(ny, int(accel), acs)
    else:
        lines = np.asarray(make_mask(mask_kind, (ny, nx), accel, acs=acs, seed=seed), dtype=bool).any(axis=1)
        on_grid = lines  # no R-grid: every sampled ACS line is also imaging data
    acs_lo = ny // 2 - acs // 2
    acs_lines = np.zeros(ny, dtype=bool)
    acs_lines[acs_lo : acs_lo + acs] = True
    acs_lines &= lines
    log.info("mask %s: %d of %d lines (true acceleration x%.2f), %d ACS lines", mask_kind, lines.sum(), ny,
             true_acceleration(np.repeat(lines[:, None], nx, 1)), acs_lines.sum())
    scale = 1.0 / (sigma * math.sqrt(2.0)) if sigma > 0 else 1.0
    header = make_header(ny, nx, coils, max(1, int(round(accel))), nslices, ro_oversampling, seed, pixel_mm,
                         slice_mm)
    xml = header_xml(header)
    maps_full = birdcage_maps(coils, (ny, nro))
    x0 = (nro - nx) // 2
    maps = maps_full[:, :, x0 : x0 + nx]
    uid = int(seed) & 0xFFFF
    acqs: list[ismrmrd.Acquisition] = []
    scan = 0
    if sigma > 0:
        noise = rng.normal(0, sigma, (coils, noise_samples)) + 1j * rng.normal(0, sigma, (coils, noise_samples))
        acqs.append(_acquisition(noise, scan=scan, ky=0, slice_=0, flags=[ismrmrd.ACQ_IS_NOISE_MEASUREMENT],
                                 centre=0, position=centre_mm, uid=uid, dirs=dirs))
        scan += 1
    images = np.zeros((nslices, ny, nx), np.complex64)
    kspaces = np.zeros((nslices, coils, ny, nro), np.complex64)
    sampled = np.flatnonzero(lines)
    for s in range(nslices):
        img = complex_image(mag[s], rng)
        images[s] = img
        img_full = np.zeros((ny, nro), np.complex64)
        img_full[:, x0 : x0 + nx] = img
        k = simulate_kspace(img_full, maps_full, np.repeat(lines[:, None], nro, axis=1), sigma, rng)
        kspaces[s] = k
        position = centre_mm + dirs[2] * offsets[s]
        for j, ky in enumerate(sampled):
            flags = []
            if j == 0:
                flags += [ismrmrd.ACQ_FIRST_IN_SLICE, ismrmrd.ACQ_FIRST_IN_ENCODE_STEP1]
                if s == 0:
                    flags.append(ismrmrd.ACQ_FIRST_IN_REPETITION)
            if j == len(sampled) - 1:
                flags += [ismrmrd.ACQ_LAST_IN_SLICE, ismrmrd.ACQ_LAST_IN_ENCODE_STEP1]
                if s == nslices - 1:
                    flags += [ismrmrd.ACQ_LAST_IN_REPETITION, ismrmrd.ACQ_LAST_IN_MEASUREMENT]
            if acs_lines[ky]:
                flags.append(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING if on_grid[ky]
                             else ismrmrd.ACQ_IS_PARALLEL_CALIBRATION)
            acqs.append(_acquisition(k[:, ky, :], scan=scan, ky=int(ky), slice_=s, flags=flags, centre=nro // 2,
                                     position=position, uid=uid, dirs=dirs))
            scan += 1
    return {
        "header": header,
        "xml": xml,
        "acquisitions": acqs,
        "phantom": (images * scale).astype(np.complex64),
        "csm": np.repeat(maps[None], nslices, axis=0).astype(np.complex64),
        "mask": lines,
        "kspace": kspaces,
        "image": images,
        "scale": scale,
    }


def _to_compound(a: np.ndarray) -> np.ndarray:
    out = np.empty(a.shape, COMPLEX_DTYPE)
    out["real"] = a.real
    out["imag"] = a.imag
    return out


def write_raw(path: str | Path, sim: dict[str, Any], group: str = "dataset", attrs: dict[str, Any] | None = None) -> None:
    """Write the simulated scan as an ISMRMRD raw file (+ ``phantom``/``csm`` ground truth, gzip)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        path.unlink()
    acq_dtype = ismrmrd.hdf5.acquisition_dtype
    head_dtype = ismrmrd.hdf5.acquisition_header_dtype
    acqs = sim["acquisitions"]
    table = np.empty((len(acqs),), dtype=acq_dtype)
    for i, acq in enumerate(acqs):
        table[i]["head"] = np.frombuffer(acq.getHead(), dtype=head_dtype)[0]
        table[i]["data"] = acq.data.view(np.float32).reshape(-1)
        table[i]["traj"] = acq.traj.view(np.float32).reshape(-1)
    with h5py.File(str(path), "w") as f:
        g = f.create_group(group)
        x = g.create_dataset("xml", shape=(1,), dtype=h5py.special_dtype(vlen=bytes))
        x[0] = sim["xml"].encode()
        g.create_dataset("data", data=table, maxshape=(None,), chunks=True)
        for name in ("phantom", "csm"):
            d = g.create_dataset(name, data=_to_compound(sim[name]), compression="gzip", compression_opts=6,
                                 shuffle=True)
            d.attrs["units"] = "whitened data units" if name == "phantom" else "sum_c |S_c|^2 = 1"
        g["phantom"].attrs["ground_truth_scale"] = float(sim["scale"])
        for k, v in (attrs or {}).items():
            g.attrs[k] = v


def read_ground_truth(path: str | Path, group: str = "dataset") -> tuple[np.ndarray, np.ndarray | None]:
    """(phantom (S, ny, nx) complex64, csm (S, C, ny, nx) complex64 or None) stored beside a raw scan."""
    with h5py.File(str(path), "r") as f:
        g = f[group]
        if "phantom" not in g:
            raise SimulateError(f"{path}: no '{group}/phantom' ground truth")

        def c(d: Any) -> np.ndarray:
            a = d[()]
            return (a["real"] + 1j * a["imag"]).astype(np.complex64)

        return c(g["phantom"]), (c(g["csm"]) if "csm" in g else None)


# ------------------------------------------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", help="magnitude image: .npy, .nii/.nii.gz, .png/.jpg, .dcm (2-D, 3-D, or 4-D with --volume)")
    parser.add_argument("-o", "--output", required=True, help="output ISMRMRD raw .h5 (replaced if it exists)")
    parser.add_argument("--coils", type=int, default=8, help="number of birdcage coils (default 8)")
    parser.add_argument("--accel", type=float, default=4.0,
                        help="acceleration: the true one of the line mask, or R for --mask grappa (default 4)")
    parser.add_argument("--mask", default="random", choices=MASKS,
                        help="line mask: random (uniform), equispaced, gaussian (variable density), grappa (a "
                             "scanner's GRAPPA pattern: every R-th line + ACS, R = --accel; what Gadgetron's "
                             "GRAPPA chains need); default random")
    parser.add_argument("--acs", type=int, default=24, help="fully sampled centre lines (default 24)")
    parser.add_argument("--sigma", type=float, default=0.005,
                        help="noise std of each of real/imag, relative to the image max 1 (default 0.005)")
    parser.add_argument("--seed", type=int, default=0, help="seed of phase, mask and noise (default 0)")
    parser.add_argument("--ro-oversampling", type=int, default=2, choices=(1, 2),
                        help="readout oversampling factor (default 2, as scanners acquire)")
    parser.add_argument("--slices", type=int, default=1, help="number of slices (default 1)")
    parser.add_argument("--noise-samples", type=int, default=256, help="samples of the noise scan (default 256)")
    parser.add_argument("--axis", type=int, default=2, help="slice axis of a 3-D volume (default 2)")
    parser.add_argument("--index", type=int, default=None, help="centre slice index in a 3-D volume (default: the middle)")
    parser.add_argument("--volume", type=int, default=None, help="volume of a 4-D NIfTI (required for more than one)")
    parser.add_argument("--orientation", default="axial", choices=ORIENTATIONS,
                        help="slice orientation (default axial; oblique = axial tilted 25 deg about L-R, 15 deg about A-P)")
    parser.add_argument("--offset", default="0,0,0", metavar="X,Y,Z",
                        help="FOV centre of the middle slice in LPS patient coordinates, mm (default 0,0,0)")
    parser.add_argument("--pixel-mm", default=f"{PIXEL_MM:g}", metavar="DY[,DX]",
                        help=f"pixel size: phase-encode rows DY, readout columns DX (default {PIXEL_MM:g})")
    parser.add_argument("--slice-mm", type=float, default=SLICE_MM, help=f"slice thickness (default {SLICE_MM:g})")
    parser.add_argument("--slice-spacing", type=float, default=None,
                        help="centre-to-centre slice distance, mm (default: the thickness)")
    parser.add_argument("--slice-order", default="ascending", choices=SLICE_ORDERS,
                        help="how the slice counter maps to position along slice_dir (default ascending)")
    parser.add_argument("-G", "--group", default="dataset", help="HDF5 group (default dataset)")


DATA_ERRORS = (SimulateError,)  # SimulateOptionError is a UsageError: exit 2


def _floats(option: str, text: str, lo: int, hi: int) -> list[float]:
    """'1,2.5' -> [1.0, 2.5] with lo..hi values (SimulateOptionError naming the option otherwise)."""
    try:
        vals = [float(v) for v in text.split(",")]
    except ValueError:
        vals = []
    if not lo <= len(vals) <= hi:
        n = str(lo) if lo == hi else f"{lo} or {hi}"
        raise SimulateOptionError(f"{option} needs {n} comma-separated numbers, got '{text}'")
    return vals


def run(args: argparse.Namespace) -> int:
    if args.slices < 1:
        raise SimulateOptionError(f"--slices must be >= 1, got {args.slices}")
    offset = _floats("--offset", args.offset, 3, 3)
    pixel = _floats("--pixel-mm", args.pixel_mm, 1, 2)
    mag = load_image(args.image, axis=args.axis, index=args.index, slices=args.slices, volume=args.volume)
    sim = simulate(mag, coils=args.coils, accel=args.accel, mask_kind=args.mask, acs=args.acs, sigma=args.sigma,
                   seed=args.seed, ro_oversampling=args.ro_oversampling, noise_samples=args.noise_samples,
                   orientation=args.orientation, offset_mm=tuple(offset),
                   pixel_mm=(pixel[0], pixel[-1]), slice_mm=args.slice_mm, slice_spacing_mm=args.slice_spacing,
                   slice_order=args.slice_order)
    write_raw(args.output, sim, args.group, attrs={"source_image": Path(args.image).name})
    log.info("wrote %s: %d slices %dx%d, %d coils, %d acquisitions (%.1f MB); ground truth scale %.4g",
             args.output, mag.shape[0], mag.shape[1], mag.shape[2], args.coils, len(sim["acquisitions"]),
             Path(args.output).stat().st_size / 1e6, sim["scale"])
    return 0
