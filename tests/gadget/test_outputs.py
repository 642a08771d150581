"""What a user takes away from replay: DICOM and NIfTI with the right geometry, honest labels, pictures.

The geometry is proven end to end and against independent tools: a bright dot simulated at known LPS patient
coordinates (ISMRMRD's frame) must land, after replay -> DICOM -> Debian dcm2niix -> NIfTI, at the RAS
coordinates (-x, -y, z); our own NIfTI must equal dcm2niix's (affine and voxels); dicom3tools' dciodvfy must
find no errors. Axial, coronal, sagittal and oblique multi-slice scans, with non-square pixels and matrices
(rows vs columns) and three slice orders (slice direction and sorting).
"""
from __future__ import annotations

import glob
import json
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from scoremri.gadget.files.dicom import DicomWriter
from scoremri.gadget.files.geometry import direction_letters, edge_letters, planes
from scoremri.gadget.files.nifti import NiftiError, NiftiWriter
from scoremri.gadget.files.rawfile import read_images, read_raw
from scoremri.gadget.files.replay import replay
from scoremri.gadget.files.simulate import orientation_dirs, simulate, slice_offsets, write_raw
from scoremri.gadget.images import AI_LABEL, CLASSICAL_LABEL

NY, NX, S = 40, 56, 3  # rows (phase encodes) != columns (readout)
DY, DX = 1.5, 1.0  # row spacing != column spacing
THICK, GAP = 4.0, 6.0
OFFSET = (12.0, -25.0, 31.0)
DOTS = [(6, 44), (20, 9), (31, 30)]  # (row, col) of the bright dot of each slice


def _phantom() -> np.ndarray:
    mag = np.zeros((S, NY, NX), np.float32)
    yy, xx = np.mgrid[:NY, :NX]
    for s, (r, c) in enumerate(DOTS):
        mag[s][((yy - NY / 2) / 15) ** 2 + ((xx - NX / 2) / 22) ** 2 < 1] = 0.2 + 0.05 * s
        mag[s, r, c] = 1.0
    return mag


def _scan(path: Path, orientation: str, order: str) -> dict:
    sim = simulate(_phantom(), coils=2, accel=1, acs=NY, sigma=1e-4, seed=3, ro_oversampling=1,
                   orientation=orientation, offset_mm=OFFSET, pixel_mm=(DY, DX), slice_mm=THICK,
                   slice_spacing_mm=GAP, slice_order=order)
    write_raw(path, sim)
    return sim


