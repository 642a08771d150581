"""The Gadgetron external-language gadget: ``<execute name="scoremri.gadget.gadget" target="score_recon"
type="python"/>`` (``scoremri.gadget.gadget`` is the stable alias sites' XMLs name; the code is here).

``score_recon(connection)`` reads ReconData (message 1023) from BucketToBufferGadget, lets every other
message pass through unchanged, and sends complex64 images (1022). It never hangs the chain: unusable input
or any other failure becomes an ERROR message (id 8: uint64 length + UTF-8 text; gadgetron-python never
sends one itself) followed by CLOSE, after the images of earlier slices have been sent.

``<configuration>`` properties: ``preset`` (default ``fast``), the runtime settings ``device``
(auto|cpu|cuda), ``threads`` (CPU threads, default auto: :mod:`scoremri.gadget.threads`) and ``slice_batch``
(most slices per sampler run, default 0 = auto), and any dotted config name (``sampler.steps``, ...), either
as ``<property name="x" value="y"/>`` or Gadgetron's ``<property><name>x</name><value>y</value></property>``.

Slices are batched as they arrive: a reader thread takes the messages off the socket while the
reconstruction runs, and every ReconData already waiting when a batch starts (the slices of one trigger,
or those of a series that arrived during the previous batch) goes into the same sampler run; a slice that
arrives alone is reconstructed alone, at once.
"""
from __future__ import annotations

import logging
import queue
import re
import socket
import struct
import threading
import time
import xml.etree.ElementTree as ET
from typing import Any, Callable

from scoremri.recon.api import ReconError
from scoremri.recon.config import ConfigError, ReconConfig, load_config

from .. import threads as cpu_threads
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


RUNTIME_PROPERTIES = ("threads", "slice_batch")  # runtime settings besides device: never part of a preset


def config_from_properties(
    props: dict[str, str], *, default_preset: str = DEFAULT_PRESET, default_device: str = "auto"
) -> tuple[ReconConfig, str]:
    """{preset, device, dotted names} -> (validated ReconConfig, device string). ``threads`` and
    ``slice_batch`` are read by :func:`runtime_from_properties` and ignored here."""
    props = {k: v for k, v in props.items() if k not in RUNTIME_PROPERTIES}
    preset = props.pop("preset", "") or default_preset
    device = props.pop("device", "") or default_device
    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        raise ConfigError(f"device = '{device}' is not one of auto, cpu, cuda")
    return load_config(preset, props), device


def runtime_from_properties(props: dict[str, str]) -> tuple[int | None, int | None]:
    """(threads, slice_batch) from the properties: None where absent; threads 0 / 'auto' -> None."""
    threads = slice_batch = None
    if props.get("threads", "").strip():
        try:
            threads = cpu_threads.parse_threads(props["threads"])
        except cpu_threads.ThreadsError as e:
            raise ConfigError(str(e)) from None
    if props.get("slice_batch", "").strip():
        try:
            slice_batch = int(props["slice_batch"])
        except ValueError:
            slice_batch = -1
        if slice_batch < 0:
            raise ConfigError(f"slice_batch = '{props['slice_batch']}' is not an integer >= 0 (0 = auto)")
    return threads, slice_batch


class Prefetch:
    """Reads a connection's messages on a thread into a queue (at most ``depth`` waiting, then the reader
    waits: back-pressure), so that the ReconData which arrive while a batch runs can be taken at once.

    Items come out in arrival order as ("item", x), ("end", None) after CLOSE, or ("error", exception).
    ``stop()`` lets the reader thread end (it also ends when the socket closes)."""

    def __init__(self, connection: Any, depth: int) -> None:
        self.connection = connection
        self.queue: "queue.Queue[tuple[str, Any]]" = queue.Queue(maxsize=max(int(depth), 1))
        self._stopped = threading.Event()
        self.thread = threading.Thread(target=self._read, name="scoremri-reader", daemon=True)
        self.thread.start()

    def _put(self, entry: tuple[str, Any]) -> bool:
        while not self._stopped.is_set():
            try:
                self.queue.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _read(self) -> None:
        try:
            while not self._stopped.is_set():
                _, item = self.connection._read_item()  # every message, unfiltered (pass-through is ours)
                if not self._put(("item", item)):
                    return
        except StopIteration:
            self._put(("end", None))
        except BaseException as e:  # noqa: BLE001 - handed to the scan's thread, which decides
            self._put(("error", e))

    def get(self, block: bool = True) -> tuple[str, Any] | None:
        """The next entry (None when ``block`` is False and nothing waits)."""
        try:
            return self.queue.get(block=block)
        except queue.Empty:
            return None

    def stop(self) -> None:
        self._stopped.set()


