"""No hang, whatever arrives, through the real Gadgetron 4.7 server and client.

Each fault ends within 30 s; the reason is in the server log (and in the ERROR our gadget sends, which the
client prints); images of slices finished before the fault are kept; no ``python -m gadgetron`` child and no
``scoremri serve`` scan is left running. The version-8 header hangs gadgetron-python before our module is
imported: the fix is the start-up patch our package installs (``scoremri-gadgetron.pth``,
gadget/gadgetron/startup.py), and the negative control shows the hang without it."""
from __future__ import annotations

import os
import signal
import subprocess
import time

import ismrmrd
import numpy as np
import pytest

import real_gadgetron as rg
from scoremri.gadget.files.fixheader import fix_header
from scoremri.gadget.files.rawfile import read_images
from scoremri.gadget.files.simulate import simulate, write_raw
from scoremri.gadget.testing.gadgetron_server import (GadgetronServer, ServeProcess, port_listening, run_client,
                                                      wait_for)

pytestmark = pytest.mark.gadgetron

FAULT_SECONDS = 30.0
SLOW = {"preset": "fast", "sampler__steps": "8"}  # ~1-3 s per slice on 2 CPU cores: time to act mid-scan


@pytest.fixture(scope="module")
def mag3(dipy_t1):
    return rg.mags(dipy_t1, 64, 3)


@pytest.fixture(scope="module")
def raw3(tmp_path_factory, mag3):
    path = tmp_path_factory.mktemp("faults") / "t1_3slices.h5"
    rg.simulated(path, mag3)
    return path


def _broken(path, mag3, edit) -> None:
    """A simulated 3-slice file whose acquisitions of slice 1 are changed by ``edit(acqs of slice 1)``."""
    sim = simulate(mag3, coils=4, accel=3.0, mask_kind="random", acs=16, sigma=0.0, seed=5, ro_oversampling=2)
    acqs = [a for a in sim["acquisitions"] if a.idx.slice != 1]
    s1 = edit([a for a in sim["acquisitions"] if a.idx.slice == 1])
    write_raw(path, {**sim, "acquisitions": sorted(acqs + s1, key=lambda a: a.scan_counter)})


def _scan(gadgetron, tmp_path, raw, xml, *, timeout=FAULT_SECONDS):
    """One scan; returns (client result, server log, images in the output file, leftover python children)."""
    with GadgetronServer(tmp_path, gadgetron) as srv:
        res = run_client(srv.port, raw, tmp_path / "out.h5", xml=xml, group="g", timeout=timeout, install=gadgetron)
        wait_for(lambda: not srv.python_children(), 10)
        left = srv.python_children()
        log = srv.log()
    images = read_images(tmp_path / "out.h5", "g").get(1, []) if (tmp_path / "out.h5").exists() else []
    return res, log, images, left


def _assert_ended(res, left, log) -> None:
    assert not res.timed_out, f"the client still waited after {FAULT_SECONDS:.0f} s: {log[-3000:]}"
    assert res.seconds < FAULT_SECONDS
    assert left == [], f"python -m gadgetron children left running: {left}"


def test_version8_header_ends_with_the_reason_and_fix_header_repairs(gadgetron, shepp_logan_generator, tmp_path):
    raw = tmp_path / "v8.h5"
    subprocess.run([shepp_logan_generator, "-m", "64", "-c", "4", "-a", "2", "-w", "16", "-n", "0", "-o",
                    str(raw)], check=True, capture_output=True, timeout=60)
    xml = rg.variant("scoremri.xml", tmp_path / "chain.xml")
    (tmp_path / "a").mkdir()
    res, log, images, left = _scan(gadgetron, tmp_path / "a", raw, xml)
    _assert_ended(res, left, log)
    assert "XML header version does not match library schema version" in log
    assert "scoremri fix-header" in log  # the start-up patch names the way out
    assert images == []
    assert fix_header(raw) == "8"
    (tmp_path / "b").mkdir()
    res, log, images, left = _scan(gadgetron, tmp_path / "b", raw, xml, timeout=120)
    _assert_ended(res, left, log)
    rg.assert_images_equal(images, rg.replay(raw, tmp_path / "ref.h5", xml)[1])


