"""The Gadgetron external-language gadget: ``<execute name="scoremri.gadget.gadget" target="score_recon"
type="python"/>`` (``scoremri.gadget.gadget`` is the stable alias sites' XMLs name; the code is here).

``score_recon(connection)`` reads ReconData (message 1023) from BucketToBufferGadget, lets every other
message pass through unchanged, and sends complex64 images (1022). It never hangs the chain: unusable input
or any other failure becomes an ERROR message (id 8: uint64 length + UTF-8 text; gadgetron-python never
sends one itself) followed by CLOSE, after the images of earlier slices have been sent.

``<configuration>`` properties: ``preset`` (default ``fast``), ``device`` (auto|cpu|cuda) and any dotted
config name (``sampler.steps``, ...), either as ``<property name="x" value="y"/>`` or Gadgetron's
``<property><name>x</name><value>y</value></property>``.
"""
from __future__ import annotations

import logging
import re
import socket
import struct
import threading
import time
import xml.etree.ElementTree as ET
from typing import Any, Callable

from scoremri.recon.api import ReconError
from scoremri.recon.config import ConfigError, ReconConfig, load_config

from .pipeline import PipelineError, properties

log = logging.getLogger(__name__)

MSG_CONFIG = 2
MSG_CLOSE = 4
MSG_ERROR = 8
MSG_IMAGE = 1022
DEFAULT_PRESET = "fast"
HANDSHAKE_SECONDS = 30.0  # serve: the longest wait for CONFIG + HEADER of a queued scan
DRAIN_SECONDS = 10.0  # after an error: read and discard what the parent still sends, at most this long


class ConnectionDropped(EOFError):
    """The parent closed the socket without a CLOSE message."""


class SafeSocket:
    """Drop-in for gadgetron's ``Connection.SocketWrapper`` that fails fast on a dropped peer.

    gadgetron 1.4.1's wrapper loops forever on ``recv`` returning b'' after the peer closed; this one
    raises :class:`ConnectionDropped`. ``close`` sends CLOSE once and never raises.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.socket = sock
        self.closed = False
        self.close_sent = False
        self.aborted = False
        self.lock = threading.RLock()  # whole messages only: serve's abort() may come from another thread

    def read(self, nbytes: int) -> bytes:
        chunks = []
        left = nbytes
        while left > 0:
            chunk = self.socket.recv(min(left, 1 << 20))
            if not chunk:
                raise ConnectionDropped(f"connection closed by the peer ({nbytes - left} of {nbytes} bytes read)")
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)

    def write(self, data: Any) -> None:
        with self.lock:
            if self.aborted:  # after abort() nothing more goes out (the ERROR + CLOSE are already sent)
                return
            self.socket.sendall(data)

    def error_message(self, text: str) -> bytes:
        """The protocol's error message carrying ``text`` (Gadgetron: ERROR, id 8 + uint64 length + UTF-8)."""
        payload = text.encode("utf-8")
        return struct.pack("<HQ", MSG_ERROR, len(payload)) + payload

    def send_error(self, text: str) -> None:
        with self.lock:
            if not self.close_sent:
                self.write(self.error_message(text))

    def send_close(self) -> None:
        with self.lock:
            if not self.close_sent:
                self.close_sent = True
                self.write(struct.pack("<H", MSG_CLOSE))

    def abort(self, text: str) -> None:
        """From another thread: ERROR + CLOSE now, then half-close; later writes are dropped."""
        with self.lock:
            if not self.close_sent:
                try:
                    self.socket.sendall(self.error_message(text))
                    self.socket.sendall(struct.pack("<H", MSG_CLOSE))
                except OSError:
                    pass
                self.close_sent = True
            self.aborted = True
            try:
                self.socket.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def drain(self, seconds: float = DRAIN_SECONDS) -> None:
        """Half-close and discard incoming bytes until EOF (or ``seconds``), so no RST eats our ERROR."""
        try:
            self.socket.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        deadline = time.monotonic() + seconds
        try:
            while time.monotonic() < deadline:
                self.socket.settimeout(max(0.05, deadline - time.monotonic()))
                if not self.socket.recv(1 << 20):
                    return
        except OSError:
            return

    def close(self) -> None:
        if self.closed:
            return
        try:
            self.send_close()
        except OSError:
            pass
        self.closed = True
        try:
            self.socket.close()
        except OSError:
            pass


def open_connection(sock: socket.socket, timeout: float = HANDSHAKE_SECONDS) -> Any:
    """gadgetron's ``Connection`` on ``sock``, reading CONFIG and HEADER through :class:`SafeSocket`.

    ``Connection(sock)`` reads them through gadgetron 1.4.1's own wrapper, which spins forever when the peer
    drops before HEADER (serve's scan worker, and every queued scan behind it, would hang). Here a dropped
    peer raises :class:`ConnectionDropped` and one that stalls longer than ``timeout`` raises TimeoutError.
    """
    from gadgetron.external.connection import Connection

    connection = Connection.__new__(Connection)  # Connection.__init__, with our socket wrapper
    connection.socket = SafeSocket(sock)
    connection.readers = Connection._default_readers()
    connection.writers = Connection._default_writers()
    connection.raw_bytes = Connection.Struct(config=None, header=None)
    connection.filters = []
    sock.settimeout(timeout)
    connection.config, connection.raw_bytes.config = connection._read_config()
    connection.header, connection.raw_bytes.header = connection._read_header()
    sock.settimeout(None)
    return connection


