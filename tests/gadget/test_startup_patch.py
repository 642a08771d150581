"""The start-up patch scoremri installs for gadgetron-python (``scoremri-gadgetron.pth`` ->
``scoremri.gadget.gadgetron.startup``), without Gadgetron: a parent that closes the socket before HEADER ends
the ``python -m gadgetron`` child at once (gadgetron 1.4.1 alone spins forever), a worker started without a
target runs our gadget, and the patch is really installed in site-packages. The same fix through the real
server: test_gadgetron_faults.py (version-8 header)."""
from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import gadget_data as gd
from scoremri.gadget.gadgetron import startup
from scoremri.gadget.testing import harness

CONFIG = b"<configuration/>"


def _child_against_closing_parent(env: dict[str, str], wait: float) -> tuple[int | None, float, str]:
    """A parent that sends CONFIG and closes (what Gadgetron does when it cannot serialise the header)."""
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    port = lsock.getsockname()[1]
    log = Path(os.environ.get("TMPDIR", "/tmp")) / f"startup-child-{os.getpid()}-{port}.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen([sys.executable, "-m", "gadgetron", str(port), "scoremri.gadget.gadget", "score_recon"],
                                stdout=f, stderr=subprocess.STDOUT, env={**os.environ, **env})
    try:
        lsock.settimeout(60)
        conn, _ = lsock.accept()
        conn.sendall(struct.pack("<HI", 2, len(CONFIG)) + CONFIG)
        conn.close()
        t0 = time.monotonic()
        try:
            rc = proc.wait(wait)
        except subprocess.TimeoutExpired:
            rc = None
        return rc, time.monotonic() - t0, log.read_text(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        lsock.close()
        log.unlink(missing_ok=True)


def test_parent_closing_before_header_ends_the_child_with_the_hint():
    rc, secs, log = _child_against_closing_parent({}, 30)
    assert rc == 1 and secs < 5, (rc, secs, log[-2000:])
    assert "before sending the ISMRMRD header" in log and "scoremri fix-header" in log


def test_without_the_patch_gadgetron_python_spins():
    """Negative control: the bug the patch fixes is real in the installed gadgetron-python."""
    rc, _, _ = _child_against_closing_parent({startup.ENV_OFF: "1"}, 3)
    assert rc is None


def test_worker_started_without_target_runs_our_gadget():
    """Gadgetron 4.7 drops <execute target=...> for <distributed> workers; the patch supplies ours."""
    res = harness.run_execute(harness.config_xml("sense", "cpu"), gd.header(slices=1), [gd.slice_data()],
                              target=None, timeout=120)
    assert res.exit_code == 0 and res.errors == [] and len(res.images) == 1, res.child_log[-3000:]


def test_add_missing_target_only_for_our_modules():
    argv = ["-m", "9002", "scoremri.gadget.gadget"]
    assert startup.add_missing_target(argv) and argv[-1] == "score_recon"
    for argv in (["-m", "9002", "gadgetron.examples"], ["-m", "9002", "scoremri.gadget.gadget", "x"], ["-c"]):
        before = list(argv)
        assert not startup.add_missing_target(argv) and argv == before


def test_pth_file_is_installed_in_site_packages():
    pth = Path(sysconfig.get_paths()["purelib"]) / "scoremri-gadgetron.pth"
    assert pth.exists(), f"{pth} missing: reinstall scoremri (pip install -e .)"
    text = pth.read_text()
    assert "scoremri.gadget.gadgetron.startup" in text and "gadgetron" in text
