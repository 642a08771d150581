"""Plays Gadgetron's side of the external-language wire over a real loopback socket.

Execute mode (:func:`run_execute`): listen on 127.0.0.1 port 0, spawn a real
``python -m gadgetron <port> <module> <target>`` child, accept its connection. Connect mode
(:func:`run_connect`): connect to a running ``scoremri serve``. Either way the harness sends CONFIG (2:
uint32 length + ``<configuration>`` XML), HEADER (3: uint32 length + ISMRMRD XML), the items (ReconData
1023 via ``gadgetron.types.recon_data.write_recon_data``, Acquisitions 1008, Images 1022) and CLOSE (4),
while a reader collects Images (1022), ERROR texts (8), pass-through messages and CLOSE. Every wait has a
timeout; ``drop_after=k`` closes the socket abruptly after k items (a parent that goes away mid-stream).
"""
from __future__ import annotations

import logging
import os
import select
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence
from xml.sax.saxutils import quoteattr

import ismrmrd
import numpy as np

log = logging.getLogger(__name__)

MSG_CONFIG = 2
MSG_HEADER = 3
MSG_CLOSE = 4
MSG_ERROR = 8
MSG_ACQUISITION = 1008
MSG_IMAGE = 1022
MSG_RECON_DATA = 1023


class HarnessError(RuntimeError):
    """The harness itself failed (child did not connect, protocol violation, timeout)."""


@dataclass
class HarnessResult:
    """What came back. images: ismrmrd.Image in arrival order; errors: ERROR texts; closed: CLOSE seen;
    passthrough: other messages (Acquisitions, ReconData) sent back; exit_code: child's (execute mode);
    sent_at / received_at: time.monotonic() when each item finished sending / each image arrived;
    child_exit_seconds: time from the drop (or the end of the exchange) to the child's exit."""

    images: list[ismrmrd.Image] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    closed: bool = False
    passthrough: list[Any] = field(default_factory=list)
    exit_code: int | None = None
    child_log: str = ""
    sent_at: list[float] = field(default_factory=list)
    received_at: list[float] = field(default_factory=list)
    send_error: str | None = None
    timed_out: bool = False
    child_exit_seconds: float | None = None
    child_pid: int | None = None
    peak_rss_kb: int | None = None
    rss_samples_kb: list[tuple[float, int]] = field(default_factory=list)  # (monotonic time, VmRSS kB)


def config_xml(preset: str | None = "sense", device: str | None = "cpu", **dotted: Any) -> str:
    """``<configuration>`` with ``<property name=... value=.../>`` elements; dotted names may use '__'
    for '.' as keyword arguments (``sampler__steps=10``)."""
    props: list[tuple[str, Any]] = []
    if preset is not None:
        props.append(("preset", preset))
    if device is not None:
        props.append(("device", device))
    props += [(k.replace("__", "."), v) for k, v in dotted.items()]
    body = "".join(f"<property name={quoteattr(str(k))} value={quoteattr(str(v))}/>" for k, v in props)
    return f"<configuration>{body}</configuration>"


