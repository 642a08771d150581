"""scoremri simulate: strict header, acquisitions and flags, ground truth in whitened units."""
from __future__ import annotations

from pathlib import Path

import h5py
import ismrmrd
import ismrmrd.xsd
import numpy as np
import pytest

from scoremri.gadget.cli import main
from scoremri.gadget.files.rawfile import read_raw
from scoremri.gadget.gadgetron.preprocess import noise_prewhitener, preprocess
from scoremri.gadget.files.simulate import SimulateError, load_image, read_ground_truth, simulate, write_raw
from scoremri.recon.fft import ifft2c


def small_t1(dipy_t1: np.ndarray, n: int) -> np.ndarray:
    f = dipy_t1.shape[0] // n
    img = dipy_t1[: n * f, : n * f].reshape(n, f, n, f).mean(axis=(1, 3))
    return (img / img.max()).astype(np.float32)


@pytest.fixture(scope="module")
def sim64(dipy_t1):
    return simulate(small_t1(dipy_t1, 64), coils=4, accel=4, acs=8, sigma=0.01, seed=3, ro_oversampling=2)


def test_header_is_complete_and_strict(sim64, tmp_path):
    write_raw(tmp_path / "a.h5", sim64)
    xml, header, acqs = read_raw(tmp_path / "a.h5")
    assert "<version>" not in xml and not xml.endswith("\x00")
    h = ismrmrd.xsd.CreateFromDocument(xml)  # strict 1.15 classes
    assert h.measurementInformation.measurementID and h.measurementInformation.patientPosition.value == "HFS"
    assert h.acquisitionSystemInformation.receiverChannels == 4
    assert h.sequenceParameters.TR and h.sequenceParameters.TE
    enc = h.encoding[0]
    assert enc.trajectory.value == "cartesian"
    assert enc.parallelImaging.accelerationFactor.kspace_encoding_step_1 == 4
    assert enc.parallelImaging.calibrationMode.value == "embedded"
    assert (enc.encodedSpace.matrixSize.x, enc.reconSpace.matrixSize.x) == (128, 64)
    assert enc.encodedSpace.fieldOfView_mm.x == 2 * enc.reconSpace.fieldOfView_mm.x
    assert enc.encodingLimits.kspace_encoding_step_1.center == 32
    assert enc.encodingLimits.kspace_encoding_step_1.maximum == 63
    # the serialised header parses back identically
    assert ismrmrd.xsd.ToXML(ismrmrd.xsd.CreateFromDocument(xml)) == ismrmrd.xsd.ToXML(h)


def test_acquisitions_flags_and_geometry(sim64):
    acqs = sim64["acquisitions"]
    noise = acqs[0]
    assert noise.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT) and noise.sample_time_us > 0
    assert noise.number_of_samples == 256
    lines = acqs[1:]
    assert not any(a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT) for a in lines)
    kys = [a.idx.kspace_encode_step_1 for a in lines]
    assert kys == sorted(np.flatnonzero(sim64["mask"]).tolist())
    assert 64 / len(kys) == pytest.approx(4, rel=0.05)
    acs = [a.idx.kspace_encode_step_1 for a in lines if a.is_flag_set(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING)]
    assert acs == list(range(28, 36))
    assert lines[0].is_flag_set(ismrmrd.ACQ_FIRST_IN_SLICE) and lines[-1].is_flag_set(ismrmrd.ACQ_LAST_IN_SLICE)
    assert lines[-1].is_flag_set(ismrmrd.ACQ_LAST_IN_MEASUREMENT)
    assert sum(a.is_flag_set(ismrmrd.ACQ_FIRST_IN_SLICE) for a in lines) == 1
    for a in lines:
        assert a.number_of_samples == 128 and a.center_sample == 64 and a.active_channels == 4
        assert a.sample_time_us == noise.sample_time_us
        assert tuple(a.read_dir) == (1, 0, 0) and tuple(a.phase_dir) == (0, 1, 0) and tuple(a.slice_dir) == (0, 0, 1)
        assert any(a.patient_table_position)
    # unmeasured lines are exactly zero in the returned k-space; measured ones are the acquisitions
    k = sim64["kspace"][0]
    assert np.abs(k[:, ~sim64["mask"]]).max() == 0
    np.testing.assert_array_equal(k[:, lines[3].idx.kspace_encode_step_1], lines[3].data)


