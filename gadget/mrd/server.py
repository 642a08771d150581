"""The MRD streaming protocol as a protocol of ``scoremri serve`` (``--protocol mrd``, port 9002 by custom):
what python-ismrmrd-server's client (``client.py``), Siemens FIRE / OpenRecon and ``gadgetron_ismrmrd_client``
speak. The server (:mod:`scoremri.gadget.server`) owns the accept loop, the queue, the warm prior, health and
SIGTERM; this module reads and answers one scan.

One scan, message by message:
1. CONFIG_FILE (1, a name) or CONFIG_TEXT (2), then HEADER (3: ISMRMRD XML), within
   :data:`HANDSHAKE_SECONDS`; then optionally a JSON text (5, or 2) with ``{"parameters": ...}``.
   What they mean: :mod:`scoremri.gadget.mrd.config`.
2. ACQUISITION (1008) messages, WAVEFORM (1026, read and dropped), TEXT (5, logged), then CLOSE (4). The
   readouts go through :func:`scoremri.gadget.gadgetron.chain.raw_chain`, the chain replay runs (NoiseAdjust
   with the noise scans that come first, RemoveROOversampling, AcquisitionAccumulateTrigger + BucketToBuffer
   as the shipped ``pipelines/scoremri.xml`` sets them), lazily: each buffer is reconstructed by the shared
   :class:`scoremri.gadget.core.ReconCore` as soon as its trigger fires (a new repetition) or the scan ends,
   and its images go out at once. Same buffers, same per-slice seeds: the images equal ``scoremri replay``.
3. Out: IMAGE (1022) messages (complex, and magnitude float/ushort by ``output.magnitude``; attributes in
   :mod:`scoremri.gadget.images`), TEXT lines (``INF``, ``WRN``; progress per buffer, fallbacks), CLOSE.

Problems: any scan problem (a bad config name or text, an unparsable header, junk or an oversized length on
the wire, NaN data, no calibration, a stream cut without CLOSE, SIGTERM) ends the scan with one TEXT line
``ERR <what>`` and CLOSE, after the images of the buffers finished before it; what the client still sends
is read and dropped for up to :data:`DRAIN_SECONDS` so the ERR line is not lost to a reset. A client that
vanishes just ends the scan (logged). A client silent for ``--idle-timeout`` seconds ends it too. The
server lives on and takes the next scan.
"""
from __future__ import annotations

import logging
import socket
import time
from typing import Any, Iterator

import ismrmrd

from scoremri.model.checkpoint import ModelLoadError
from scoremri.recon.api import ReconError
from scoremri.recon.config import ConfigError

from .. import threads
from ..files.rawfile import RawFileError, parse_header
from ..gadgetron.buffers import BufferLayoutError
from ..gadgetron.preprocess import PreprocessError, whitened_noise_std
from .config import ConfigResolver, Layer, ScanConfig, parse_json_parameters
from .wire import (MSG_ACQUISITION, MSG_CLOSE, MSG_CONFIG_FILE, MSG_CONFIG_TEXT, MSG_HEADER, MSG_IMAGE, MSG_TEXT,
                   MSG_WAVEFORM, ConnectionDropped, MrdSocket, WireError, message_name)

log = logging.getLogger(__name__)

DEFAULT_PORT = 9002
HANDSHAKE_SECONDS = 30.0  # config + header of a scan taken from the queue
IDLE_SECONDS = 600.0  # default --idle-timeout: longest silence between two messages of a scan
DRAIN_SECONDS = 10.0
SCAN_ERRORS = (ConfigError, RawFileError, WireError, PreprocessError, BufferLayoutError, ReconError,
               ModelLoadError)


class ScanStopped(Exception):
    """The server is stopping (SIGTERM): the scan ends with ERR + CLOSE."""


class StreamCut(Exception):
    """The client closed its side without CLOSE (a truncated stream, or a client that was killed)."""


