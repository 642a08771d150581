"""ISMRMRD images -> DICOM MR Image Storage files (pydicom), one DICOM series per image series.

``DicomWriter(directory, header).add(image)`` writes each image as soon as it arrives (one file per 2-D plane,
``<directory>/series_<NNN>_<method>/IM<instance>.dcm``) so an interrupted run keeps what was done;
``close()`` then rewrites the series once with what only the whole series knows: one rescale slope and window
for all its images, the series description (AI-generated only when a learned method made some of its images),
and SpacingBetweenSlices where the slices are equidistant.

- Geometry from the image headers (:mod:`.geometry`): ImagePositionPatient = centre of the first voxel,
  ImageOrientationPatient = (read_dir, phase_dir), PixelSpacing = (row spacing, column spacing), SliceThickness.
- Identity from the ISMRMRD XML header: subjectInformation -> Patient, studyInformation -> Study,
  measurementInformation -> Series / Frame of Reference, acquisitionSystemInformation -> Equipment,
  sequenceParameters -> MR acquisition. Study, Series, SOP Instance and Frame of Reference UIDs are the
  header's own where it has them, else derived deterministically (``2.25.<hash>``) from its measurement and
  study information, the series number and the reconstruction (``recon_id``): the same input and settings
  give the same UIDs; another preset gives another series.
- ``anonymise``: patient name/ID, birth date, sex, age, weight, size, dates and times, institution, station,
  device serial, referring physician, accession number and study ID are removed or replaced, every UID is
  re-derived through a hash, and PatientIdentityRemoved / DeidentificationMethod say so (a subset of the
  DICOM PS3.15 Basic Application Confidentiality Profile for the attributes we write).
- Pixels: magnitude (RSS over channels for multi-channel images), uint16 with RescaleSlope (intercept 0)
  so that slope x stored value = magnitude in the units of the whitened data; WindowCenter / WidthWidth from
  the 99.5th percentile of the series. ImageType DERIVED\\SECONDARY (std maps: DERIVED\\SECONDARY\\OTHER).
- Labels (:func:`scoremri.gadget.images.image_label`): ImageComments = the image's ImageComment;
  SeriesDescription carries "AI-generated" only where a learned method made images of the series.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ismrmrd
import numpy as np

from ..images import ROLE_STD, ImageLabel, image_label, scoremri_version, series_description
from .geometry import GUESSED_NOTE, Plane, direction_letters, planes

log = logging.getLogger(__name__)

MAX_STORED = 65535  # uint16, BitsStored 16
WINDOW_PERCENTILE = 99.5


class DicomError(ValueError):
    """An image cannot be written as DICOM; the message names it and the problem."""


def _require_pydicom() -> Any:
    try:
        import pydicom
    except ImportError as e:  # pragma: no cover - pydicom is an install requirement
        raise DicomError("DICOM output needs pydicom (pip install pydicom)") from e
    return pydicom


def _get(obj: Any, *names: str) -> Any:
    """obj.a.b... or None when any part is missing."""
    for n in names:
        if obj is None:
            return None
        obj = getattr(obj, n, None)
    return obj


def _first(v: Any) -> Any:
    if isinstance(v, (list, tuple)) or (hasattr(v, "__len__") and not isinstance(v, (str, bytes))):
        try:
            return v[0] if len(v) else None
        except TypeError:
            return v
    return v


def _text(v: Any, limit: int = 64) -> str:
    if v is None:
        return ""
    return str(v).replace("\\", "/").strip()[:limit]


def _da(v: Any) -> str:
    """xs:date ('2024-03-01') -> DICOM DA ('20240301'); '' when absent or malformed."""
    s = re.sub(r"[^0-9]", "", str(v or ""))[:8]
    return s if len(s) == 8 else ""


def _tm(v: Any) -> str:
    """xs:time ('13:45:07.5') -> DICOM TM ('134507.5')."""
    m = re.match(r"(\d{2}):?(\d{2}):?(\d{2})(\.\d+)?", str(v or ""))
    return "".join(g for g in m.groups() if g)[:16] if m else ""


def _ds(x: float) -> str:
    """A DICOM DS string (at most 16 characters)."""
    s = f"{float(x):.10g}"
    if len(s) > 16:
        s = f"{float(x):.8e}"
        s = s if len(s) <= 16 else f"{float(x):.6e}"
    return s


def _uid(*parts: Any) -> str:
    """A deterministic UID under the UUID-derived root 2.25 (PS3.5 B.2) from the given parts."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode("utf-8")).digest()
    return "2.25." + str(int.from_bytes(digest[:16], "big"))


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)[:32] or "x"