def test_version8_hangs_without_the_startup_patch(gadgetron, shepp_logan_generator, tmp_path):
    """Negative control: with the patch turned off, gadgetron-python spins and the client waits."""
    raw = tmp_path / "v8.h5"
    subprocess.run([shepp_logan_generator, "-m", "32", "-c", "2", "-n", "0", "-o", str(raw)], check=True,
                   capture_output=True, timeout=60)
    xml = rg.variant("scoremri.xml", tmp_path / "chain.xml")
    with GadgetronServer(tmp_path, gadgetron, env={"SCOREMRI_NO_GADGETRON_PATCH": "1"}) as srv:
        res = run_client(srv.port, raw, tmp_path / "out.h5", xml=xml, group="g", timeout=8, install=gadgetron)
        spinning = srv.python_children()
    assert res.timed_out and spinning, "expected the known hang without the start-up patch"
    assert srv.leftover, "stop() should have had to kill the spinning child"


@pytest.mark.parametrize("fault, words", [
    ("nan", ("scoremri:", "NaN", "slice 1")),
    ("no_calibration", ("scoremri:", "calibration", "slice 1")),
    ("e1_beyond_limits", ("BucketToBuffer", "kspace_encode_step_1")),
])
def test_bad_slice_after_a_good_one(gadgetron, mag3, tmp_path, fault, words):
    """Slice 1 unusable: the chain ends naming it in the server log, slice 0's image is kept, nothing is left
    running. NaN lines and missing calibration reach our gadget, which sends an ERROR (the client prints it);
    phase-encode indices beyond the header's encoding limits (wrong dimensions) are refused by Gadgetron's own
    BucketToBuffer before our gadget sees slice 1."""
    def nan(acqs):
        for a in acqs:
            a.data[:] = np.nan
        return acqs

    def no_calibration(acqs):  # no ACS flags and no line within 8 of the centre: nothing to calibrate from
        out = [a for a in acqs if abs(a.idx.kspace_encode_step_1 - 32) >= 8]
        for a in out:
            a.clear_flag(ismrmrd.ACQ_IS_PARALLEL_CALIBRATION_AND_IMAGING)
        return out

    def e1_beyond_limits(acqs):  # a 64-line header, lines numbered up to 103
        for a in acqs:
            a.idx.kspace_encode_step_1 += 40
        return acqs

    raw = tmp_path / f"{fault}.h5"
    _broken(raw, mag3, {"nan": nan, "no_calibration": no_calibration, "e1_beyond_limits": e1_beyond_limits}[fault])
    xml = rg.variant("scoremri.xml", tmp_path / "chain.xml")
    res, log, images, left = _scan(gadgetron, tmp_path, raw, xml)
    _assert_ended(res, left, log)
    reason = [ln for ln in log.splitlines() if "ERROR" in ln and all(w in ln for w in words)]
    assert reason, log[-3000:]
    if "scoremri:" in words:
        assert "scoremri:" in res.output and words[1] in res.output, res.output[-2000:]  # our ERROR, at the client
    assert [im.slice for im in images] == [0]
    rg.assert_labelled(images[0])


def test_corrupt_model_file(gadgetron, raw3, tmp_path):
    garbage = tmp_path / "broken.safetensors"
    garbage.write_bytes(b"this is not a model" * 100)
    xml = rg.variant("scoremri.xml", tmp_path / "chain.xml", preset="fast", model__path=str(garbage))
    res, log, images, left = _scan(gadgetron, tmp_path, raw3, xml)
    _assert_ended(res, left, log)
    assert "broken.safetensors" in log and "broken.safetensors" in res.output
    assert images == []


def _after_first_image(logs, action):
    """A run_client on_start hook: wait until ``logs()`` shows slice 0's image sent, then ``action(client)``."""
    def hook(client):
        ok = wait_for(lambda: "image sent: slice 0" in logs(), 120)
        assert ok, logs()[-3000:]
        action(client)
    return hook


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _crash_gadgetron(srv: GadgetronServer) -> list[int]:
    """SIGKILL every Gadgetron process of the server's session (server and connection forks), as a crash
    would; our ``python -m gadgetron`` children are left to notice."""
    pids = [pid for pid, cmd in srv.session_processes() if "-m gadgetron" not in cmd]
    for pid in pids:
        _kill(pid)
    return pids