def _dot_lps(orientation: str, order: str, s: int) -> np.ndarray:
    """Where the simulator put slice s's dot, in LPS: the ISMRMRD convention (pixel n // 2 at the position)."""
    read, phase, slc = orientation_dirs(orientation)
    r, c = DOTS[s]
    centre = np.array(OFFSET) + slc * slice_offsets(S, GAP, order)[s]
    return centre + read * (c - NX // 2) * DX + phase * (r - NY // 2) * DY


def _dcm2niix(exe: str, folder: Path, out: Path) -> nib.Nifti1Image:
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run([exe, "-z", "n", "-f", "ref", "-o", str(out), str(folder)], check=True, capture_output=True)
    (nii,) = glob.glob(str(out / "ref*.nii"))
    return nib.load(nii)


def _errors(exe: str, path: Path) -> list[str]:
    r = subprocess.run([exe, str(path)], capture_output=True, text=True)
    return [ln for ln in (r.stdout + r.stderr).splitlines() if ln.startswith("Error")]


CASES = [("axial", "ascending"), ("coronal", "descending"), ("sagittal", "interleaved"), ("oblique", "descending")]


@pytest.mark.parametrize("orientation, order", CASES)
def test_dicom_and_nifti_geometry_against_dcm2niix(tmp_path, orientation, order, dcm2niix, dciodvfy):
    raw = tmp_path / "raw.h5"
    _scan(raw, orientation, order)
    out = replay(raw, dicom=tmp_path / "dcm", nifti=tmp_path / "ours.nii.gz", preset="zero_filled", progress=False)
    (files,) = out["dicom"].values()
    assert len(files) == S
    read, phase, slc = orientation_dirs(orientation)
    by_slice = {}
    for f in files:
        ds = pydicom.dcmread(f)
        by_slice[int(ds.InstanceNumber) - 1] = ds  # image_index follows the slice counter here
        assert ds.SOPClassUID == pydicom.uid.MRImageStorage and ds.Modality == "MR"
        assert (ds.Rows, ds.Columns) == (NY, NX)
        assert [float(v) for v in ds.PixelSpacing] == [DY, DX]  # (row spacing, column spacing)
        np.testing.assert_allclose([float(v) for v in ds.ImageOrientationPatient], np.r_[read, phase], atol=1e-7)
        assert float(ds.SliceThickness) == THICK and float(ds.SpacingBetweenSlices) == pytest.approx(GAP)
        assert list(ds.ImageType) == ["DERIVED", "SECONDARY", "OTHER"]
        assert _errors(dciodvfy, f) == []
    for s, ds in by_slice.items():
        # the dot, found in the DICOM pixels, lies where the simulator put it (IPP = centre of voxel (0, 0))
        px = ds.pixel_array.astype(float) * float(ds.RescaleSlope)
        r, c = np.unravel_index(np.argmax(px), px.shape)
        assert (r, c) == DOTS[s]
        ipp = np.array([float(v) for v in ds.ImagePositionPatient])
        np.testing.assert_allclose(ipp + read * c * DX + phase * r * DY, _dot_lps(orientation, order, s), atol=1e-3)
    # dcm2niix: the same voxels under the same affine as ours, and the dot at RAS = diag(-1, -1, 1) LPS
    ref = _dcm2niix(dcm2niix, files[0].parent, tmp_path / "d2n")
    ours = nib.load(tmp_path / "ours.nii.gz")
    assert ours.shape == ref.shape == (NX, NY, S)
    np.testing.assert_allclose(ours.affine, ref.affine, atol=1e-4)
    assert nib.aff2axcodes(ours.affine) == nib.aff2axcodes(ref.affine)
    a, b = ours.get_fdata(), ref.get_fdata()
    assert np.abs(a - b).max() <= 0.51 * float(by_slice[0].RescaleSlope) + 1e-9  # half a stored step
    for img in (ours, ref):
        vol = img.get_fdata()
        for k in range(S):
            i, j = np.unravel_index(np.argmax(vol[:, :, k]), vol.shape[:2])
            ras = (img.affine @ [i, j, k, 1])[:3]
            hits = [s for s in range(S) if np.allclose(ras, _dot_lps(orientation, order, s) * [-1, -1, 1], atol=1e-3)]
            assert len(hits) == 1, (orientation, order, k, ras)
    hdr = ours.header
    assert int(hdr["qform_code"]) == 1 and int(hdr["sform_code"]) == 1


def test_orientation_letters_and_dcm2niix_axis_codes():
    """Letters beside the picture edges and the NIfTI axis codes name the patient directions of each plane."""
    from types import SimpleNamespace

    def head(orientation: str) -> SimpleNamespace:
        read, phase, slc = orientation_dirs(orientation)
        return SimpleNamespace(matrix_size=(NX, NY, 1), field_of_view=(NX * DX, NY * DY, THICK), read_dir=read,
                               phase_dir=phase, slice_dir=slc, position=(0, 0, 0), image_index=1,
                               image_series_index=1, measurement_uid=0)

    expect = {
        "axial": {"left": "R", "right": "L", "top": "A", "bottom": "P"},
        "coronal": {"left": "R", "right": "L", "top": "S", "bottom": "I"},
        "sagittal": {"left": "A", "right": "P", "top": "S", "bottom": "I"},
    }
    for name, edges in expect.items():
        assert edge_letters(planes(head(name))[0]) == edges
    ob = edge_letters(planes(head("oblique"))[0])
    assert ob["right"][0] == "L" and ob["bottom"][0] == "P" and len(ob["right"]) > 1  # oblique: several letters
    assert direction_letters((0, 0.6, -0.8)) == "FP"


def _learned_scan(tmp_path: Path) -> Path:
    mag = _phantom()
    sim = simulate(mag, coils=2, accel=2, acs=12, sigma=2e-3, seed=0, ro_oversampling=1, orientation="coronal",
                   offset_mm=OFFSET, pixel_mm=(DY, DX), slice_mm=THICK, slice_spacing_mm=GAP)
    raw = tmp_path / "raw.h5"
    write_raw(raw, sim)
    return raw


# two steps on a phantom leave 2.3-2.7 x the noise level: the sanity check (tests/recon/test_sanity.py) would
# rightly send SENSE; the labels of a learned image are under test here
FAST = {"sampler.steps": "2", "sampler.samples": "2", "output.uncertainty": "true", "sampler.sanity": "false"}


def test_labels_dicom_nifti_png_compare_learned_vs_classical(tmp_path, dciodvfy, monkeypatch):
    """A learned method's images (and std maps) carry the AI label in ImageComments, SeriesDescription, the
    NIfTI description and sidecar and the PNG text; SENSE and zero-filled images carry none. --compare's
    zero-filled and SENSE panels are exactly what replay gives for those presets."""
    from scoremri.gadget.files import compare as cmp_mod

    seen: dict[str, list] = {"zero_filled": [], "sense": [], "std": []}
    original = cmp_mod.CompareWriter._picture

    def spy(self, rec, lab, plane, zf, sense, sent, std):
        seen["zero_filled"].append(zf)
        seen["sense"].append(sense)
        seen["std"].append(std)
        return original(self, rec, lab, plane, zf, sense, sent, std)

    monkeypatch.setattr(cmp_mod.CompareWriter, "_picture", spy)
    raw = _learned_scan(tmp_path)
    ai = replay(raw, tmp_path / "ai.h5", preset="fast", overrides=FAST, progress=False, dicom=tmp_path / "dcm",
                nifti=tmp_path / "ai.nii", png=tmp_path / "png", compare=tmp_path / "cmp")
    assert ai["images"] == {1: S, 2: S} and ai["report"]["methods"] == {"fast": S}
    classical = {m: replay(raw, tmp_path / f"{m}.h5", preset=m, progress=False, dicom=tmp_path / "dcm",
                           nifti=tmp_path / f"{m}.nii") for m in ("sense", "zero_filled")}
    folders = sorted(p.name for p in (tmp_path / "dcm").iterdir())
    assert folders == ["series_001_fast", "series_001_sense", "series_001_zero_filled", "series_002_fast"]
    uids = set()
    for folder in folders:
        learned = folder.endswith("fast")
        for f in sorted((tmp_path / "dcm" / folder).glob("*.dcm")):
            ds = pydicom.dcmread(f)
            uids.add(ds.SeriesInstanceUID)
            assert ("AI-generated" in ds.SeriesDescription) == learned
            assert ds.ImageComments.startswith(AI_LABEL if learned else CLASSICAL_LABEL)
            assert ds.SeriesDescription.startswith("scoremri_simulate scoremri")
            if folder == "series_002_fast":
                assert "std" in ds.SeriesDescription and "pixel-wise std" in ds.ImageComments
        assert _errors(dciodvfy, f) == []
    assert len(uids) == 4  # one series per output series and per reconstruction
    side = json.loads((tmp_path / "ai.json").read_text())
    assert side["AIGenerated"] is True and side["Methods"] == ["fast"]
    assert json.loads((tmp_path / "ai_std.json").read_text())["Role"] == "std"
    assert b"AI-generated" in nib.load(tmp_path / "ai.nii").header["descrip"].tobytes()
    for m in classical:
        side = json.loads((tmp_path / f"{m}.json").read_text())
        assert side["AIGenerated"] is False and side["Methods"] == [m]
        assert b"AI" not in nib.load(tmp_path / f"{m}.nii").header["descrip"].tobytes()
    from PIL import Image

    pngs = sorted((tmp_path / "png").glob("*.png"))
    assert [p.name for p in pngs] == [f"ai_s{s}_{i:03d}.png" for s in (1, 2) for i in (1, 2, 3)]
    for p in pngs:
        text = Image.open(p).text
        assert text["AIGenerated"] == "true" and "NFE" in text["Description"] and text["Comment"].startswith(AI_LABEL)
    cmp = sorted((tmp_path / "cmp").glob("*.png"))
    assert [p.name for p in cmp] == [f"ai_compare_{i:03d}.png" for i in (1, 2, 3)]
    assert Image.open(cmp[0]).width > 5 * 192  # five panels side by side
    for m in ("zero_filled", "sense"):
        ref = [im.data[0, 0] for im in read_images(tmp_path / f"{m}.h5")[1]]
        assert len(seen[m]) == len(ref) == S
        for a, b in zip(seen[m], ref):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-4 * np.abs(b).max())
    assert all(x is not None and x.shape == (NY, NX) for x in seen["std"])