class MrdScan:
    """One scan on one connection (:meth:`run`); the socket is the caller's to close."""

    def __init__(self, sock: MrdSocket, server: Any, peer: str, resolver: ConfigResolver,
                 idle_seconds: float) -> None:
        self.sock = sock
        self.server = server
        self.peer = peer
        self.resolver = resolver
        self.idle = idle_seconds if idle_seconds > 0 else None
        self.acquisitions = 0
        self.waveforms = 0
        self.client_closed = False
        self.phase = "starting"
        self.own_threads = False  # the scan set its own CPU threads (restored after it)
        self.report: dict[str, Any] = {"status": "ok", "slices": 0, "images": 0, "nfe": 0, "fallbacks": []}

    # ------------------------------------------------------------------------------------------ messages
    def info(self, text: str) -> None:
        log.info("scan from %s: %s", self.peer, text)
        self.sock.send_text(f"INF {text}")

    def warn(self, text: str) -> None:
        log.warning("scan from %s: %s", self.peer, text)
        self.sock.send_text(f"WRN {text}")

    def _handshake(self) -> tuple[ScanConfig, Any]:
        s = self.sock
        self.phase = "waiting for the configuration and header"
        s.socket.settimeout(HANDSHAKE_SECONDS)
        mid = s.read_id()
        name = text = None
        if mid == MSG_CONFIG_FILE:
            name = s.read_config_file()
        elif mid == MSG_CONFIG_TEXT:
            text = s.read_text("CONFIG_TEXT")
        else:
            raise WireError(f"first message is {message_name(mid)}: expected CONFIG_FILE (1) or CONFIG_TEXT (2)")
        mid = s.read_id()
        if mid != MSG_HEADER:
            raise WireError(f"message {message_name(mid)} after the configuration: expected HEADER (3)")
        header = parse_header(s.read_text("HEADER"), "HEADER message")
        if not header.encoding:
            raise WireError("HEADER message: the ISMRMRD header has no <encoding>")
        s.socket.settimeout(self.idle)
        self.phase = "reading the acquisitions"
        parameters: Layer | None = None
        if s.peek_id() in (MSG_TEXT, MSG_CONFIG_TEXT):
            mid = s.read_id()
            extra = s.read_text(message_name(mid))
            parameters = parse_json_parameters(extra, f"JSON parameters ({message_name(mid)} after the header)")
        scan = self.resolver.resolve(name=name, text=text, parameters=parameters)
        return scan, header

    def _acquisitions(self) -> Iterator[ismrmrd.Acquisition]:
        """The scan's readouts as they arrive; returns at CLOSE. Waveforms are dropped, TEXT lines logged."""
        s = self.sock
        while True:
            if self.server.stop_reason:
                raise ScanStopped(self.server.stop_reason)
            try:
                mid = s.read_id()
            except socket.timeout:
                raise WireError(f"no message for {self.idle:g} s after {self.acquisitions} acquisitions "
                                "(--idle-timeout): the scan is abandoned") from None
            if mid == MSG_ACQUISITION:
                acq = s.read_acquisition(self.acquisitions)
                self.acquisitions += 1
                yield acq
            elif mid == MSG_WAVEFORM:
                s.skip_waveform(self.waveforms)
                self.waveforms += 1
            elif mid == MSG_TEXT:
                log.info("scan from %s: client says: %s", self.peer, s.read_text("TEXT"))
            elif mid == MSG_CLOSE:
                self.client_closed = True
                return
            elif mid == MSG_IMAGE:
                raise WireError("IMAGE (1022) from the client: this server reconstructs raw readouts (1008) and "
                                "does not take images")
            elif mid in (MSG_CONFIG_FILE, MSG_CONFIG_TEXT, MSG_HEADER):
                raise WireError(f"{message_name(mid)} after {self.acquisitions} acquisitions: a configuration or "
                                "header in the middle of a scan")
            else:
                raise WireError(f"{message_name(mid)} after {self.acquisitions} acquisitions: not an MRD message "
                                "(a corrupt stream?)")

    # ------------------------------------------------------------------------------------------ the scan
    def run(self) -> dict[str, Any]:
        """Read, reconstruct and answer the scan; never raises for scan problems (the report says them)."""
        from scoremri.gadget.core import ReconCore
        from scoremri.gadget.gadgetron.chain import raw_chain
        from scoremri.gadget.images import scoremri_version

        core = None
        sink = None  # serve --dicom-dir: a copy of every image sent (never raises)
        t0 = time.monotonic()
        try:
            scan, header = self._handshake()
            cfg = scan.config
            self.report.update({"config": scan.source, "method": cfg.sampler.method})
            for w in scan.warnings:
                self.warn(w)
            self.info(f"scoremri {scoremri_version()}: configuration {scan.source}: method "
                      f"{cfg.sampler.method}, device {scan.device}")
            if scan.threads is not None:  # this scan's own thread count, for this scan only
                threads.configure(scan.threads, scan=True)
                self.own_threads = True
            prior = self.server.prior_for(cfg, scan.device)
            core = ReconCore(header, cfg, device=scan.device, prior=prior,
                             max_batch=self.server.slice_batch if scan.slice_batch is None else scan.slice_batch)
            image_sink = getattr(self.server, "image_sink", None)
            sink = image_sink(header, cfg) if image_sink is not None else None
            noise: dict[str, Any] = {}
            buffers = 0
            # the buffers of one trigger are ready together: one batch (ReconCore.process_many)
            for rds in raw_chain(self._acquisitions(), header, scan.spec, source=f"the MRD stream from {self.peer}",
                                 noise_report=noise, grouped=True):
                if buffers == 0:
                    self._noise_line(noise)
                    core.noise_std = whitened_noise_std(noise)  # the sanity check's noise level
                buffers += len(rds)
                tb = time.monotonic()
                done_before = len(core.report.fallbacks)
                images = 0
                for image in core.process_many(rds):
                    self.sock.send_image(image)
                    if sink is not None:
                        sink.add(image)
                    images += 1
                    if self.server.stop_reason:
                        raise ScanStopped(self.server.stop_reason)
                for fb in core.report.fallbacks[done_before:]:
                    self.warn(f"{fb['slice']}: FALLBACK to SENSE: {fb['reason']}")
                what = f"buffer {buffers}" if len(rds) == 1 else f"buffers {buffers - len(rds) + 1}-{buffers}"
                self.info(f"{what} ({self.acquisitions} acquisitions so far): {images} images sent in "
                          f"{time.monotonic() - tb:.1f} s")
            if not self.client_closed:  # the chain ended without CLOSE only through an exception
                raise StreamCut("the stream ended without CLOSE")
            self.report.update(core.finish())
            r = self.report
            self.info(f"done: {r['slices']} slices, {r['images']} images, NFE {r['nfe']}, "
                      f"{len(r['fallbacks'])} fallbacks, {time.monotonic() - t0:.1f} s")
        except StreamCut as e:
            self._fail(core, str(e), dropped=True)
        except ScanStopped as e:
            self._fail(core, str(e))
        except socket.timeout:
            self._fail(core, f"the client sent nothing for {self.sock.socket.gettimeout() or 0:g} s ({self.phase})")
        except (ConnectionDropped, OSError) as e:  # EOF, reset, broken pipe, keepalive timeout
            self._fail(core, f"truncated stream: the connection ended without CLOSE ({self.phase}, after "
                             f"{self.acquisitions} acquisitions): {type(e).__name__}: {e}", dropped=True)
        except SCAN_ERRORS as e:
            self._fail(core, str(e))
        except Exception as e:  # a bug must still end the scan cleanly
            log.exception("scan from %s: unexpected failure", self.peer)
            self._fail(core, f"{type(e).__name__}: {e}")
        if sink is not None:
            sink.close()  # what was written of an interrupted scan is finalised too
        self.report["acquisitions"] = self.acquisitions
        self.report["waveforms"] = self.waveforms
        return self.report

    def _noise_line(self, noise: dict[str, Any]) -> None:
        if noise.get("noise_scans"):
            self.info(f"noise prewhitening from {noise['noise_scans']} noise scans ({noise.get('noise_samples')} "
                      f"samples, noise std {noise.get('noise_std', 0.0):.4g})")
        else:
            self.warn("no noise scans before the first readout: the data are NOT prewhitened")

    def _fail(self, core: Any, text: str, dropped: bool = False) -> None:
        msg = f"scoremri: {text}"
        log.error("scan from %s: %s", self.peer, msg)
        self.report["status"] = "dropped" if dropped else "error"
        self.report["error"] = msg
        if core is not None:
            self.report.update({k: v for k, v in core.finish().items() if k != "status"})
        try:
            self.sock.send_error(msg)  # a client that only half-closed (a truncated file) still reads it
        except OSError as e:
            log.warning("scan from %s: the ERR line could not be delivered: %s", self.peer, e)


