"""``scoremri serve --protocol mrd`` against the real clients and a scripted one.

- python-ismrmrd-server's ``client.py`` and Gadgetron's ``gadgetron_ismrmrd_client`` send a simulated 3-slice
  raw file; the images equal ``scoremri replay`` of the same file at the same thread count (max relative
  difference <= 1e-4), with the header numbers and MRD attributes a site reads. One scan runs the default
  ``fast`` preset; the others run ``sense`` or a 2-step ``fast`` from the server's --config-dir (wiring).
- Bad input through the scripted client (:mod:`scoremri.gadget.testing.mrd`): NaN lines, no calibration, a
  truncated stream, a client that vanishes, junk bytes, an oversized length field, a config name with
  ``../``: each scan ends with a named ``ERR`` line (where the client can still read) and CLOSE, no hang,
  and the server answers the next scan.
- Config messages (names, XML/YAML/JSON texts, JSON parameters) resolved without sockets.

The real clients are found by :mod:`scoremri.gadget.testing.tools` (``../shared/...`` beside the repository,
``SCOREMRI_MRD_CLIENT``, ``SCOREMRI_GADGETRON``); absent, their tests skip with the reason, or fail under
``SCOREMRI_REQUIRE_TOOLS=1`` (CI).
"""
from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import ismrmrd
import numpy as np
import pytest
import torch

from scoremri.gadget.files.rawfile import read_images, read_raw
from scoremri.gadget.files.replay import replay
from scoremri.gadget.files.simulate import simulate, write_raw
from scoremri.gadget.mrd.config import ConfigResolver, check_name, parse_json_parameters, parse_text
from scoremri.gadget.testing import mrd as client
from scoremri.gadget.testing.gadgetron_server import ServeProcess
from scoremri.gadget.testing.tools import gadgetron_bin, gadgetron_env, mrd_client
from scoremri.recon.config import ConfigError

NY = NX = 64
SLICES = 3
TINY = "tiny"  # a --config-dir file: fast with 2 steps and ushort magnitude images
TINY_YAML = "inherit: fast\nsampler:\n  steps: 2\noutput:\n  magnitude: ushort\n"
TINY_OVERRIDES = {"sampler.steps": "2", "output.magnitude": "ushort"}


def _require(what: str, found: object) -> None:
    if found:
        return
    msg = f"{what} not found (../shared beside the repository, or the environment variable)"
    if os.environ.get("SCOREMRI_REQUIRE_TOOLS", "0") == "1":
        pytest.fail(msg)
    pytest.skip(msg)


class MrdServe(ServeProcess):
    """``scoremri serve --protocol mrd`` in a child process (one torch thread, stopped by PID)."""

    def __init__(self, config_dir: Path, *extra: str) -> None:
        super().__init__("--protocol", "mrd", "--preset", "sense", "--config-dir", str(config_dir),
                         "--idle-timeout", "20", *extra)


def _slices() -> np.ndarray:
    """(3, 64, 64) magnitude slices from dipy's T1 slice (visible evaluation data), each a little different."""
    import dipy.data

    img = np.load(Path(dipy.data.__file__).parent / "files" / "t1_coronal_slice.npy").astype(np.float32)
    x = torch.nn.functional.interpolate(torch.from_numpy(img)[None, None], size=(NY, NX), mode="area")[0, 0].numpy()
    x = x / x.max()
    return np.stack([x, np.roll(x, 3, axis=0), np.fliplr(x)]).astype(np.float32)


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("mrd") / "sim3.h5"
    write_raw(path, simulate(_slices(), coils=4, accel=4, acs=16, sigma=0.005, seed=3))
    return path


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("mrd-config")
    (d / f"{TINY}.yaml").write_text(TINY_YAML)
    (d / "site.xml").write_text('<configuration><property name="preset" value="sense"/>'
                                '<property><name>sampler.lam</name><value>0.02</value></property></configuration>')
    return d


@pytest.fixture(scope="module")
def dicom_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("mrd-dicom")