def test_dicom_identity_uids_and_anonymise(tmp_path):
    """Patient/study fields come from the header; UIDs are deterministic (same input and settings -> same UIDs,
    another preset -> another series); --anonymise leaves no identity and re-derives every UID."""
    import ismrmrd.xsd as xsd

    raw = tmp_path / "raw.h5"
    sim = _scan(raw, "axial", "ascending")
    h = sim["header"]
    h.subjectInformation = xsd.subjectInformationType(patientName="Doe^Jane", patientID="PID-4711",
                                                      patientBirthdate="1970-05-04", patientGender="F",
                                                      patientWeight_kg=61.5)
    h.studyInformation = xsd.studyInformationType(studyDate="2024-02-03", studyTime="10:11:12", studyID="ST9",
                                                  accessionNumber=123456, studyDescription="brain research")
    h.measurementInformation.seriesDate = "2024-02-03"
    h.acquisitionSystemInformation.institutionName = "Example Hospital"
    sim["xml"] = xsd.ToXML(h).decode() if isinstance(xsd.ToXML(h), bytes) else xsd.ToXML(h)
    write_raw(raw, sim)

    def run(name: str, preset: str = "zero_filled", anonymise: bool = False) -> list[pydicom.Dataset]:
        out = replay(raw, preset=preset, dicom=tmp_path / name, anonymise=anonymise, progress=False)
        return [pydicom.dcmread(f) for f in next(iter(out["dicom"].values()))]

    a, b, c, anon = run("a"), run("b"), run("c", "sense"), run("anon", anonymise=True)
    d = a[0]
    assert (str(d.PatientName), d.PatientID, d.PatientBirthDate, d.PatientSex) == ("Doe^Jane", "PID-4711", "19700504", "F")
    assert (d.StudyDate, d.StudyTime, d.StudyID, d.AccessionNumber) == ("20240203", "101112", "ST9", "123456")
    assert d.InstitutionName == "Example Hospital" and d.PatientPosition == "HFS"
    assert [x.SOPInstanceUID for x in a] == [x.SOPInstanceUID for x in b]
    assert a[0].SeriesInstanceUID == b[0].SeriesInstanceUID != c[0].SeriesInstanceUID
    assert a[0].StudyInstanceUID == c[0].StudyInstanceUID and a[0].FrameOfReferenceUID == c[0].FrameOfReferenceUID
    assert len({x.SOPInstanceUID for x in a}) == S
    for x in anon:
        text = str(x)
        for secret in ("Doe", "PID-4711", "1970", "2024", "Example Hospital", "123456", "ST9"):
            assert secret not in text, secret
        assert x.PatientIdentityRemoved == "YES" and x.PatientName == "ANONYMOUS"
        for uid in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID"):
            assert getattr(x, uid) not in {getattr(y, uid) for y in a}
    assert len({x.PatientID for x in anon}) == 1


