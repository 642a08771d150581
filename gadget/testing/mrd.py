"""A scripted MRD streaming client for tests: exact control over what goes on the wire (a config name or text,
the header, optional JSON parameters, acquisitions or raw bytes such as junk or a forged length field) and
how the stream ends (CLOSE, a half-close without CLOSE, an abrupt reset), while a reader collects IMAGE
(1022), TEXT (5) and CLOSE (4). Every wait has a timeout. The real clients (python-ismrmrd-server's
``client.py``, ``gadgetron_ismrmrd_client``) are the judges of interoperability; this one makes the faults.
"""
from __future__ import annotations

import json
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

import ismrmrd

MSG_CONFIG_FILE, MSG_CONFIG_TEXT, MSG_HEADER, MSG_CLOSE, MSG_TEXT = 1, 2, 3, 4, 5
MSG_ACQUISITION, MSG_IMAGE = 1008, 1022


@dataclass
class MrdResult:
    """images in arrival order; texts: every TEXT line; closed: CLOSE seen; send_error: why sending stopped
    early (the server closed); timed_out: the reader gave up; seconds: connect -> end of the reader."""

    images: list[ismrmrd.Image] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    closed: bool = False
    send_error: str | None = None
    timed_out: bool = False
    seconds: float = 0.0

    @property
    def errors(self) -> list[str]:
        return [t for t in self.texts if t.startswith("ERR")]


def text_message(mid: int, text: str) -> bytes:
    payload = text.encode("utf-8") + b"\x00"
    return struct.pack("<HI", mid, len(payload)) + payload


def config_file_message(name: str) -> bytes:
    raw = name.encode("utf-8")[:1023]
    return struct.pack("<H", MSG_CONFIG_FILE) + raw + b"\x00" * (1024 - len(raw))


def acquisition_message(acq: ismrmrd.Acquisition) -> bytes:
    return struct.pack("<H", MSG_ACQUISITION) + acq.to_bytes()


def _read_exact(sock: socket.socket, n: int, deadline: float) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        sock.settimeout(max(0.05, deadline - time.monotonic()))
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError("connection closed")
        buf += chunk
    return bytes(buf)


def run_mrd(
    host: str,
    port: int,
    *,
    config_name: str | None = None,
    config_text: str | None = None,
    header: str | None = None,
    parameters: dict[str, Any] | None = None,
    items: Iterable[ismrmrd.Acquisition | bytes] = (),
    end: str = "close",
    first: bytes | None = None,
    timeout: float = 60.0,
    result: MrdResult | None = None,
) -> MrdResult:
    """One scan. ``first`` replaces the config message with raw bytes; ``items`` are acquisitions or raw bytes;
    end: ``close`` (CLOSE), ``shutdown`` (half-close without CLOSE: a truncated stream, still reading),
    ``reset`` (abrupt close with RST: a client killed mid-scan; nothing more is read). ``result``: the object
    to fill (an ``items`` generator may watch its images arrive while it sends)."""
    res = result if result is not None else MrdResult()
    t0 = time.monotonic()
    deadline = t0 + timeout
    sock = socket.create_connection((host, port), timeout=timeout)

    def sender() -> None:
        try:
            if first is not None:
                sock.sendall(first)
            elif config_text is not None:
                sock.sendall(text_message(MSG_CONFIG_TEXT, config_text))
            elif config_name is not None:
                sock.sendall(config_file_message(config_name))
            if header is not None:
                sock.sendall(text_message(MSG_HEADER, header))
            if parameters is not None:
                sock.sendall(text_message(MSG_TEXT, json.dumps(parameters)))
            for it in items:
                sock.sendall(it if isinstance(it, (bytes, bytearray)) else acquisition_message(it))
            if end == "close":
                sock.sendall(struct.pack("<H", MSG_CLOSE))
            elif end == "shutdown":
                sock.shutdown(socket.SHUT_WR)
            elif end == "reset":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()
        except OSError as e:
            res.send_error = f"{type(e).__name__}: {e}"

    t = threading.Thread(target=sender, daemon=True)
    t.start()
    if end == "reset":
        t.join(timeout)
        res.seconds = time.monotonic() - t0
        return res
    try:
        while True:
            (mid,) = struct.unpack("<H", _read_exact(sock, 2, deadline))
            if mid == MSG_CLOSE:
                res.closed = True
                break
            if mid == MSG_TEXT:
                (n,) = struct.unpack("<I", _read_exact(sock, 4, deadline))
                res.texts.append(_read_exact(sock, n, deadline).split(b"\x00", 1)[0].decode("utf-8", "replace"))
            elif mid == MSG_IMAGE:
                res.images.append(ismrmrd.Image.deserialize_from(lambda k: _read_exact(sock, k, deadline)))
            else:
                raise ValueError(f"unexpected message id {mid} from the server")
    except socket.timeout:
        res.timed_out = True
    except (EOFError, OSError):
        pass
    finally:
        t.join(max(0.0, deadline - time.monotonic()))
        try:
            sock.close()
        except OSError:
            pass
    res.seconds = time.monotonic() - t0
    return res


__all__ = ["MrdResult", "acquisition_message", "config_file_message", "run_mrd", "text_message"]