@pytest.fixture(scope="module")
def server(config_dir, dicom_dir):
    srv = MrdServe(config_dir, "--dicom-dir", str(dicom_dir))  # every scan also leaves its DICOM series there
    yield srv
    assert srv.stop() == 0, srv.text()[-3000:]


@pytest.fixture(scope="module")
def scan(raw):
    xml, _, acqs = read_raw(raw)
    return xml, acqs


_replays: dict[tuple, dict[int, list]] = {}


def _replay(raw: Path, tmp: Path, preset: str, **overrides: str) -> dict[int, list]:
    """scoremri replay at the server's thread count (1), cached per configuration."""
    key = (str(raw), preset, tuple(sorted(overrides.items())))
    if key not in _replays:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            out = tmp / f"replay_{len(_replays)}.h5"
            replay(raw, out, preset=preset, overrides=dict(overrides), device="cpu", progress=False)
        finally:
            torch.set_num_threads(threads)
        _replays[key] = read_images(out)
    return _replays[key]


def _max_rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.complex128) - b).max() / np.abs(a).max())


def _assert_equal_to_replay(got: dict[int, list], ref: dict[int, list]) -> None:
    assert sorted(got) == sorted(ref)
    for series in ref:
        assert len(got[series]) == len(ref[series]) == SLICES
        for g, r in zip(got[series], ref[series]):
            assert g.data.dtype == r.data.dtype and g.data.shape == r.data.shape
            if g.data.dtype == np.uint16:
                assert np.abs(g.data.astype(int) - r.data.astype(int)).max() <= 1
            else:
                assert _max_rel(r.data, g.data) <= 1e-4
            gh, rh = g.getHead(), r.getHead()
            for f in ("image_type", "image_index", "image_series_index", "slice", "contrast", "repetition"):
                assert getattr(gh, f) == getattr(rh, f), f
            assert list(gh.matrix_size) == list(rh.matrix_size)
            np.testing.assert_allclose(list(gh.position), list(rh.position), atol=1e-6)
            np.testing.assert_allclose(list(gh.read_dir), list(rh.read_dir), atol=1e-6)


def _run_client(args: list[str], cwd: Path, env: dict | None = None, timeout: float = 180) -> str:
    p = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-3000:]
    return out


# --------------------------------------------------------------------------------- the real clients


def test_mrd_client_sense_equals_replay_with_json_parameters(server, raw, tmp_path, dicom_dir):
    exe = mrd_client()
    _require("python-ismrmrd-server's client.py", exe)
    # the client sends NAME.json beside it after the header: parameters map onto dotted names; an OpenRecon
    # UI parameter that is not ours is ignored with a warning line
    (tmp_path / "sense.json").write_text(json.dumps({"parameters": {"sampler.lam": 0.05, "sendoriginal": True}}))
    out = tmp_path / "out.h5"
    log = _run_client([sys.executable, str(exe), "-a", "127.0.0.1", "-p", str(server.port), "-c", "sense",
                       "-o", str(out), "-G", "scan", str(raw)], cwd=tmp_path)
    got = read_images(out, "scan")
    _assert_equal_to_replay(got, _replay(raw, tmp_path, "sense", **{"sampler.lam": "0.05"}))
    assert "ERR" not in log and "WRN" in log and "sendoriginal" in log, log[-3000:]
    assert "INF done: 3 slices, 3 images" in log
    for k, im in enumerate(got[1], start=1):
        m = im.meta
        assert m["DataRole"] == "Image" and m["ImageIndex"] == str(k) and m["ImageSeriesIndex"] == "1"
        assert m["AIGenerated"] == "0" and m["SequenceDescriptionAdditional"] == "SCOREMRI"  # SENSE: not AI
        assert float(m["WindowWidth"]) > 0 and float(m["WindowCenter"]) == pytest.approx(float(m["WindowWidth"]) / 2, rel=1e-4)
    assert [im.getHead().slice for im in got[1]] == [0, 1, 2]
    assert server.health()["protocol"] == "mrd"
    # serve --dicom-dir: the scan's images as a DICOM series too, labelled like the images sent
    import pydicom

    files = sorted(dicom_dir.glob("*/series_001_sense/*.dcm"))
    assert len(files) >= SLICES
    ds = pydicom.dcmread(files[0])
    assert (ds.Rows, ds.Columns) == (NY, NX) and "AI" not in ds.SeriesDescription
    assert ds.ImageComments == got[1][0].meta["ImageComments"]