def test_ground_truth_in_whitened_units(dipy_t1, tmp_path):
    """Fully sampled: whiten + remove RO oversampling + coil-combine with the stored csm == stored phantom.

    Derivation: Cov = 2 sigma^2 I, equal dwell times, bandwidth 0.5 -> W = I / (sigma sqrt 2)."""
    sigma = 0.01
    sim = simulate(small_t1(dipy_t1, 64), coils=4, accel=1, acs=8, sigma=sigma, seed=5, ro_oversampling=2,
                   noise_samples=8192)
    path = tmp_path / "full.h5"
    write_raw(path, sim)
    _, header, acqs = read_raw(path)
    W, rep = noise_prewhitener(acqs, header)
    assert rep["scale"] == pytest.approx(1.0)
    np.testing.assert_allclose(np.abs(W), np.eye(4) / (sigma * np.sqrt(2)), atol=0.05 / sigma)
    lines = preprocess(acqs, header, W)
    k = np.zeros((4, 64, 64), np.complex64)
    for a in lines:
        k[:, a.idx.kspace_encode_step_1] = a.data
    import torch

    coil = ifft2c(torch.from_numpy(k)).numpy()
    phantom, csm = read_ground_truth(path)
    assert phantom.shape == (1, 64, 64) and csm.shape == (1, 4, 64, 64)
    comb = (np.conj(csm[0]) * coil).sum(axis=0)
    gt = phantom[0]
    assert np.abs(gt).max() == pytest.approx(1 / (sigma * np.sqrt(2)), rel=1e-5)
    a = np.vdot(comb, gt).real / np.vdot(comb, comb).real
    assert a == pytest.approx(1.0, abs=0.03)  # the scale of the whitened data (noise estimate: ~1 %)
    assert np.linalg.norm(comb - gt) / np.linalg.norm(gt) < 0.06  # noise only (unit complex variance)
    with h5py.File(path) as f:
        assert f["dataset/phantom"].attrs["ground_truth_scale"] == pytest.approx(1 / (sigma * np.sqrt(2)))
        assert f["dataset/phantom"].dtype.names == ("real", "imag")  # as the ismrmrd generator stores it


def test_load_image_formats_and_errors(tmp_path, dipy_t1):
    from PIL import Image

    np.save(tmp_path / "a.npy", dipy_t1 * 7)
    a = load_image(tmp_path / "a.npy")
    assert a.shape == (1, 256, 256) and a.max() == pytest.approx(1.0) and a.min() >= 0
    Image.fromarray((dipy_t1 * 255).astype(np.uint8)).save(tmp_path / "a.png")
    b = load_image(tmp_path / "a.png")
    assert np.abs(b[0] - dipy_t1).max() < 0.01
    import nibabel as nib

    nii = Path(nib.__file__).parent / "tests" / "data" / "example4d.nii.gz"
    v = load_image(nii, axis=2, slices=2, volume=1)
    assert v.ndim == 3 and v.shape[0] == 2 and v.max() == pytest.approx(1.0)
    with pytest.raises(SimulateError, match="2 volumes: choose one with --volume"):
        load_image(nii, axis=2, slices=2)
    with pytest.raises(SimulateError, match="no such image"):
        load_image(tmp_path / "missing.npy")
    np.save(tmp_path / "z.npy", np.zeros((32, 32)))
    with pytest.raises(SimulateError, match="all zero"):
        load_image(tmp_path / "z.npy")
    (tmp_path / "x.txt").write_text("x")
    with pytest.raises(SimulateError, match="unknown image type"):
        load_image(tmp_path / "x.txt")
    with pytest.raises(SimulateError, match="outside"):
        load_image(nii, axis=2, index=0, slices=4, volume=0)


def test_cli_multislice(tmp_path, dipy_t1):
    np.save(tmp_path / "img.npy", small_t1(dipy_t1, 32))
    out = tmp_path / "raw.h5"
    rc = main(["simulate", str(tmp_path / "img.npy"), "-o", str(out), "--coils", "2", "--accel", "2", "--acs", "6",
               "--slices", "2", "--ro-oversampling", "1", "--mask", "equispaced", "--seed", "1"])
    assert rc == 0
    _, header, acqs = read_raw(out)
    assert header.encoding[0].encodingLimits.slice.maximum == 1
    slices = [a.idx.slice for a in acqs if not a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)]
    assert slices.count(0) == slices.count(1) == 16
    assert len({tuple(a.position) for a in acqs[1:]}) == 2  # one position per slice
    phantom, csm = read_ground_truth(out)
    assert phantom.shape == (2, 32, 32) and csm.shape == (2, 2, 32, 32)
    assert not np.allclose(phantom[0], phantom[1])  # independent random phase per slice
    with pytest.raises(SimulateError, match="--coils"):
        simulate(small_t1(dipy_t1, 32), coils=0)