@dataclass
class _Written:
    path: Path
    magnitude: np.ndarray  # (rows, cols) float32
    label: ImageLabel
    plane: Plane
    instance: int
    counters: tuple[int, ...]


@dataclass
class _Series:
    number: int
    folder: Path
    uid: str
    files: list[_Written] = field(default_factory=list)


class DicomWriter:
    """Writes the images of one scan as DICOM MR images under ``directory`` (see the module docstring).

    header: the scan's ismrmrd.xsd.ismrmrdHeader. anonymise: strip patient/study identity. recon_id: a string
    that identifies the reconstruction (preset and settings), part of the Series UIDs."""

    def __init__(self, directory: str | Path, header: Any, *, anonymise: bool = False, recon_id: str = "") -> None:
        self.pydicom = _require_pydicom()
        self.directory = Path(directory)
        self.header = header
        self.anonymise = anonymise
        self.recon_id = recon_id
        self.series: dict[int, _Series] = {}
        self._base = self._base_dataset()

    # ------------------------------------------------------------------------------------------ identity
    def _base_dataset(self) -> Any:
        """Patient, study, series-independent equipment and MR acquisition attributes from the XML header."""
        from pydicom.dataset import Dataset

        h = self.header
        subj, study = _get(h, "subjectInformation"), _get(h, "studyInformation")
        meas, sysinfo = _get(h, "measurementInformation"), _get(h, "acquisitionSystemInformation")
        seq, enc = _get(h, "sequenceParameters"), _first(_get(h, "encoding"))
        measurement_id = _text(_get(meas, "measurementID"), 256)
        # the study part of a Siemens-style measurementID (device_patient_study_meas) identifies the study
        meas_study = "_".join(measurement_id.split("_")[:-1]) if measurement_id.count("_") >= 3 else ""
        keys = [_text(_get(subj, "patientID")), _text(_get(study, "studyID")), _da(_get(study, "studyDate")),
                _tm(_get(study, "studyTime")), _text(_get(study, "accessionNumber")), meas_study]
        if not any(keys):
            import ismrmrd.xsd

            xml = ismrmrd.xsd.ToXML(h)
            keys = [hashlib.sha256(xml if isinstance(xml, bytes) else str(xml).encode()).hexdigest()]
        own_study_uid = _text(_get(study, "studyInstanceUID"), 64)
        study_key = own_study_uid or _uid("scoremri-study", *keys)
        self._study_key = study_key
        self._measurement = measurement_id
        anon = self.anonymise
        self.study_uid = _uid("scoremri-anon-study", study_key) if anon else study_key
        own_for = _text(_get(meas, "frameOfReferenceUID"), 64)
        for_key = own_for or _uid("scoremri-frame", study_key, measurement_id)
        self.frame_uid = _uid("scoremri-anon-frame", for_key) if anon else for_key

        ds = Dataset()
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.SOPClassUID = self.pydicom.uid.MRImageStorage
        ds.Modality = "MR"
        # patient
        if anon:
            ds.PatientName = "ANONYMOUS"
            ds.PatientID = "ANON-" + hashlib.sha256(self.study_uid.encode()).hexdigest()[:10].upper()
            ds.PatientBirthDate, ds.PatientSex = "", ""
            ds.PatientIdentityRemoved = "YES"
            ds.DeidentificationMethod = "scoremri --anonymise: identity removed, UIDs hashed"  # LO: 64 chars
        else:
            ds.PatientName = _text(_get(subj, "patientName"))
            ds.PatientID = _text(_get(subj, "patientID"))
            ds.PatientBirthDate = _da(_get(subj, "patientBirthdate"))
            sex = _text(_get(subj, "patientGender")).upper()
            ds.PatientSex = sex if sex in ("M", "F", "O") else ""
            weight, height = _get(subj, "patientWeight_kg"), _get(subj, "patientHeight_m")
            if weight:
                ds.PatientWeight = _ds(float(weight))
            if height:
                ds.PatientSize = _ds(float(height))
        # study
        ds.StudyInstanceUID = self.study_uid
        ds.StudyDate = "" if anon else _da(_get(study, "studyDate"))
        ds.StudyTime = "" if anon else _tm(_get(study, "studyTime"))
        ds.ReferringPhysicianName = "" if anon else _text(_get(study, "referringPhysicianName"))
        ds.StudyID = "" if anon else _text(_get(study, "studyID"), 16)
        acc = _get(study, "accessionNumber")
        ds.AccessionNumber = "" if anon or acc is None else _text(acc, 16)
        if _get(study, "studyDescription"):
            ds.StudyDescription = _text(_get(study, "studyDescription"))
        if _get(study, "bodyPartExamined"):
            ds.BodyPartExamined = _text(_get(study, "bodyPartExamined"), 16).upper()
        # series (shared part)
        if not anon:
            if _da(_get(meas, "seriesDate")):
                ds.SeriesDate = _da(_get(meas, "seriesDate"))
            if _tm(_get(meas, "seriesTime")):
                ds.SeriesTime = _tm(_get(meas, "seriesTime"))
        self.protocol = _text(_get(meas, "protocolName"))
        if self.protocol:
            ds.ProtocolName = self.protocol
        pos = _get(meas, "patientPosition")
        ds.PatientPosition = str(getattr(pos, "value", pos) or "") if pos is not None else ""
        # frame of reference
        ds.FrameOfReferenceUID = self.frame_uid
        ds.PositionReferenceIndicator = ""
        ds.Laterality = ""
        # equipment
        ds.Manufacturer = _text(_get(sysinfo, "systemVendor"))
        if _get(sysinfo, "systemModel"):
            ds.ManufacturerModelName = _text(_get(sysinfo, "systemModel"))
        if not anon:
            for src, dst in (("institutionName", "InstitutionName"), ("stationName", "StationName"),
                             ("deviceSerialNumber", "DeviceSerialNumber")):
                if _get(sysinfo, src):
                    setattr(ds, dst, _text(_get(sysinfo, src)))
        ds.SoftwareVersions = f"scoremri {scoremri_version()}"
        if _get(sysinfo, "systemFieldStrength_T"):
            ds.MagneticFieldStrength = _ds(float(_get(sysinfo, "systemFieldStrength_T")))
        f0 = _get(h, "experimentalConditions", "H1resonanceFrequency_Hz")
        if f0:
            ds.ImagingFrequency = _ds(float(f0) / 1e6)
        # MR acquisition
        ds.ScanningSequence = "RM"  # research mode: the raw data's sequence type is not a DICOM term
        ds.SequenceVariant = "NONE"
        ds.ScanOptions = ""
        nz = int(_get(enc, "encodedSpace", "matrixSize", "z") or 1)
        ds.MRAcquisitionType = "3D" if nz > 1 else "2D"
        for src, dst in (("TR", "RepetitionTime"), ("TE", "EchoTime"), ("TI", "InversionTime"),
                         ("flipAngle_deg", "FlipAngle")):
            v = _first(_get(seq, src))
            if v is not None:
                setattr(ds, dst, _ds(float(v)))
            elif dst in ("RepetitionTime", "EchoTime"):
                setattr(ds, dst, "")
        etl = _get(enc, "echoTrainLength")
        ds.EchoTrainLength = str(int(etl)) if etl else ""
        if _get(seq, "sequence_type"):
            ds.SequenceName = _text(_get(seq, "sequence_type"), 16)
        ds.BurnedInAnnotation = "NO"
        return ds

    # ------------------------------------------------------------------------------------------ images
    def _series_for(self, number: int, label: ImageLabel) -> _Series:
        s = self.series.get(number)
        if s is None:
            uid = _uid("scoremri-series", self._study_key, self._measurement, number, label.requested,
                       self.recon_id, "anon" if self.anonymise else "")
            folder = self.directory / f"series_{number:03d}_{_slug(label.requested)}"
            folder.mkdir(parents=True, exist_ok=True)
            s = self.series[number] = _Series(number, folder, uid)
        return s

    def add(self, img: ismrmrd.Image) -> list[Path]:
        """Write one ISMRMRD image (one file per z partition); returns the paths."""
        head = img.getHead()
        number = int(head.image_series_index)
        label = image_label(img)
        series = self._series_for(number, label)
        data = np.asarray(img.data)
        if data.ndim != 4:
            raise DicomError(f"image {head.image_index} of series {number}: data must be (cha, z, y, x), "
                             f"got shape {data.shape}")
        mag = np.sqrt(np.sum(np.abs(data) ** 2, axis=0)) if data.shape[0] > 1 else np.abs(data[0])
        mag = np.nan_to_num(mag.astype(np.float32))
        nz = mag.shape[0]
        index = int(head.image_index) or (len(series.files) // max(nz, 1) + 1)
        counters = tuple(int(getattr(head, f)) for f in ("contrast", "phase", "repetition", "set", "average", "slice"))
        paths = []
        for p, plane in enumerate(planes(head)):
            instance = (index - 1) * nz + p + 1
            w = _Written(series.folder / f"IM{instance:05d}.dcm", mag[p], label, plane, instance, counters)
            series.files.append(w)
            labels = [f.label for f in series.files]
            self._write(w, series, scale=self._scale([w.magnitude]), desc=series_description(labels, self.protocol))
            paths.append(w.path)
        return paths

    @staticmethod
    def _scale(mags: list[np.ndarray]) -> tuple[float, float, float]:
        """(slope, window centre, window width) for magnitudes ``mags`` (slope x stored = magnitude)."""
        top = max(float(m.max()) for m in mags) if mags else 0.0
        slope = top / MAX_STORED if top > 0 else 1.0
        vals = np.concatenate([m.ravel() for m in mags])
        vals = vals[vals > 0]
        hi = float(np.percentile(vals, WINDOW_PERCENTILE)) if vals.size else 1.0
        hi = hi if hi > 0 else 1.0
        return slope, hi / 2.0, hi

    def _write(self, w: _Written, series: _Series, *, scale: tuple[float, float, float], desc: str,
               spacing: float | None = None) -> None:
        from pydicom.dataset import FileDataset, FileMetaDataset
        from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID

        slope, centre, width = scale
        plane = w.plane
        sop_uid = _uid("scoremri-instance", series.uid, w.instance)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = self.pydicom.uid.MRImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds = FileDataset(str(w.path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.update(self._base)
        ds.SOPInstanceUID = sop_uid
        ds.SeriesInstanceUID = series.uid
        ds.SeriesNumber = str(series.number)
        ds.InstanceNumber = str(w.instance)
        ds.AcquisitionNumber = str(w.counters[2] + 1)  # repetition
        ds.EchoNumbers = str(w.counters[0] + 1)  # contrast
        ds.SeriesDescription = desc
        ds.ImageType = ["DERIVED", "SECONDARY", "OTHER"]
        ds.ImageComments = (w.label.comment + (f" | {GUESSED_NOTE}" if w.plane.guessed else ""))[:10240]
        ds.DerivationDescription = (f"scoremri {w.label.method} reconstruction of raw k-space"
                                    + (" (pixel-wise std of posterior samples)" if w.label.role == ROLE_STD else ""))[:1024]
        if not self.anonymise:
            now = _dt.datetime.now()
            ds.ContentDate, ds.ContentTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
        else:
            ds.ContentDate, ds.ContentTime = "", ""
        # geometry
        ds.ImagePositionPatient = [_ds(v) for v in plane.origin]
        ds.ImageOrientationPatient = [_ds(round(v, 8)) for v in plane.orientation]
        ds.PixelSpacing = [_ds(plane.spacing[0]), _ds(plane.spacing[1])]
        ds.SliceThickness = _ds(plane.thickness)
        if spacing is not None:
            ds.SpacingBetweenSlices = _ds(spacing)
        ds.SliceLocation = _ds(plane.distance)
        ds.PatientOrientation = [direction_letters(plane.row_dir), direction_letters(plane.col_dir)]
        # pixels
        rows, cols = w.magnitude.shape
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        stored = np.clip(np.rint(w.magnitude / slope), 0, MAX_STORED).astype("<u2")
        ds.PixelData = stored.tobytes()
        ds.RescaleIntercept = "0"
        ds.RescaleSlope = _ds(slope)
        ds.WindowCenter = _ds(centre)
        ds.WindowWidth = _ds(width)
        if width < 1:  # LINEAR needs a width >= 1 (PS3.3 C.11.2.1.2); LINEAR_EXACT takes any width > 0
            ds.VOILUTFunction = "LINEAR_EXACT"
        ds.WindowCenterWidthExplanation = f"{WINDOW_PERCENTILE:g}th percentile of the series"
        ds.save_as(str(w.path), enforce_file_format=True)

    # ------------------------------------------------------------------------------------------ finish
    def close(self) -> dict[int, list[Path]]:
        """Rewrite every series with its final slope, window, description and slice spacing; returns
        {series number: paths}."""
        out: dict[int, list[Path]] = {}
        for series in self.series.values():
            files = series.files
            if not files:
                continue
            scale = self._scale([f.magnitude for f in files])
            desc = series_description([f.label for f in files], self.protocol)
            spacing = _equidistant(files)
            for f in files:
                self._write(f, series, scale=scale, desc=desc, spacing=spacing)
            out[series.number] = [f.path for f in files]
            log.info("DICOM series %d (%s): %d images in %s", series.number, desc, len(files), series.folder)
        return out


def _equidistant(files: list[_Written]) -> float | None:
    """The distance between adjacent slice planes when a series' planes are parallel and equidistant (the
    meaning of SpacingBetweenSlices), else None."""
    normal = files[0].plane.normal
    if any(abs(float(np.dot(f.plane.normal, normal))) < 1 - 1e-4 for f in files):
        return None
    d = np.unique(np.round([f.plane.distance for f in files], 3))
    if d.size < 2:
        return None
    gaps = np.diff(d)
    if np.ptp(gaps) > 1e-2:
        return None
    return round(float(gaps.mean()), 4)  # positions are float32: no spurious digits





class ScanDicomSink:
    """``scoremri serve --dicom-dir``: the DICOM series of one streamed scan under ``<root>/<scan folder>``.

    The folder is ``<YYYYmmdd-HHMMSS>_<10 hex>`` (the hash of the study and measurement: no identity in the
    name). It never raises: the scanner chain comes first, so a failed write is logged once and the sink
    stops writing for that scan; the images still go back to the scanner."""

    def __init__(self, root: str | Path, header: Any, *, anonymise: bool = False, recon_id: str = "") -> None:
        self.writer: DicomWriter | None = None
        self.folder: Path | None = None
        self.files = 0
        try:
            import time

            w = DicomWriter(Path(root), header, anonymise=anonymise, recon_id=recon_id)
            tag = hashlib.sha256(f"{w.study_uid}|{w._measurement}|{recon_id}".encode()).hexdigest()[:10]
            self.folder = Path(root) / f"{time.strftime('%Y%m%d-%H%M%S')}_{tag}"
            w.directory = self.folder
            self.writer = w
        except Exception as e:  # a header pydicom cannot take, a missing package: log, send images anyway
            log.error("DICOM output disabled for this scan: %s: %s", type(e).__name__, e)

    def add(self, img: ismrmrd.Image) -> None:
        if self.writer is None:
            return
        try:
            self.files += len(self.writer.add(img))
        except Exception as e:
            log.error("DICOM output stopped for this scan after %d files in %s: %s: %s", self.files, self.folder,
                      type(e).__name__, e)
            self.writer = None

    def close(self) -> dict[int, list[Path]]:
        if self.writer is None:
            return {}
        try:
            out = self.writer.close()
            log.info("DICOM: %d files of %d series in %s", self.files, len(out), self.folder)
            return out
        except Exception as e:
            log.error("DICOM output of %s could not be finalised: %s: %s", self.folder, type(e).__name__, e)
            return {}
        finally:
            self.writer = None
__all__ = ["DicomError", "DicomWriter", "ScanDicomSink"]