def test_gadgetron_client_config_dir_file_equals_replay(server, raw, tmp_path):
    exe = gadgetron_bin()
    _require("gadgetron_ismrmrd_client", exe)
    out = tmp_path / "out.h5"
    log = _run_client([str(exe), "-a", "127.0.0.1", "-p", str(server.port), "-f", str(raw), "-c", TINY,
                       "-o", str(out), "-G", "scan"], cwd=tmp_path, env=gadgetron_env(exe))
    got = read_images(out, "scan")
    ref = _replay(raw, tmp_path, "fast", **TINY_OVERRIDES)
    assert sorted(got) == [1, 3]  # complex in series 1, ushort magnitude in series 3
    _assert_equal_to_replay(got, ref)
    for im in got[3]:
        h, m = im.getHead(), im.meta
        assert h.image_type == 1 and im.data.dtype == np.uint16 and im.data.max() <= 4095
        assert float(np.percentile(im.data, 99)) == pytest.approx(2048, rel=0.02)  # AutoScaleGadget's rule
        assert float(m["ScaleFactor"]) > 0 and 0 < float(m["WindowWidth"]) <= 4095
        assert m["AIGenerated"] == "1" and m["SequenceDescriptionAdditional"] == "SCOREMRI_AI"  # learned method
    assert "INF done: 3 slices, 6 images" in log


def test_gadgetron_client_local_xml_config(server, raw, tmp_path):
    """-C sends the XML text (id 2): Gadgetron <configuration> properties, as the gadget reads them."""
    exe = gadgetron_bin()
    _require("gadgetron_ismrmrd_client", exe)
    cfg = tmp_path / "cfg.xml"
    cfg.write_text('<configuration><property name="preset" value="sense"/>'
                   '<property name="sampler.cg_iters" value="7"/></configuration>')
    out = tmp_path / "out.h5"
    _run_client([str(exe), "-p", str(server.port), "-f", str(raw), "-C", str(cfg), "-o", str(out), "-G", "g"],
                cwd=tmp_path, env=gadgetron_env(exe))
    _assert_equal_to_replay(read_images(out, "g"), _replay(raw, tmp_path, "sense", **{"sampler.cg_iters": "7"}))


@pytest.mark.slow
def test_mrd_client_fast_preset_equals_replay(server, raw, tmp_path):
    """The one scan with the default learned sampler (25 steps): the same pixels as replay."""
    exe = mrd_client()
    _require("python-ismrmrd-server's client.py", exe)
    out = tmp_path / "out.h5"
    _run_client([sys.executable, str(exe), "-a", "127.0.0.1", "-p", str(server.port), "-c", "fast",
                 "-o", str(out), "-G", "scan", str(raw)], cwd=tmp_path)
    got = read_images(out, "scan")
    _assert_equal_to_replay(got, _replay(raw, tmp_path, "fast"))
    assert all(im.meta["AIGenerated"] == "1" and "sampler fast" in im.meta["ImageComments"] for im in got[1])


# --------------------------------------------------------------------------------- the stream itself