def _batches(prefetch: Prefetch, connection: Any, is_batchable: Callable[[Any], bool], max_items: int):
    """Yield lists of consecutive batchable items: the first waited for, the rest those already waiting
    (at most ``max_items``). Other messages are sent back (pass-through) in their order."""
    pending: tuple[str, Any] | None = None
    while True:
        entry = pending or prefetch.get()
        pending = None
        assert entry is not None
        kind, item = entry
        if kind == "end":
            return
        if kind == "error":
            raise item
        if not is_batchable(item):
            connection.send(item)
            continue
        batch = [item]
        while len(batch) < max_items:
            nxt = prefetch.get(block=False)
            if nxt is None:
                break
            if nxt[0] == "item" and is_batchable(nxt[1]):
                batch.append(nxt[1])
            else:
                pending = nxt
                break
        yield batch


def handle_connection(
    connection: Any,
    *,
    prior_provider: Callable[[ReconConfig, str], Any] | None = None,
    default_preset: str = DEFAULT_PRESET,
    default_device: str = "auto",
    should_stop: Callable[[], str | None] | None = None,
    default_overrides: dict[str, str] | None = None,
    image_sink: Callable[[Any, ReconConfig], Any] | None = None,
    threads_configured: bool = False,
    default_slice_batch: int = 0,
) -> dict[str, Any]:
    """Serve one Gadgetron connection (already past CONFIG/HEADER). Returns the scan report.

    image_sink(header, config) returns an object with ``add(image)`` and ``close()`` that gets a copy of every
    image sent (serve's ``--dicom-dir``), or None; it must not raise.

    prior_provider(config, device) returns a loaded prior (serve mode: cached across scans) or None.
    should_stop() returning a reason ends the scan with ERROR + CLOSE (serve's SIGTERM).
    default_overrides: dotted names applied before the scan's own properties (serve's ``--set``).
    threads_configured: the process already chose its threads (serve: --threads); a scan's ``threads``
    property then applies to that scan only. Otherwise (execute mode) the threads are chosen here, once.
    default_slice_batch: slices per sampler run when the scan does not say (0 = auto).
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
    prefetch: Prefetch | None = None
    scan_threads = False
    slot = cpu_threads.ScanSlot().__enter__()  # counted among concurrent scans until the scan ends
    try:
        raw_config = connection.raw_bytes.config
        if connection.config is None and raw_config and raw_config.strip():
            if not is_empty_xml_document(raw_config):
                raise ConfigError("the <configuration> XML sent by Gadgetron cannot be parsed")
            log.warning("Gadgetron sent an empty <configuration> (its <distributed> node drops the <external> "
                        "configuration when it sends the stream to a worker): the %s preset and the defaults apply",
                        default_preset)
        props = {**(default_overrides or {}), **parse_properties(connection.config)}
        threads, slice_batch = runtime_from_properties(props)
        if not threads_configured:
            cpu_threads.configure(threads)
        elif threads is not None:
            cpu_threads.configure(threads, scan=True)  # this scan asks for its own count
            scan_threads = True
        else:
            cpu_threads.rebalance()  # this scan now counts among the concurrent ones
        config, device = config_from_properties(props, default_preset=default_preset, default_device=default_device)
        prior = prior_provider(config, device) if prior_provider is not None else None
        core = ReconCore(connection.header, config, device=device, prior=prior,
                         max_batch=default_slice_batch if slice_batch is None else slice_batch)
        sink = image_sink(connection.header, config) if image_sink is not None else None
        prefetch = Prefetch(connection, depth=2 * core.max_batch)
        for batch in _batches(prefetch, connection, lambda x: isinstance(x, ReconData), core.max_batch):
            reason = should_stop() if should_stop is not None else None
            if reason:
                raise ReconError(reason)
            for image in core.process_many(batch):
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
        if prefetch is not None:
            prefetch.stop()  # drain() below reads the rest
        try:
            sock.send_error(text)
            sock.send_close()
            sock.drain()
        except OSError as e2:
            log.warning("could not deliver the ERROR message: %s", e2)
    finally:
        if prefetch is not None:
            prefetch.stop()
        slot.__exit__(None, None, None)
        if scan_threads:
            cpu_threads.restore()  # back to the server's own choice
    if sink is not None:
        sink.close()  # what was written of an interrupted scan is finalised too
    report["seconds_total"] = round(time.monotonic() - t0, 3)
    return report


def score_recon(connection: Any) -> None:
    """Gadgetron external target (execute or connect mode)."""
    report = handle_connection(connection)
    log.info("scan report: %s", report)