class MrdProtocol:
    """ScanProtocol of the MRD streaming protocol (registered as ``mrd`` in ``scoremri.gadget.server``)."""

    name = "mrd"
    default_port = DEFAULT_PORT
    first_ids = frozenset({MSG_CONFIG_FILE, MSG_CONFIG_TEXT})

    def __init__(self) -> None:
        self._resolver: ConfigResolver | None = None

    def prepare(self, server: Any) -> None:
        """At server start: the config resolver of the server's --preset, --set, --device and --config-dir
        (a missing --config-dir fails here, before the port opens)."""
        self._resolver = ConfigResolver(server.preset, server.overrides, server.device_arg,
                                        getattr(server, "config_dir", None))

    def resolver(self, server: Any) -> ConfigResolver:
        if self._resolver is None:
            self.prepare(server)
        assert self._resolver is not None
        return self._resolver

    def run_scan(self, conn: socket.socket, addr: Any, server: Any) -> dict[str, Any]:
        t0 = time.monotonic()
        peer = f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) else str(addr)
        sock = MrdSocket(conn)
        server.abort_current = sock.abort
        scan = MrdScan(sock, server, peer, self.resolver(server),
                       float(getattr(server, "idle_timeout", IDLE_SECONDS)))
        try:
            with threads.ScanSlot():  # counted among concurrent scans; the CPU share re-planned for it
                threads.rebalance()
                try:
                    report = scan.run()
                finally:
                    if scan.own_threads:
                        threads.restore()  # back to the server's own choice
            server.scan_finished(report, t0)  # before CLOSE goes out: a health query after CLOSE sees the scan
            status = report.get("status")
            try:
                if status == "error":
                    sock.send_close()
                    sock.drain(DRAIN_SECONDS)  # read what the client still sends: no reset eats the ERR line
                elif status == "dropped":
                    sock.send_close()  # a client that only half-closed its side still reads ERR + CLOSE
            except OSError:
                pass
        finally:
            sock.close()  # CLOSE if not sent yet (a finished scan), then the socket
        return report

    def refuse(self, conn: socket.socket, reason: str) -> None:
        s = MrdSocket(conn)
        try:
            s.send_error(reason)
            s.send_close()
            s.drain(2.0)
        except OSError:
            pass
        s.close()


PROTOCOL = MrdProtocol()