def test_each_buffer_is_sent_when_its_trigger_fires(server, raw):
    """Two repetitions (trigger_dimension = repetition): repetition 0's images come back while repetition 1
    is still being acquired, as soon as its first line fires the trigger; not at the end of the scan."""
    xml, _, acqs = read_raw(raw)
    rep1 = []
    for a in acqs:
        if a.is_flag_set(19):
            continue
        b = ismrmrd.Acquisition(a.getHead())
        b.data[:] = a.data
        h = b.getHead()
        h.idx.repetition = 1
        b.setHead(h)
        rep1.append(b)
    res = client.MrdResult()
    seen_mid_scan: list[int] = []

    def items():
        yield from acqs
        yield rep1[0]  # fires the trigger for repetition 0
        deadline = time.monotonic() + 30
        while len(res.images) < SLICES and time.monotonic() < deadline:
            time.sleep(0.05)
        seen_mid_scan.append(len(res.images))
        yield from rep1[1:]

    client.run_mrd("127.0.0.1", server.port, config_name="sense", header=xml, items=items(), timeout=90,
                   result=res)
    assert res.closed and res.errors == [], res.texts
    assert seen_mid_scan == [SLICES]  # repetition 0 was back before repetition 1 was sent
    assert [im.getHead().repetition for im in res.images] == [0] * SLICES + [1] * SLICES
    assert [im.getHead().image_index for im in res.images] == list(range(1, 2 * SLICES + 1))


# --------------------------------------------------------------------------------- bad input


def _next_scan_ok(server, scan) -> None:
    xml, acqs = scan
    res = client.run_mrd("127.0.0.1", server.port, config_name="sense", header=xml, items=acqs, timeout=60)
    assert res.closed and res.errors == [] and len(res.images) == SLICES, res.texts
    assert server.health()["status"] == "ok"


def _one_error(res: client.MrdResult, *words: str) -> str:
    assert res.closed and not res.timed_out, (res.texts, res.send_error)
    assert len(res.errors) == 1, res.texts
    err = res.errors[0]
    for w in words:
        assert w in err, err
    return err


def test_nan_lines_end_the_scan_after_the_good_slices(server, scan):
    xml, acqs = scan
    bad = [a for a in acqs]
    k = next(i for i, a in enumerate(bad) if a.idx.slice == 1 and not a.is_flag_set(19))
    nan = type(bad[k])(bad[k].getHead())
    nan.data[:] = np.nan
    bad[k] = nan
    res = client.run_mrd("127.0.0.1", server.port, config_name="sense", header=xml, items=bad, timeout=60)
    _one_error(res, "NaN", "slice 1")
    assert [im.getHead().slice for im in res.images] == [0]  # slice 0 was sent before the bad one
    _next_scan_ok(server, scan)


def test_no_calibration_is_a_named_error(server, tmp_path):
    mag = _slices()[:1]
    sim = simulate(mag, coils=4, accel=4, acs=0, sigma=0.005, seed=1, mask_kind="equispaced")
    xml = sim["xml"]
    res = client.run_mrd("127.0.0.1", server.port, config_name="sense", header=xml, items=sim["acquisitions"])
    _one_error(res, "no calibration")


def test_truncated_stream_gets_err_and_close(server, scan):
    xml, acqs = scan
    res = client.run_mrd("127.0.0.1", server.port, config_name="sense", header=xml, items=acqs[:30],
                         end="shutdown", timeout=30)
    _one_error(res, "truncated stream", "without CLOSE")
    assert res.seconds < 20
    _next_scan_ok(server, scan)


def test_client_killed_mid_scan_leaves_the_server_serving(server, scan):
    xml, acqs = scan
    before = server.health()["scans_failed"]
    client.run_mrd("127.0.0.1", server.port, config_name="sense", header=xml, items=acqs[:30], end="reset")
    deadline = time.monotonic() + 20
    while server.health()["scans_failed"] == before:
        assert time.monotonic() < deadline, server.text()[-2000:]
        time.sleep(0.1)
    assert "truncated stream" in server.text()
    _next_scan_ok(server, scan)


def test_junk_bytes_mid_stream(server, scan):
    xml, acqs = scan
    junk = bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8))
    res = client.run_mrd("127.0.0.1", server.port, config_name="sense", header=xml,
                         items=list(acqs[:10]) + [b"\x39\x30" + junk], timeout=30)
    _one_error(res, "12345", "not an MRD message")
    _next_scan_ok(server, scan)