class _Reader:
    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.deadline = deadline

    def read(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("harness timeout while reading")
            # select, not settimeout: a socket timeout would also apply to the sender thread's sendall
            ready, _, _ = select.select([self.sock], [], [], min(left, 1.0))
            if not ready:
                continue
            chunk = self.sock.recv(min(n - len(out), 1 << 20))
            if not chunk:
                raise EOFError(f"peer closed the connection ({len(out)} of {n} bytes)")
            out += chunk
        return bytes(out)


class _Writer:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def write(self, data: Any) -> None:
        self.sock.sendall(data)


def _send_item(w: _Writer, item: Any) -> None:
    from gadgetron.types.recon_data import ReconData, write_recon_data

    if isinstance(item, ReconData):
        write_recon_data(w, item)
    elif isinstance(item, ismrmrd.Acquisition):
        w.write(struct.pack("<H", MSG_ACQUISITION))
        item.serialize_into(w.write)
    elif isinstance(item, ismrmrd.Image):
        w.write(struct.pack("<H", MSG_IMAGE))
        item.serialize_into(w.write)
    elif isinstance(item, (bytes, bytearray)):
        w.write(item)  # raw bytes: for protocol-level tests
    else:
        raise TypeError(f"harness cannot send {type(item).__name__}")


def _exchange(
    sock: socket.socket, config: str, header: str | bytes, items: Iterable[Any], timeout: float,
    drop_after: int | None, res: HarnessResult, send_close: bool = True,
) -> float | None:
    """Send everything on a thread, read on this one. Returns the drop time (monotonic) if dropped."""
    w = _Writer(sock)
    dropped_at: list[float] = []
    done = threading.Event()

    def sender() -> None:
        try:
            cfg = config.encode("utf-8")
            w.write(struct.pack("<HI", MSG_CONFIG, len(cfg)) + cfg)
            hdr = header.encode("utf-8") if isinstance(header, str) else header
            w.write(struct.pack("<HI", MSG_HEADER, len(hdr)) + hdr)
            for i, item in enumerate(items):
                if drop_after is not None and i >= drop_after:
                    break
                _send_item(w, item)
                res.sent_at.append(time.monotonic())
            if drop_after is not None:
                dropped_at.append(time.monotonic())
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()
                return
            if send_close:
                w.write(struct.pack("<H", MSG_CLOSE))
        except OSError as e:
            res.send_error = f"{type(e).__name__}: {e}"
        except Exception as e:  # a bad item: stop the exchange instead of leaving the reader waiting
            res.send_error = f"{type(e).__name__}: {e}"
            log.error("harness sender failed: %s", res.send_error)
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        finally:
            done.set()

    t = threading.Thread(target=sender, name="harness-sender", daemon=True)
    t.start()
    deadline = time.monotonic() + timeout
    if drop_after is not None:
        t.join(timeout)
        return dropped_at[0] if dropped_at else None
    r = _Reader(sock, deadline)
    try:
        while True:
            (mid,) = struct.unpack("<H", r.read(2))
            if mid == MSG_IMAGE:
                res.images.append(ismrmrd.Image.deserialize_from(r.read))
                res.received_at.append(time.monotonic())
            elif mid == MSG_ERROR:
                (n,) = struct.unpack("<Q", r.read(8))
                res.errors.append(r.read(n).decode("utf-8", "replace"))
            elif mid == MSG_CLOSE:
                res.closed = True
                break
            elif mid == MSG_ACQUISITION:
                res.passthrough.append(ismrmrd.Acquisition.deserialize_from(r.read))
            elif mid == MSG_RECON_DATA:
                from gadgetron.types.recon_data import read_recon_data

                res.passthrough.append(read_recon_data(r))
            else:
                raise HarnessError(f"unexpected message id {mid} from the gadget")
    except TimeoutError:
        res.timed_out = True
    except EOFError as e:
        log.debug("reader: %s", e)
    t.join(max(0.1, deadline - time.monotonic()))
    try:
        sock.close()
    except OSError:
        pass
    return None


def _status_kb(pid: int, field: str) -> int | None:
    """A kB field of /proc/<pid>/status (``VmRSS``, ``VmHWM``); None when unreadable."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def run_execute(
    config: str,
    header: str | bytes,
    items: Iterable[Any],
    *,
    module: str = "scoremri.gadget.gadget",
    target: str | None = "score_recon",
    timeout: float = 300.0,
    drop_after: int | None = None,
    exit_timeout: float = 30.0,
    env: dict[str, str] | None = None,
    log_level: str = "INFO",
    sample_rss: bool = False,
    result: HarnessResult | None = None,
) -> HarnessResult:
    """Gadgetron execute mode against a real ``python -m gadgetron <port> <module> <target>`` child
    (``target=None``: no target argument, as Gadgetron 4.7 starts a ``<distributed>`` worker's gadget).
    result: an (empty) HarnessResult to fill, so that an item generator can watch the images arriving."""
    res = result if result is not None else HarnessResult()
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    port = lsock.getsockname()[1]
    child_env = dict(os.environ)
    child_env.setdefault("OMP_NUM_THREADS", "1")
    child_env["GADGETRON_EXTERNAL_LOG_LEVEL"] = log_level
    child_env.update(env or {})
    logf = tempfile.TemporaryFile(mode="w+b")
    proc = subprocess.Popen(
        [sys.executable, "-m", "gadgetron", str(port), module] + ([target] if target else []),
        stdout=logf, stderr=subprocess.STDOUT, env=child_env,
    )
    res.child_pid = proc.pid
    stop_sampling = threading.Event()

    def sampler() -> None:
        while not stop_sampling.wait(0.05):
            v = _status_kb(proc.pid, "VmRSS")
            if v is not None:
                res.rss_samples_kb.append((time.monotonic(), v))
            hwm = _status_kb(proc.pid, "VmHWM")
            if hwm is not None:
                res.peak_rss_kb = max(res.peak_rss_kb or 0, hwm)

    try:
        deadline = time.monotonic() + min(timeout, 120.0)
        lsock.settimeout(0.5)
        conn = None
        while conn is None:
            if proc.poll() is not None:
                raise HarnessError(f"child exited with {proc.returncode} before connecting")
            if time.monotonic() > deadline:
                raise HarnessError("child did not connect within the timeout")
            try:
                conn, _ = lsock.accept()
                conn.settimeout(None)
            except socket.timeout:
                continue
        if sample_rss:
            threading.Thread(target=sampler, daemon=True).start()
        dropped = _exchange(conn, config, header, items, timeout, drop_after, res)
        t_end = dropped if dropped is not None else time.monotonic()
        try:
            res.exit_code = proc.wait(exit_timeout)
            res.child_exit_seconds = time.monotonic() - t_end
        except subprocess.TimeoutExpired:
            res.timed_out = True
    finally:
        stop_sampling.set()
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        lsock.close()
        logf.seek(0)
        res.child_log = logf.read().decode("utf-8", "replace")
        logf.close()
    return res


def run_connect(
    host: str,
    port: int,
    config: str,
    header: str | bytes,
    items: Iterable[Any],
    *,
    timeout: float = 300.0,
    drop_after: int | None = None,
    connect_timeout: float = 30.0,
    result: HarnessResult | None = None,
) -> HarnessResult:
    """Gadgetron connect mode (``<connect address=... port=.../>``) against a running ``scoremri serve``."""
    res = result if result is not None else HarnessResult()
    deadline = time.monotonic() + connect_timeout
    while True:
        try:
            sock = socket.create_connection((host, port), timeout=5.0)
            sock.settimeout(None)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise HarnessError(f"cannot connect to {host}:{port}") from None
            time.sleep(0.2)
    _exchange(sock, config, header, items, timeout, drop_after, res)
    return res


# ------------------------------------------------------------------------------ hand-made ReconData


def header_xml(
    ny: int, nx: int, ncoils: int, *, fov_mm: tuple[float, float, float] = (256.0, 256.0, 5.0),
    slices: int = 1, repetitions: int = 1, acceleration: int = 1,
) -> str:
    """A strict ISMRMRD header (no <version>) for a single-encoding 2-D Cartesian scan (ny, nx) with
    measurementInformation and acquisitionSystemInformation (as scanners send them)."""
    pi = ""
    if acceleration > 1:
        pi = (
            "<parallelImaging><accelerationFactor><kspace_encoding_step_1>%d</kspace_encoding_step_1>"
            "<kspace_encoding_step_2>1</kspace_encoding_step_2></accelerationFactor>"
            "<calibrationMode>embedded</calibrationMode></parallelImaging>" % acceleration
        )
    space = (
        f"<matrixSize><x>{nx}</x><y>{ny}</y><z>1</z></matrixSize>"
        f"<fieldOfView_mm><x>{fov_mm[0]}</x><y>{fov_mm[1]}</y><z>{fov_mm[2]}</z></fieldOfView_mm>"
    )
    xml = (
        '<?xml version="1.0"?>\n<ismrmrdHeader xmlns="http://www.ismrm.org/ISMRMRD">'
        "<measurementInformation><measurementID>scoremri_synthetic</measurementID>"
        "<patientPosition>HFS</patientPosition></measurementInformation>"
        f"<acquisitionSystemInformation><receiverChannels>{ncoils}</receiverChannels></acquisitionSystemInformation>"
        "<experimentalConditions><H1resonanceFrequency_Hz>63500000</H1resonanceFrequency_Hz></experimentalConditions>"
        f"<encoding><encodedSpace>{space}</encodedSpace><reconSpace>{space}</reconSpace><encodingLimits>"
        f"<kspace_encoding_step_1><minimum>0</minimum><maximum>{ny - 1}</maximum><center>{ny // 2}</center>"
        "</kspace_encoding_step_1><kspace_encoding_step_2><minimum>0</minimum><maximum>0</maximum><center>0</center>"
        f"</kspace_encoding_step_2><slice><minimum>0</minimum><maximum>{slices - 1}</maximum><center>0</center></slice>"
        f"<repetition><minimum>0</minimum><maximum>{repetitions - 1}</maximum><center>0</center></repetition>"
        f"</encodingLimits><trajectory>cartesian</trajectory>{pi}</encoding></ismrmrdHeader>"
    )
    ismrmrd.xsd.CreateFromDocument(xml)  # validate: strict classes
    return xml


def synthetic_recon_data(
    kspace: np.ndarray,
    rows: Sequence[int] | np.ndarray,
    *,
    slice_: int = 0,
    repetition: int = 0,
    ref_rows: Sequence[int] | np.ndarray | None = None,
    fov_mm: tuple[float, float, float] = (256.0, 256.0, 5.0),
    position: tuple[float, float, float] = (0.0, 0.0, 0.0),
    slice_dir: tuple[float, float, float] = (0.0, 0.0, 1.0),
) -> Any:
    """One 2-D slice as Gadgetron ReconData. kspace (C, ky, kx) complex; rows: acquired E1 indices (data);
    ref_rows: calibration lines placed in a full-size embedded ``ref`` buffer (None -> no ref).
    Headers are filled only for acquired lines, as BucketToBufferGadget does."""
    from gadgetron.types.recon_data import ReconBit, ReconBuffer, ReconData, SamplingDescription

    c, ny, nx = kspace.shape
    rows = np.asarray(rows, dtype=int)

    def make_buffer(lines: np.ndarray, flags: int) -> Any:
        data = np.zeros((nx, ny, 1, c, 1, 1, 1), dtype=np.complex64)
        for e1 in lines:
            data[:, e1, 0, :, 0, 0, 0] = kspace[:, e1, :].T
        headers = np.empty((ny, 1, 1, 1, 1), dtype=object)
        line_set = set(int(v) for v in lines)
        for e1 in range(ny):
            h = ismrmrd.AcquisitionHeader()
            if e1 in line_set:
                h.version = 1
                h.number_of_samples = nx
                h.active_channels = c
                h.available_channels = c
                h.center_sample = nx // 2
                h.sample_time_us = 5.0
                h.measurement_uid = 1
                h.scan_counter = e1
                h.flags = flags
                h.idx.kspace_encode_step_1 = e1
                h.idx.slice = slice_
                h.idx.repetition = repetition
                h.position[:] = position
                h.read_dir[:] = (1.0, 0.0, 0.0)
                h.phase_dir[:] = (0.0, 1.0, 0.0)
                h.slice_dir[:] = slice_dir
                h.patient_table_position[:] = (0.0, 0.0, -100.0)
            headers[e1, 0, 0, 0, 0] = h
        s = SamplingDescription()
        s.encoded_FOV[:] = fov_mm
        s.recon_FOV[:] = fov_mm
        s.encoded_matrix[:] = (nx, ny, 1)
        s.recon_matrix[:] = (nx, ny, 1)
        s.sampling_limits[0].min, s.sampling_limits[0].center, s.sampling_limits[0].max = 0, nx // 2, nx - 1
        s.sampling_limits[1].min, s.sampling_limits[1].center, s.sampling_limits[1].max = 0, ny // 2, ny - 1
        s.sampling_limits[2].min, s.sampling_limits[2].center, s.sampling_limits[2].max = 0, 0, 0
        return ReconBuffer(data, None, None, headers, s)

    data = make_buffer(rows, 0)
    ref = None if ref_rows is None else make_buffer(np.asarray(ref_rows, dtype=int), 1 << 19)
    return ReconData([ReconBit(data, ref)])


def image_array(image: ismrmrd.Image) -> np.ndarray:
    """An ismrmrd.Image's pixels as (z, y, x) (single channel)."""
    return np.asarray(image.data)[0]


__all__ = [
    "HarnessError", "HarnessResult", "config_xml", "run_execute", "run_connect", "header_xml",
    "synthetic_recon_data", "image_array",
]