def test_shepp_logan_generator_file_without_geometry(tmp_path, shepp_logan_generator, dcm2niix, dciodvfy):
    """A raw file the project has not made: 4 repetitions of one slice, no direction cosines. DICOM is valid
    and says the orientation is assumed; NIfTI is 4-D with its orientation marked unknown, the same grid as
    dcm2niix's."""
    subprocess.run([shepp_logan_generator, "-o", str(tmp_path / "sl.h5"), "-r", "4", "-m", "64"], check=True,
                   capture_output=True, cwd=tmp_path)
    out = replay(tmp_path / "sl.h5", preset="sense", progress=False, dicom=tmp_path / "dcm", nifti=tmp_path / "sl.nii")
    (files,) = out["dicom"].values()
    assert len(files) == 4
    for f in files:
        ds = pydicom.dcmread(f)
        assert "orientation assumed axial" in ds.ImageComments and "AI" not in ds.SeriesDescription
        assert _errors(dciodvfy, f) == []
    ours = nib.load(tmp_path / "sl.nii")
    ref = _dcm2niix(dcm2niix, files[0].parent, tmp_path / "d2n")
    assert ours.shape == ref.shape == (64, 64, 1, 4)
    assert int(ours.header["sform_code"]) == 0 and int(ours.header["qform_code"]) == 0  # orientation unknown
    np.testing.assert_allclose(ours.header.get_sform(), ref.affine, atol=1e-4)
    np.testing.assert_allclose(ours.get_fdata(), ref.get_fdata(), atol=ref.dataobj.slope)


def test_nifti_refuses_slices_that_do_not_form_one_grid(tmp_path):
    raw = tmp_path / "raw.h5"
    sim = _scan(raw, "axial", "ascending")
    replay(raw, tmp_path / "o.h5", preset="zero_filled", progress=False)
    imgs = read_images(tmp_path / "o.h5")[1]
    head = imgs[2].getHead()
    head.position[2] += 1.0  # slice gaps 6 and 7 mm
    imgs[2].setHead(head)
    w = NiftiWriter(tmp_path / "x.nii")
    for im in imgs:
        w.add(im)
    with pytest.raises(NiftiError, match="slice gaps differ"):
        w.close()
    assert sim["header"] is not None