def test_junk_instead_of_a_scan_is_refused(server, scan):
    res = client.run_mrd("127.0.0.1", server.port, first=b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", timeout=30)
    _one_error(res, "unexpected first message id")
    _next_scan_ok(server, scan)


def test_oversized_length_field(server, scan):
    res = client.run_mrd("127.0.0.1", server.port, first=struct.pack("<HI", 2, 0xFFFFFFF0) + b"<configuration",
                         timeout=30)
    _one_error(res, "CONFIG_TEXT", "4294967280", "exceeds the limit")
    xml, acqs = scan
    huge = acqs[5].getHead()
    huge.active_channels = 1024
    huge.number_of_samples = 65535
    res = client.run_mrd("127.0.0.1", server.port, config_name="sense", header=xml,
                         items=list(acqs[:5]) + [struct.pack("<H", 1008) + bytes(huge)], timeout=30)
    _one_error(res, "acquisition 5", "exceed the limit")
    _next_scan_ok(server, scan)


def test_config_name_with_dotdot_is_refused(server, scan):
    xml, acqs = scan
    for name in ("../../etc/passwd", "/etc/passwd", "..", "sub/tiny"):
        res = client.run_mrd("127.0.0.1", server.port, config_name=name, header=xml, items=acqs[:3], timeout=30)
        _one_error(res, "refused", "never a path")
    res = client.run_mrd("127.0.0.1", server.port, config_name="nosuch", header=xml, items=acqs[:3], timeout=30)
    _one_error(res, "unknown config 'nosuch'", TINY, "sense")
    _next_scan_ok(server, scan)


def test_bad_header_and_bad_parameters(server, scan):
    xml, acqs = scan
    res = client.run_mrd("127.0.0.1", server.port, config_name="sense", header="<ismrmrdHeader><junk/>",
                         items=acqs[:3], timeout=30)
    _one_error(res, "HEADER", "invalid ISMRMRD XML header")
    res = client.run_mrd("127.0.0.1", server.port, config_name="sense", header=xml,
                         parameters={"parameters": {"sampler.steps": "many"}}, items=acqs[:3], timeout=30)
    _one_error(res, "sampler.steps", "many")
    _next_scan_ok(server, scan)


def test_sigterm_during_a_scan_errs_it_and_exits_zero(config_dir, scan):
    srv = MrdServe(config_dir)
    xml, acqs = scan
    res = client.MrdResult()

    def slow():
        for a in acqs:
            if res.closed:  # the server said CLOSE: stop sending, as the real clients do
                return
            yield a
            time.sleep(0.1)

    t = threading.Thread(target=lambda: client.run_mrd(
        "127.0.0.1", srv.port, config_name="sense", header=xml, items=slow(), timeout=60, result=res))
    t.start()
    deadline = time.monotonic() + 30
    while srv.health()["scan_in_progress"] is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    srv.proc.send_signal(signal.SIGTERM)
    assert srv.proc.wait(30) == 0, srv.text()[-3000:]
    t.join(60)
    _one_error(res, "SIGTERM")


# --------------------------------------------------------------------------------- config messages


def test_config_names_resolve_and_paths_never(config_dir):
    r = ConfigResolver("sense", {"sampler.cg_iters": "9"}, "cpu", config_dir)
    s = r.resolve(name="fast")
    assert s.config.sampler.method == "fast" and s.config.sampler.cg_iters == 9 and s.device == "cpu"
    s = r.resolve(name=TINY)  # the site's file: inherit fast, 2 steps, ushort magnitude
    assert s.config.sampler.method == "fast" and s.config.sampler.steps == 2 and s.config.output.magnitude == "ushort"
    assert r.resolve(name=f"{TINY}.yaml").config.sampler.steps == 2
    s = r.resolve(name="site")  # site.xml: Gadgetron properties in both spellings
    assert s.config.sampler.method == "sense" and s.config.sampler.lam == 0.02
    assert r.resolve(name="default.xml").config.sampler.method == "sense"  # gadgetron_ismrmrd_client's default
    for bad in ("../x", "a/b", "..", "/etc/passwd", "a\\b", ""):
        with pytest.raises(ConfigError):
            check_name(bad)
    with pytest.raises(ConfigError, match="not a shipped preset"):
        r.resolve(text="inherit: ../../secret.yaml\n")
    with pytest.raises(ConfigError, match="--config-dir"):
        r.resolve(text="model:\n  path: /etc/passwd\n")
    with pytest.raises(ConfigError, match="unknown key 'sampling'"):
        r.resolve(text="sampling: {steps: 3}\n")


def test_config_texts_and_json_parameters(config_dir):
    r = ConfigResolver("fast", {}, "auto", config_dir)
    assert r.resolve(text='{"preset": "sense", "sampler.lam": 0.3}').config.sampler.lam == 0.3
    y = r.resolve(text="sampler:\n  steps: 4\ndevice: cpu\n")
    assert y.config.sampler.method == "fast" and y.config.sampler.steps == 4 and y.device == "cpu"
    # a whole Gadgetron stream XML: its buffering, its <external> properties, its magnitude gadgets
    from scoremri.gadget.gadgetron.pipeline import default_pipeline_path

    mag = (default_pipeline_path().parent / "scoremri_magnitude.xml").read_text()
    s = r.resolve(text=mag)
    assert s.spec.trigger_dimension == "repetition" and s.spec.s_dimension == "average"
    assert s.config.output.magnitude == "ushort" and s.config.output.complex is False
    # JSON parameters after the header: dotted names and sections; config/customconfig name the config
    p = parse_json_parameters(json.dumps({"parameters": {"config": "sense", "sampler": {"lam": 0.07}, "x": 1}}))
    s = r.resolve(name="fast", parameters=p)
    assert s.config.sampler.method == "sense" and s.config.sampler.lam == 0.07 and "'x'" in s.warnings[0]
    p = parse_json_parameters(json.dumps({"parameters": {"config": "sense", "customconfig": TINY}}))
    assert r.resolve(name="fast", parameters=p).config.sampler.steps == 2
    with pytest.raises(ConfigError, match="refused"):
        parse_json_parameters(json.dumps({"parameters": {"customconfig": "../../x"}}))
    with pytest.raises(ConfigError, match="not valid JSON"):
        parse_json_parameters("{parameters")
    with pytest.raises(ConfigError, match="XML cannot be parsed"):
        parse_text("<configuration><property")


# --------------------------------------------------------------------------------- outputs MRD sites read


def test_magnitude_pixels_window_and_labels():
    from scoremri.gadget.images import is_ai_generated, magnitude_pixels, window
    from scoremri.recon.config import load_config

    rng = np.random.default_rng(0)
    x = (rng.random((1, 32, 32)) * 3.0 * np.exp(1j * rng.random((1, 32, 32)))).astype(np.complex64)
    x[0, 0, 0] = 1000.0  # one hot pixel: clamped, not the scale
    f, s = magnitude_pixels(x, "float")
    assert f.dtype == np.float32 and s == 1.0 and np.allclose(f, np.abs(x))
    u, s = magnitude_pixels(x, "ushort")  # AutoScaleGadget: the 99th percentile -> 2048; FloatToUShort: <= 4095
    assert u.dtype == np.uint16 and u.max() == 4095
    assert s == pytest.approx(2048 / np.percentile(np.abs(x), 99), rel=1e-6)
    assert abs(np.percentile(u, 99) - 2048) <= 1
    u2, s2 = magnitude_pixels(x, "ushort", 10.0)
    assert s2 == 10.0 and np.array_equal(u2, np.clip(np.rint(np.abs(x) * 10.0), 0, 4095).astype(np.uint16))
    c, w = window(u)
    assert w == pytest.approx(np.percentile(u, 99.5)) and c == pytest.approx(w / 2)
    assert is_ai_generated("fast") and is_ai_generated("pc")
    assert not is_ai_generated("sense") and not is_ai_generated("zero_filled") and not is_ai_generated("nosuch")
    with pytest.raises(ConfigError, match="no image would be sent"):
        load_config("sense", {"output.complex": "false"})
    with pytest.raises(ConfigError, match="output.magnitude"):
        load_config("sense", {"output.magnitude": "int"})