def test_cli_geometry_options(tmp_path, dipy_t1, capsys):
    """--orientation/--offset/--pixel-mm/--slice-spacing/--slice-order reach the header and acquisitions;
    named orientations are right-handed orthonormal frames; malformed values are usage errors (exit 2)."""
    from scoremri.gadget.files.simulate import ORIENTATIONS, orientation_dirs, slice_offsets

    for name in ORIENTATIONS:
        r, p, s = orientation_dirs(name)
        np.testing.assert_allclose(np.array([r, p, s]) @ np.array([r, p, s]).T, np.eye(3), atol=1e-12)
        np.testing.assert_allclose(np.cross(r, p), s, atol=1e-12)
    np.testing.assert_allclose(slice_offsets(4, 2.0, "ascending"), [-3, -1, 1, 3])
    np.testing.assert_allclose(slice_offsets(4, 2.0, "descending"), [3, 1, -1, -3])
    np.testing.assert_allclose(slice_offsets(4, 2.0, "interleaved"), [-3, 1, -1, 3])
    np.save(tmp_path / "img.npy", small_t1(dipy_t1, 32)[:, :24])
    out = tmp_path / "raw.h5"
    rc = main(["simulate", str(tmp_path / "img.npy"), "-o", str(out), "--coils", "2", "--slices", "3",
               "--ro-oversampling", "1", "--orientation", "sagittal", "--offset", "5,-6,7", "--pixel-mm", "2,1.5",
               "--slice-mm", "3", "--slice-spacing", "4", "--slice-order", "descending"])
    assert rc == 0
    _, header, acqs = read_raw(out)
    fov = header.encoding[0].reconSpace.fieldOfView_mm
    assert (fov.x, fov.y, fov.z) == (24 * 1.5, 32 * 2.0, 3.0)  # x = readout = columns, y = phase = rows
    lines = [a for a in acqs if not a.is_flag_set(ismrmrd.ACQ_IS_NOISE_MEASUREMENT)]
    for a in lines:
        assert tuple(a.read_dir) == (0, 1, 0) and tuple(a.phase_dir) == (0, 0, -1) and tuple(a.slice_dir) == (-1, 0, 0)
        np.testing.assert_allclose(a.position, np.array([5, -6, 7]) + np.array([-1, 0, 0]) * [4, 0, -4][a.idx.slice])
    for bad in (["--offset", "1,2"], ["--pixel-mm", "a"], ["--slice-mm", "0"]):
        capsys.readouterr()
        rc = main(["simulate", str(tmp_path / "img.npy"), "-o", str(tmp_path / "x.h5"), *bad])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and bad[0] in err[0], (bad, err)


def test_grappa_mask_grid_flags_and_header(dipy_t1, tmp_path):
    """--mask grappa: every R-th line through the centre + ACS; ACS on the grid calibration-and-imaging, the
    others calibration only (the ISMRMRD convention); header R; replay gives the same image as with every ACS
    line flagged both (calibration lines are measured data either way)."""
    mag = small_t1(dipy_t1, 64)
    sim = simulate(mag, coils=4, accel=4, mask_kind="grappa", acs=12, sigma=0.0, seed=1)
    assert sim["header"].encoding[0].parallelImaging.accelerationFactor.kspace_encoding_step_1 == 4
    lines = np.flatnonzero(sim["mask"])
    grid = set(range(0, 64, 4))  # through ky = 32
    acs = set(range(26, 38))
    assert set(lines.tolist()) == grid | acs
    flags = {a.idx.kspace_encode_step_1: a for a in sim["acquisitions"]}
    for ky, a in flags.items():
        both = a.is_flag_set(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING)
        calib = a.is_flag_set(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION)
        assert (both, calib) == ((ky in acs and ky in grid), (ky in acs and ky not in grid)), ky
    from scoremri.gadget.files.replay import replay
    from scoremri.gadget.files.rawfile import read_images

    write_raw(tmp_path / "g.h5", sim)
    for a in sim["acquisitions"]:
        if a.is_flag_set(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION):
            a.clear_flag(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION)
            a.set_flag(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING)
    write_raw(tmp_path / "all_both.h5", sim)
    for name in ("g", "all_both"):
        replay(tmp_path / f"{name}.h5", tmp_path / f"{name}_out.h5", preset="sense", device="cpu", progress=False)
    a = read_images(tmp_path / "g_out.h5")[1][0].data
    b = read_images(tmp_path / "all_both_out.h5")[1][0].data
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * np.abs(b).max())
    with pytest.raises(SimulateError, match="integer"):
        simulate(mag, accel=2.5, mask_kind="grappa")