def parse_properties(config: Any) -> dict[str, str]:
    """``<configuration>`` element (or XML text/bytes) -> {name: value}. None/empty -> {}."""
    if config is None:
        return {}
    if isinstance(config, (bytes, str)):
        text = config.decode("utf-8") if isinstance(config, bytes) else config
        if not text.strip():
            return {}
        try:
            config = ET.fromstring(text)
        except ET.ParseError as e:
            raise ConfigError(f"the <configuration> XML cannot be parsed: {e}") from e
    try:
        return properties(config)
    except PipelineError as e:
        raise ConfigError(str(e)) from e


def is_empty_xml_document(text: bytes | str) -> bool:
    """True for an XML document without a root element (only a declaration, comments, whitespace)."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    text = re.sub(r"<\?xml[^>]*\?>|<!--.*?-->", "", text.replace("\x00", ""), flags=re.S)
    return not text.strip()


def config_from_properties(
    props: dict[str, str], *, default_preset: str = DEFAULT_PRESET, default_device: str = "auto"
) -> tuple[ReconConfig, str]:
    """{preset, device, dotted names} -> (validated ReconConfig, device string)."""
    props = dict(props)
    preset = props.pop("preset", "") or default_preset
    device = props.pop("device", "") or default_device
    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        raise ConfigError(f"device = '{device}' is not one of auto, cpu, cuda")
    return load_config(preset, props), device


def handle_connection(
    connection: Any,
    *,
    prior_provider: Callable[[ReconConfig, str], Any] | None = None,
    default_preset: str = DEFAULT_PRESET,
    default_device: str = "auto",
    should_stop: Callable[[], str | None] | None = None,
    default_overrides: dict[str, str] | None = None,
    image_sink: Callable[[Any, ReconConfig], Any] | None = None,
) -> dict[str, Any]:
    """Serve one Gadgetron connection (already past CONFIG/HEADER). Returns the scan report.

    image_sink(header, config) returns an object with ``add(image)`` and ``close()`` that gets a copy of every
    image sent (serve's ``--dicom-dir``), or None; it must not raise.

    prior_provider(config, device) returns a loaded prior (serve mode: cached across scans) or None.
    should_stop() returning a reason ends the scan with ERROR + CLOSE (serve's SIGTERM).
    default_overrides: dotted names applied before the scan's own properties (serve's ``--set``).
    Never raises for scan problems: they become ERROR + CLOSE; a dropped parent just ends the scan.
    """
    from gadgetron.types import ReconData

    from ..core import ReconCore

    t0 = time.monotonic()
    sock = connection.socket
    if not isinstance(sock, SafeSocket):
        sock = SafeSocket(sock.socket)
        connection.socket = sock
    report: dict[str, Any] = {"status": "ok", "slices": 0, "images": 0, "nfe": 0, "fallbacks": []}
    core = None
    sink = None
    try:
        raw_config = connection.raw_bytes.config
        if connection.config is None and raw_config and raw_config.strip():
            if not is_empty_xml_document(raw_config):
                raise ConfigError("the <configuration> XML sent by Gadgetron cannot be parsed")
            log.warning("Gadgetron sent an empty <configuration> (its <distributed> node drops the <external> "
                        "configuration when it sends the stream to a worker): the %s preset and the defaults apply",
                        default_preset)
        props = {**(default_overrides or {}), **parse_properties(connection.config)}
        config, device = config_from_properties(props, default_preset=default_preset, default_device=default_device)
        prior = prior_provider(config, device) if prior_provider is not None else None
        core = ReconCore(connection.header, config, device=device, prior=prior)
        sink = image_sink(connection.header, config) if image_sink is not None else None
        connection.filter(ReconData)
        for item in connection:
            reason = should_stop() if should_stop is not None else None
            if reason:
                raise ReconError(reason)
            for image in core.process(item):
                sock.write(struct.pack("<H", MSG_IMAGE) + image.to_bytes())  # one atomic message
                log.info("image sent: slice %d, series %d, index %d", image.slice, image.image_series_index,
                         image.image_index)
                if sink is not None:
                    sink.add(image)
                reason = should_stop() if should_stop is not None else None
                if reason:
                    raise ReconError(reason)
        report.update(core.finish())
    except (ConnectionDropped, BrokenPipeError, ConnectionResetError) as e:
        # reading (ConnectionDropped) or sending: no CLOSE can go out; release the socket (serve lives on)
        log.warning("the parent dropped the connection: %s: %s", type(e).__name__, e)
        report["status"] = "dropped"
        sock.closed = True
        try:
            sock.socket.close()
        except OSError:
            pass
    except Exception as e:  # every other failure: ERROR + CLOSE, never a hang
        text = str(e) if isinstance(e, (ReconError, ConfigError)) else f"{type(e).__name__}: {e}"
        text = f"scoremri: {text}"
        log.error("%s", text, exc_info=not isinstance(e, (ReconError, ConfigError)))
        report["status"] = "error"
        report["error"] = text
        if core is not None:
            report.update({k: v for k, v in core.finish().items() if k != "status"})
        try:
            sock.send_error(text)
            sock.send_close()
            sock.drain()
        except OSError as e2:
            log.warning("could not deliver the ERROR message: %s", e2)
    if sink is not None:
        sink.close()  # what was written of an interrupted scan is finalised too
    report["seconds_total"] = round(time.monotonic() - t0, 3)
    return report


def score_recon(connection: Any) -> None:
    """Gadgetron external target (execute or connect mode)."""
    report = handle_connection(connection)
    log.info("scan report: %s", report)