def test_dicom_spacing_only_where_slices_are_equidistant(tmp_path):
    raw = tmp_path / "raw.h5"
    _scan(raw, "sagittal", "ascending")
    replay(raw, tmp_path / "o.h5", preset="zero_filled", progress=False)
    _, header, _ = read_raw(raw)
    imgs = read_images(tmp_path / "o.h5")[1]
    head = imgs[2].getHead()
    head.position[0] -= 1.0
    imgs[2].setHead(head)
    w = DicomWriter(tmp_path / "dcm", header)
    for im in imgs:
        w.add(im)
    (paths,) = w.close().values()
    assert all("SpacingBetweenSlices" not in pydicom.dcmread(p) for p in paths)
    slopes = {pydicom.dcmread(p).RescaleSlope for p in paths}
    assert len(slopes) == 1  # one scale for the whole series after close()


def test_3d_image_partitions_become_slices(tmp_path, dcm2niix, dciodvfy):
    """A 3-D image (z partitions along slice_dir, as the core makes for fully sampled E2) becomes one DICOM
    instance per partition, and the same volume as dcm2niix's conversion."""
    import ismrmrd

    from scoremri.gadget.images import IMTYPE_COMPLEX, Label

    rng = np.random.default_rng(0)
    nz = 4
    data = (rng.random((1, nz, NY, NX)) + 0.1).astype(np.complex64)
    img = ismrmrd.Image.from_array(data)
    head = img.getHead()
    read, phase, slc = orientation_dirs("oblique")
    head.read_dir[:], head.phase_dir[:], head.slice_dir[:] = read.tolist(), phase.tolist(), slc.tolist()
    head.position[:] = list(OFFSET)
    head.field_of_view[:] = [NX * DX, NY * DY, nz * 2.5]
    head.image_type, head.image_index, head.image_series_index = IMTYPE_COMPLEX, 1, 1
    img.setHead(head)
    img.data[:] = data
    img.meta = Label(method="sense", requested="sense").meta()
    header = read_raw(_write_axial(tmp_path))[1]
    w, n = DicomWriter(tmp_path / "dcm", header), NiftiWriter(tmp_path / "v.nii")
    w.add(img)
    n.add(img)
    (files,) = w.close().values()
    n.close()
    assert len(files) == nz
    ds = [pydicom.dcmread(f) for f in files]
    assert [float(d.SliceThickness) for d in ds] == [2.5] * nz and float(ds[0].SpacingBetweenSlices) == 2.5
    ipp = np.array([[float(v) for v in d.ImagePositionPatient] for d in ds])
    np.testing.assert_allclose(np.diff(ipp, axis=0), np.tile(slc * 2.5, (nz - 1, 1)), atol=1e-5)
    assert _errors(dciodvfy, files[0]) == []
    ref = _dcm2niix(dcm2niix, files[0].parent, tmp_path / "d2n")
    ours = nib.load(tmp_path / "v.nii")
    np.testing.assert_allclose(ours.affine, ref.affine, atol=1e-4)
    np.testing.assert_allclose(ours.get_fdata(), ref.get_fdata(), atol=ref.dataobj.slope)
    np.testing.assert_allclose(ours.get_fdata()[:, ::-1, :].transpose(2, 1, 0), np.abs(data[0]), atol=1e-6)


def _write_axial(tmp_path: Path) -> Path:
    raw = tmp_path / "hdr.h5"
    _scan(raw, "axial", "ascending")
    return raw


def test_dicom_series_are_finalised_after_a_failure(tmp_path, monkeypatch):
    """A scan that fails after its first slice keeps that slice's DICOM file, finalised (one series scale,
    description); replay still reports the failure."""
    from scoremri.gadget import core
    from scoremri.recon.api import ReconError

    raw = tmp_path / "raw.h5"
    _scan(raw, "coronal", "ascending")
    original = core.reconstruct_batch
    calls = {"n": 0}

    def failing(*args, **kwargs):  # the core's reconstruction of the second slice fails
        calls["n"] += 1
        if calls["n"] == 2:
            raise ReconError("simulated failure on the second slice")
        return original(*args, **kwargs)

    monkeypatch.setattr(core, "reconstruct_batch", failing)
    closed = []
    monkeypatch.setattr(DicomWriter, "close", lambda self, _c=DicomWriter.close: closed.append(_c(self)) or closed[-1])
    with pytest.raises(ReconError, match="second slice"):
        replay(raw, preset="zero_filled", dicom=tmp_path / "dcm", progress=False)
    assert len(closed) == 1 and [len(v) for v in closed[0].values()] == [1]
    (f,) = (tmp_path / "dcm").glob("*/*.dcm")
    assert pydicom.dcmread(f).SeriesDescription.endswith("scoremri zero_filled")
