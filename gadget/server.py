"""``scoremri serve``: the long-lived server every streaming protocol shares (a warm model, one scan at a time).

- ``--protocol`` picks the wing that speaks to the scanner side (:data:`PROTOCOLS`): ``gadgetron``
  (Gadgetron's connect mode, ``pipelines/scoremri_connect.xml``; :mod:`scoremri.gadget.gadgetron.connect`;
  port 9003) or ``mrd`` (the MRD streaming protocol of python-ismrmrd-server, Siemens FIRE / OpenRecon and
  ``gadgetron_ismrmrd_client``: raw readouts in, buffered here; :mod:`scoremri.gadget.mrd.server`; port 9002,
  config names resolved against ``--config-dir``). The wing reads and answers one scan; this module owns
  everything around it.
- Loads the prior of ``--preset`` once (warmed with one network call; ``torch.compile`` when the preset's
  ``model.compile`` is set) and keeps it for every scan; another model asked by a scan is loaded once and
  cached too. ``health.model_loads`` counts the loads.
- Its own accept loop: one scan is reconstructed at a time, further connections wait in a FIFO queue.
  TCP keepalive on every connection.
- Health: a client that sends a TEXT message (id 5, uint32 length + ``health``) instead of a scan's first
  message gets a TEXT reply with a JSON status (answered even during a scan); ``scoremri serve --check`` is
  that client (exit 0 healthy, 1 not). A plain TCP probe of the port also works.
- SIGTERM / SIGINT: the scan in progress ends with the protocol's error + close (queued scans too), then exit 0.
- Per-scan log line: peer, slices, images, seconds, NFE, fallbacks, status.
- Threads: ``--threads`` (default auto, :mod:`scoremri.gadget.threads`), chosen once at start and logged; a
  scan's ``threads`` property applies to that scan only. ``--slice-batch``: most slices per sampler run.
- Binds 127.0.0.1 unless ``--host`` says otherwise (the scanner network only, never 0.0.0.0 by default).
- ``--dicom-dir DIR``: a copy of every image of a scan also goes to DIR as DICOM series (one folder per
  scan, :class:`scoremri.gadget.files.dicom.ScanDicomSink`); both protocols (gadgetron, mrd) hand each image
  sent to :meth:`Server.image_sink`'s object. A failed write is logged and never stops the scan.
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import queue
import signal
import socket
import struct
import sys
import threading
import time
from typing import Any, Callable, Protocol

log = logging.getLogger(__name__)

MSG_TEXT = 5
HEALTH_REQUEST = b"health"
# protocol name -> "module:attribute" of its ScanProtocol (imported only when chosen)
PROTOCOLS: dict[str, str] = {
    "gadgetron": "scoremri.gadget.gadgetron.connect:PROTOCOL",
    "mrd": "scoremri.gadget.mrd.server:PROTOCOL",
}


class ScanProtocol(Protocol):
    """What a wing provides to the server: how one scan on an accepted socket is read and answered."""

    name: str
    default_port: int
    first_ids: frozenset[int]  # message ids a scan starts with (anything else is refused at the handshake)

    def run_scan(self, conn: socket.socket, addr: Any, server: "Server") -> dict[str, Any]:
        """Serve one scan to its end; never raises for scan problems (they become the protocol's error
        message + close). Registers ``server.abort_current`` while it runs. Returns the scan report."""

    def refuse(self, conn: socket.socket, reason: str) -> None:
        """Tell a client whose scan will not be started why, in the protocol's terms, and close."""

    # optional: ``prepare(server)``, called once at start before the port opens (e.g. to check options)


def _threads_now() -> int | None:
    from . import threads

    plan = threads.current()
    return None if plan is None else plan.threads


def load_protocol(name: str) -> ScanProtocol:
    """The ScanProtocol registered as ``name`` (ValueError listing the known ones)."""
    if name not in PROTOCOLS:
        raise ValueError(f"unknown protocol '{name}' (available: {', '.join(sorted(PROTOCOLS))})")
    module, attr = PROTOCOLS[name].split(":")
    return getattr(importlib.import_module(module), attr)


def check_health(host: str, port: int, timeout: float = 5.0) -> dict[str, Any]:
    """Ask a running server for its health JSON. Raises OSError/ValueError when it does not answer."""
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.settimeout(timeout)
        s.sendall(struct.pack("<HI", MSG_TEXT, len(HEALTH_REQUEST)) + HEALTH_REQUEST)
        head = _recv_exact(s, 6)
        mid, n = struct.unpack("<HI", head)
        if mid != MSG_TEXT:
            raise ValueError(f"unexpected message id {mid} in the health answer")
        return json.loads(_recv_exact(s, n).decode("utf-8"))


