"""Round trips through a real ``python -m gadgetron <port> scoremri.gadget.gadget score_recon`` child over a
loopback socket: the right number of images, complex64, headers from the centre line, the same pixels as
the in-process ReconCore (replay's core), pass-through of other messages."""
from __future__ import annotations

import subprocess
from pathlib import Path

import ismrmrd
import numpy as np

import gadget_data as gd
from scoremri.gadget.files import rawfile
from scoremri.gadget.gadgetron import buffers, pipeline, preprocess
from scoremri.gadget.testing import harness
from scoremri.gadget.core import ReconCore
from scoremri.recon.config import load_config

REPO = Path(__file__).resolve().parents[2]


def _local_images(header, rds, preset: str = "sense"):
    """The in-process core (what replay runs) with the child's thread count (1), image by image."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        core = ReconCore(header, load_config(preset), device="cpu")
        return [im for rd in rds for im in core.process(rd)]
    finally:
        torch.set_num_threads(n)


def _max_rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def _check_headers(images, rds, series: int = 1) -> None:
    assert [im.image_index for im in images] == list(range(1, len(images) + 1))
    for im, rd in zip(images, rds):
        buf = rd.bits[0].data
        acquired = [h for h in buf.headers.flat if h.number_of_samples > 0]
        c1 = int(buf.sampling.sampling_limits[1].center)
        centre = min(acquired, key=lambda h: abs(int(h.idx.kspace_encode_step_1) - c1))
        assert im.data.dtype == np.complex64 and im.image_type == 5 and im.image_series_index == series
        for f in ("position", "read_dir", "phase_dir", "slice_dir", "patient_table_position"):
            np.testing.assert_allclose(list(getattr(im, f)), list(getattr(centre, f)), atol=1e-6)
        for f in ("slice", "contrast", "phase", "repetition", "set", "average"):
            assert getattr(im, f) == getattr(centre.idx, f), f
        np.testing.assert_allclose(list(im.field_of_view), list(buf.sampling.recon_FOV), atol=1e-6)
        assert im.meta["GADGETRON_DataRole"] == "Image"
        assert "AI-generated" not in im.meta["GADGETRON_ImageComment"]  # SENSE: classical, not AI
        assert im.meta["GADGETRON_SeqDescription"] == "_SCOREMRI_SENSE"


def test_round_trip_synthetic_two_slices_and_passthrough():
    rds = [gd.slice_data(slice_=0), gd.slice_data(slice_=1, seed=1)]
    acq = ismrmrd.Acquisition.from_array(np.ones((2, 8), np.complex64))
    acq.scan_counter = 4242
    res = harness.run_execute(
        harness.config_xml("sense", "cpu"), gd.header(slices=2), [rds[0], acq, rds[1]], timeout=120
    )
    assert res.errors == [], res.child_log[-3000:]
    assert res.closed and res.exit_code == 0, res.child_log[-3000:]
    assert len(res.images) == 2
    _check_headers(res.images, rds)
    # the acquisition passed through unchanged
    assert len(res.passthrough) == 1 and res.passthrough[0].scan_counter == 4242
    np.testing.assert_array_equal(res.passthrough[0].data, acq.data)
    # same pixels as the in-process core (what replay runs)
    local = _local_images(ismrmrd.xsd.CreateFromDocument(gd.header(slices=2)), rds)
    for a, b in zip(res.images, local):
        assert _max_rel(a.data, b.data) < 1e-5


def _shepp_logan_buffers(exe: str, tmp_path: Path):
    raw = tmp_path / "sl.h5"
    subprocess.run([exe, "-a", "4", "-w", "24", "-C", "-m", "64", "-c", "8", "-o", str(raw)], check=True,
                   capture_output=True)
    header_xml, header, acqs = rawfile.read_raw(raw)
    W, _ = preprocess.noise_prewhitener(acqs, header)
    pre = preprocess.preprocess(acqs, header, W)
    spec = pipeline.read_pipeline(REPO / "pipelines" / "scoremri.xml")
    rds = list(buffers.iter_recon_data(pre, header, spec))
    return header_xml, header, rds


def test_round_trip_shepp_logan_generator_file(shepp_logan_generator, tmp_path):
    header_xml, header, rds = _shepp_logan_buffers(shepp_logan_generator, tmp_path)
    reps = header.encoding[0].encodingLimits.repetition.maximum + 1
    assert len(rds) == reps  # one ReconData per repetition
    res = harness.run_execute(harness.config_xml("sense", "cpu"), header_xml, rds, timeout=150)
    assert res.errors == [], res.child_log[-3000:]
    assert res.closed and res.exit_code == 0
    assert len(res.images) == reps  # one image per repetition
    _check_headers(res.images, rds)
    assert sorted(im.repetition for im in res.images) == list(range(reps))
    rs = header.encoding[0].reconSpace.matrixSize
    assert all(tuple(im.matrix_size) == (rs.x, rs.y, 1) for im in res.images)
    local = _local_images(header, rds)
    for a, b in zip(res.images, local):
        assert _max_rel(a.data, b.data) < 1e-5
    # the phantom is reconstructed: the object is far brighter than the corners (noise + residual aliasing)
    mag = np.abs(res.images[0].data[0, 0])
    n = mag.shape[0]
    corners = np.concatenate([mag[:6, :6].ravel(), mag[:6, -6:].ravel(), mag[-6:, :6].ravel(), mag[-6:, -6:].ravel()])
    assert mag[n // 4 : 3 * n // 4, n // 4 : 3 * n // 4].mean() > 3 * corners.mean()


def test_round_trip_shipped_sample(tmp_path):
    samples = [REPO / "examples" / "t1_coronal_x4.h5"]
    assert samples[0].exists(), "the shipped sample examples/t1_coronal_x4.h5 is missing"
    header_xml, header, acqs = rawfile.read_raw(samples[0])
    W, _ = preprocess.noise_prewhitener(acqs, header)
    pre = preprocess.preprocess(acqs, header, W)
    spec = pipeline.read_pipeline(REPO / "pipelines" / "scoremri.xml")
    rds = list(buffers.iter_recon_data(pre, header, spec))[:3]
    res = harness.run_execute(harness.config_xml("sense", "cpu"), header_xml, rds, timeout=150)
    assert res.errors == [] and res.closed and res.exit_code == 0, res.child_log[-3000:]
    nslices = sum(int(np.prod(rd.bits[0].data.data.shape[4:])) for rd in rds)
    assert len(res.images) == nslices
    _check_headers(res.images, rds)
    local = _local_images(header, rds)
    for a, b in zip(res.images, local):
        assert _max_rel(a.data, b.data) < 1e-5


def test_threads_and_slice_batch_properties_in_execute_mode():
    """The gadget's runtime properties: threads chosen once and logged; slices sent back to back batched
    (the reader thread has them waiting), with the same pixels as one by one."""
    rds = [gd.slice_data(slice_=s, seed=s) for s in range(3)]
    res = harness.run_execute(harness.config_xml("sense", "cpu", threads=1, slice_batch=3), gd.header(slices=3),
                              rds, timeout=120)
    assert res.errors == [] and res.closed and res.exit_code == 0, res.child_log[-3000:]
    assert res.child_log.count("threads: 1 CPU thread (--threads / threads property") == 1
    assert [im.slice for im in res.images] == [0, 1, 2]
    local = _local_images(ismrmrd.xsd.CreateFromDocument(gd.header(slices=3)), rds)
    for a, b in zip(res.images, local):
        assert _max_rel(a.data, b.data) < 1e-5
    bad = harness.run_execute(harness.config_xml("sense", "cpu", threads="several"), gd.header(), rds[:1],
                              timeout=60)
    assert bad.errors and "threads = 'several'" in bad.errors[0] and bad.closed