def test_client_killed_mid_scan(gadgetron, raw3, tmp_path):
    """The client dies after the first image: the chain ends, the child exits, the server lives on."""
    xml = rg.variant("scoremri.xml", tmp_path / "chain.xml", **SLOW)
    with GadgetronServer(tmp_path, gadgetron) as srv:
        res = run_client(srv.port, raw3, tmp_path / "out.h5", xml=xml, group="g", timeout=120, install=gadgetron,
                         on_start=_after_first_image(srv.log, lambda client: client.send_signal(signal.SIGKILL)))
        t0 = time.monotonic()
        gone = wait_for(lambda: not srv.children(), FAULT_SECONDS)  # the connection fork and our child
        waited = time.monotonic() - t0
        alive = srv.proc.poll() is None and port_listening(srv.port)
        log = srv.log()
    assert res.returncode == -signal.SIGKILL
    assert gone, f"still running {FAULT_SECONDS:.0f} s after the client died: {srv.children()}"
    assert waited < FAULT_SECONDS and alive, log[-3000:]
    assert "Broken pipe" in log  # Gadgetron noticed the client was gone
    assert not srv.leftover


def test_gadgetron_killed_mid_scan_execute(gadgetron, raw3, tmp_path):
    """Every Gadgetron process of the scan is killed after the first image (a crash): our child notices the
    dropped socket and exits, and the client ends. (gadgetron_ismrmrd_client itself aborts on the lost server
    -- "terminate called ... read: End of file", SIGABRT -- without closing its HDF5 output, so the image it
    had received is not readable from that file: a limit of the stock client, not of the chain.)"""
    xml = rg.variant("scoremri.xml", tmp_path / "chain.xml", **SLOW)
    killed: list[int] = []
    with GadgetronServer(tmp_path, gadgetron) as srv:
        res = run_client(srv.port, raw3, tmp_path / "out.h5", xml=xml, group="g", timeout=FAULT_SECONDS,
                         install=gadgetron,
                         on_start=_after_first_image(srv.log, lambda client: killed.extend(_crash_gadgetron(srv))))
        gone = wait_for(lambda: not srv.python_children(), FAULT_SECONDS)
        log = srv.log()
    assert killed
    assert not res.timed_out and res.seconds < FAULT_SECONDS and res.returncode != 0, log[-3000:]
    assert gone, f"python -m gadgetron child still running {FAULT_SECONDS:.0f} s after Gadgetron died"
    assert "dropped the connection" in log and "image sent: slice 0" in log
    assert "End of file" in res.output, res.output[-1500:]  # the client names why it stopped


def test_connect_mode_gadgetron_killed_then_serve_killed(gadgetron, raw3, tmp_path):
    """Connect mode. Gadgetron dies mid-scan: serve drops that scan and stays healthy. Then serve dies
    mid-scan: Gadgetron ends the chain with the reason and the client returns with the first image kept."""
    with ServeProcess("--preset", "sense") as serve:
        xml = rg.variant("scoremri_connect.xml", tmp_path / "chain.xml", connect_port=serve.port, **SLOW)
        a, b = tmp_path / "a", tmp_path / "b"
        a.mkdir()
        b.mkdir()
        with GadgetronServer(a, gadgetron) as srv:
            res = run_client(srv.port, raw3, a / "out.h5", xml=xml, group="g", timeout=FAULT_SECONDS,
                             install=gadgetron,
                             on_start=_after_first_image(serve.text, lambda client: _crash_gadgetron(srv)))
        assert not res.timed_out and res.returncode != 0 and "End of file" in res.output, res.output[-1500:]
        assert wait_for(lambda: serve.health()["scan_in_progress"] is None, FAULT_SECONDS), serve.text()[-3000:]
        health = serve.health()
        assert health["status"] == "ok" and health["scans_failed"] == 1, health
        assert "dropped the connection" in serve.text()

        with GadgetronServer(b, gadgetron) as srv:
            res = run_client(srv.port, raw3, b / "out.h5", xml=xml, group="g", timeout=FAULT_SECONDS,
                             install=gadgetron, on_start=_after_first_image(
                                 lambda: serve.text().split("dropped the connection", 1)[-1],
                                 lambda client: serve.proc.send_signal(signal.SIGKILL)))
            log = srv.log()
        assert not res.timed_out and res.seconds < FAULT_SECONDS, log[-3000:]
        assert "Stream/external] ERROR" in log, log[-3000:]  # Gadgetron's reason: the external peer went away
        assert [im.slice for im in read_images(b / "out.h5", "g").get(1, [])] == [0]