def _recv_exact(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("connection closed before the full answer")
        buf += chunk
    return bytes(buf)


def _keepalive(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", 30), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, name):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)
            except OSError:
                pass


class Server:
    """The accept loop, the scan queue and the warm prior cache, for one ScanProtocol."""

    def __init__(self, protocol: ScanProtocol, host: str, port: int, device: str, preset: str,
                 overrides: dict[str, str], *, config_dir: str | None = None, idle_timeout: float = 600.0,
                 dicom_dir: str | None = None, anonymise: bool = False,
                 slice_batch: int = 0) -> None:
        from scoremri.recon.api import resolve_device
        from scoremri.recon.config import load_config

        self.protocol = protocol
        self.host, self.port = host, port
        self.device_arg = device
        self.device = resolve_device(device)
        self.preset = preset
        self.overrides = overrides
        self.slice_batch = int(slice_batch)
        self.default_config = load_config(preset, overrides)  # validated at start: bad flags fail early
        self.config_dir = config_dir  # MRD: where config names (CONFIG_FILE) resolve to files
        self.idle_timeout = idle_timeout  # MRD: longest silence between two messages of a scan (0 = none)
        self.priors: dict[tuple, Any] = {}
        self.model_loads = 0
        self.scans_done = 0
        self.scans_failed = 0
        self.in_progress: str | None = None
        self.queue: "queue.Queue[tuple[socket.socket, Any] | None]" = queue.Queue()
        self.stop_reason: str | None = None
        self.started = time.time()
        self.lock = threading.Lock()
        self.lsock: socket.socket | None = None
        self.last_report: dict[str, Any] = {}
        self.abort_current: Callable[[str], None] | None = None  # set by the protocol while a scan runs
        self.dicom_dir = dicom_dir
        self.anonymise = anonymise

    # ---------------------------------------------------------------------------------- prior cache
    def prior_for(self, config: Any, device: str) -> Any:
        """The warm prior for a scan's config (None for methods without one); loaded once per model/device."""
        from scoremri.gadget.core import load_prior
        from scoremri.recon.api import resolve_device
        from scoremri.recon.methods import needs_prior

        if not needs_prior(config.sampler.method):
            return None
        dev = resolve_device(device)
        m = config.model
        key = (m.path, m.backend, m.precision, m.compile, str(dev))
        with self.lock:
            if key not in self.priors:
                t0 = time.perf_counter()
                prior = load_prior(config, dev)
                self._warm(prior, dev)
                self.priors[key] = prior
                self.model_loads += 1
                log.info("model %s loaded and warmed on %s in %.2f s (load #%d)",
                         m.path or "<default>", dev, time.perf_counter() - t0, self.model_loads)
            return self.priors[key]

    @staticmethod
    def _warm(prior: Any, device: Any) -> None:
        import torch

        try:
            x = torch.zeros(1, 1, 64, 64, device=device)
            s = torch.full((1,), float(getattr(prior, "sigma_max", 1.0)) * 0.5, device=device)
            with torch.no_grad():
                prior.denoise(x, s)
        except Exception as e:  # warming is best effort; a real failure shows at the first scan
            log.warning("warm-up call failed: %s", e)

    def health(self) -> dict[str, Any]:
        return {
            "status": "stopping" if self.stop_reason else "ok",
            "protocol": self.protocol.name,
            "pid": os.getpid(),
            "uptime_s": round(time.time() - self.started, 1),
            "device": str(self.device),
            "threads": _threads_now(),
            "preset": self.preset,
            "model_loads": self.model_loads,
            "models": [
                {"path": k[0] or "<default>", "sha256": getattr(p, "sha256", "")[:12], "device": k[4]}
                for k, p in self.priors.items()
            ],
            "scans_done": self.scans_done,
            "scans_failed": self.scans_failed,
            "scan_in_progress": self.in_progress,
            "queued": self.queue.qsize(),
            "last_scan": self.last_report,
        }

    def image_sink(self, header: Any, config: Any) -> Any:
        """Where a copy of each image of a scan goes besides the scanner: the DICOM series of the scan under
        ``--dicom-dir`` (:class:`scoremri.gadget.files.dicom.ScanDicomSink`, never raises), or None."""
        if not self.dicom_dir:
            return None
        from scoremri.gadget.files.dicom import ScanDicomSink
        from scoremri.gadget.files.replay import recon_id

        return ScanDicomSink(self.dicom_dir, header, anonymise=self.anonymise,
                             recon_id=recon_id(config, config.sampler.method))

    # ---------------------------------------------------------------------------------- connections
    def _handshake(self, conn: socket.socket, addr: Any) -> None:
        """Peek the first message id: TEXT 'health' -> answer now; a scan's first message -> queue the scan."""
        try:
            conn.settimeout(30.0)
            head = conn.recv(2, socket.MSG_PEEK | socket.MSG_WAITALL)
            if len(head) < 2:
                conn.close()
                return
            (mid,) = struct.unpack("<H", head)
            if mid == MSG_TEXT:
                _recv_exact(conn, 2)
                (n,) = struct.unpack("<I", _recv_exact(conn, 4))
                _recv_exact(conn, min(n, 1 << 16))
                body = json.dumps(self.health()).encode("utf-8")
                conn.sendall(struct.pack("<HI", MSG_TEXT, len(body)) + body)
                conn.close()
                return
            if mid not in self.protocol.first_ids:
                reason = (f"scoremri serve ({self.protocol.name} protocol): unexpected first message id {mid} "
                          f"(expected {' or '.join(map(str, sorted(self.protocol.first_ids)))}); not a scan, closing")
                log.warning("connection from %s: %s", addr, reason)
                self.protocol.refuse(conn, reason)
                return
            conn.settimeout(None)
            _keepalive(conn)
            log.info("scan connection from %s queued (%d waiting)", addr, self.queue.qsize())
            self.queue.put((conn, addr))
        except OSError as e:
            log.warning("connection from %s failed during the handshake: %s", addr, e)
            try:
                conn.close()
            except OSError:
                pass

    def _worker(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            conn, addr = item
            if self.stop_reason:
                self._refuse(conn, addr)
                continue
            self._run_scan(conn, addr)

    def _refuse(self, conn: socket.socket, addr: Any) -> None:
        self.protocol.refuse(conn, f"scoremri serve: {self.stop_reason}; the scan was not started")
        log.info("scan from %s refused: %s", addr, self.stop_reason)

    def _run_scan(self, conn: socket.socket, addr: Any) -> None:
        t0 = time.monotonic()
        peer = f"{addr[0]}:{addr[1]}"
        self.in_progress = peer
        report: dict[str, Any] = {"status": "error"}
        try:
            report = self.protocol.run_scan(conn, addr, self)
        except Exception as e:  # a protocol bug must not take the server down
            log.exception("scan from %s: unexpected failure: %s", peer, e)
            report = {"status": "error", "error": f"{type(e).__name__}: {e}"}
            try:
                conn.close()
            except OSError:
                pass
        finally:
            self.abort_current = None
            self.in_progress = None
        report["seconds_wall"] = round(time.monotonic() - t0, 3)
        log.info(
            "scan from %s: status %s, %s slices, %s images, %.2f s, NFE %s, %d fallbacks%s",
            peer, report.get("status"), report.get("slices", 0), report.get("images", 0),
            report.get("seconds_wall", 0.0), report.get("nfe", 0), len(report.get("fallbacks", [])),
            f", error: {report['error']}" if report.get("error") else "",
        )

    def scan_finished(self, report: dict[str, Any], t0: float) -> None:
        """Bookkeeping of one scan; the protocol calls it BEFORE its final close goes out, so a health query
        made after the client saw the close counts this scan."""
        if report.get("status") == "ok":
            self.scans_done += 1
        else:
            self.scans_failed += 1
        self.last_report = {k: report.get(k) for k in ("status", "slices", "images", "nfe")}
        self.last_report["seconds_wall"] = round(time.monotonic() - t0, 3)
        self.last_report["fallbacks"] = len(report.get("fallbacks", []))

    def bind(self) -> None:
        """Open the listening socket (OSError names host and port, e.g. a port already in use)."""
        fam = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        lsock = socket.socket(fam, socket.SOCK_STREAM)
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            lsock.bind((self.host, self.port))
            lsock.listen(16)
        except OSError as e:
            lsock.close()
            raise OSError(e.errno, f"cannot listen on {self.host}:{self.port}: {e.strerror or e}") from None
        lsock.settimeout(0.5)
        self.lsock = lsock
        self.port = lsock.getsockname()[1]

    def serve_forever(self, warmup: bool = True) -> int:
        if self.lsock is None:
            self.bind()
        if warmup:
            self.prior_for(self.default_config, self.device_arg)
        worker = threading.Thread(target=self._worker, name="scan-worker", daemon=True)
        worker.start()
        log.info("scoremri serve (%s protocol) listening on %s:%d (device %s, preset %s, pid %d)",
                 self.protocol.name, self.host, self.port, self.device, self.preset, os.getpid())
        assert self.lsock is not None
        while not self.stop_reason:
            try:
                conn, addr = self.lsock.accept()
            except socket.timeout:
                continue
            except OSError:
                if self.stop_reason:
                    break
                raise
            threading.Thread(target=self._handshake, args=(conn, addr), daemon=True).start()
        self.lsock.close()
        # the scan in progress ends with the protocol's error + close now (its worker stops at the next message)
        abort = self.abort_current
        if abort is not None:
            abort(f"scoremri serve: {self.stop_reason}; the scan was not completed")
        self.queue.put(None)
        worker.join(60.0)
        while True:
            try:
                item = self.queue.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                self._refuse(*item)
        log.info("scoremri serve stopped (%s): %d scans done, %d failed", self.stop_reason, self.scans_done,
                 self.scans_failed)
        return 0

    def request_stop(self, reason: str) -> None:
        if not self.stop_reason:
            log.info("stopping: %s", reason)
            self.stop_reason = reason


# ------------------------------------------------------------------------------------------------- CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    from scoremri.recon.config import preset_names

    from .cli import add_runtime_arguments

    p.add_argument("--protocol", default="gadgetron", choices=sorted(PROTOCOLS),
                   help="what the scanner side speaks: gadgetron = Gadgetron's <connect> mode (default); mrd = the "
                        "MRD streaming protocol (python-ismrmrd-server client, FIRE/OpenRecon, gadgetron_ismrmrd_client)")
    p.add_argument("--port", type=int, default=None,
                   help="TCP port (default: the protocol's, 9003 for gadgetron connect mode, 9002 for mrd)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: loopback only)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="compute device (default auto)")
    p.add_argument("--preset", default="fast", metavar="PRESET",
                   help=f"preset when a scan's configuration names none (default fast; one of {', '.join(preset_names())}, or a YAML file)")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="default config override for every scan, e.g. --set sampler.steps=20 (repeatable)")
    p.add_argument("--check", action="store_true", help="query a running server's health and exit 0 (healthy) or 1")
    p.add_argument("--timeout", type=float, default=5.0, help="--check: seconds to wait for the answer (default 5)")
    p.add_argument("--no-warmup", action="store_true", help="do not load and warm the prior at start")
    p.add_argument("--config-dir", default=None, metavar="DIR",
                   help="mrd: folder of site configurations; a config name sent by a client (never a path) resolves "
                        "to DIR/NAME[.yaml|.yml|.json|.xml] before the shipped presets")
    p.add_argument("--idle-timeout", type=float, default=600.0, metavar="S",
                   help="mrd: end a scan whose client sends nothing for S seconds (default 600; 0 = wait forever)")
    p.add_argument("--dicom-dir", default=None, metavar="DIR",
                   help="also write each scan's images as DICOM series into DIR/<date-time>_<hash>/ (a failed "
                        "write is logged; the images still go back to the scanner)")
    p.add_argument("--anonymise", "--anonymize", action="store_true",
                   help="--dicom-dir: leave out patient and study identity")
    add_runtime_arguments(p)


def run(args: argparse.Namespace) -> int:
    from scoremri.recon.config import parse_overrides

    from .cli import UsageError

    protocol = load_protocol(args.protocol)
    port = protocol.default_port if args.port is None else args.port
    if not 0 <= port <= 65535:
        raise UsageError(f"--port {port} is not a TCP port (0-65535)")
    if args.check:
        try:
            h = check_health(args.host, port, args.timeout)
        except (OSError, ValueError) as e:
            log.error("unhealthy: no health answer from %s:%d (%s)", args.host, port, e)
            return 1
        sys.stdout.write(json.dumps(h) + "\n")  # machine-readable answer for health checks / scripts
        return 0 if h.get("status") == "ok" else 1
    if args.idle_timeout < 0:
        raise UsageError(f"--idle-timeout {args.idle_timeout:g} must be >= 0")
    if args.config_dir is not None and not os.path.isdir(args.config_dir):
        raise UsageError(f"--config-dir {args.config_dir}: not a folder")
    if args.anonymise and not args.dicom_dir:
        raise UsageError("--anonymise applies to --dicom-dir output")
    if args.dicom_dir is not None and os.path.exists(args.dicom_dir) and not os.path.isdir(args.dicom_dir):
        raise UsageError(f"--dicom-dir {args.dicom_dir}: not a folder")
    from .threads import configure

    server = Server(protocol, args.host, port, args.device, args.preset, parse_overrides(args.set),
                    config_dir=args.config_dir, idle_timeout=args.idle_timeout, dicom_dir=args.dicom_dir,
                    anonymise=args.anonymise, slice_batch=args.slice_batch or 0)
    prepare = getattr(protocol, "prepare", None)
    if prepare is not None:
        prepare(server)
    server.bind()  # before the model loads: a port in use fails at once, naming the port
    configure(args.threads)
    signal.signal(signal.SIGTERM, lambda *_: server.request_stop("SIGTERM received, the server is shutting down"))
    signal.signal(signal.SIGINT, lambda *_: server.request_stop("SIGINT received, the server is shutting down"))
    return server.serve_forever(warmup=not args.no_warmup)
