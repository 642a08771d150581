"""The MRD streaming protocol on a socket (the framing of python-ismrmrd-server's client and server), with limits.

Every message is a little-endian uint16 id and a payload:

| id | name | payload |
| --- | --- | --- |
| 1 | CONFIG_FILE | 1024 bytes, a NUL-terminated config name |
| 2 | CONFIG_TEXT | uint32 length + text (NUL-terminated by python-ismrmrd-server, not by gadgetron_ismrmrd_client) |
| 3 | HEADER | uint32 length + ISMRMRD XML |
| 4 | CLOSE | nothing |
| 5 | TEXT | uint32 length + text (log lines both ways; FIRE colours lines starting DBG / WRN / ERR) |
| 1008 | ACQUISITION | 340-byte AcquisitionHeader, trajectory float32, data complex64 |
| 1022 | IMAGE | 198-byte ImageHeader, uint64 attribute length, MetaContainer XML, data |
| 1026 | WAVEFORM | 40-byte WaveformHeader, uint32 data (channels x samples) |

The reader never trusts a length: texts are limited to :data:`MAX_TEXT_BYTES`, an acquisition's payload to
:data:`MAX_ACQUISITION_BYTES` (its header is checked before anything is allocated), waveforms likewise; an
unknown id, a length beyond a limit or a header that cannot be an acquisition is a :class:`WireError` that
names what arrived (junk on the socket ends the scan with that name instead of an allocation or a hang).
Errors go out as a TEXT line ``ERR ...`` followed by CLOSE (:class:`MrdSocket`).
"""
from __future__ import annotations

import ctypes
import logging
import socket
import struct
from typing import Any

import ismrmrd
import numpy as np

from ..gadgetron.external import ConnectionDropped, SafeSocket

log = logging.getLogger(__name__)

MSG_CONFIG_FILE = 1
MSG_CONFIG_TEXT = 2
MSG_HEADER = 3
MSG_CLOSE = 4
MSG_TEXT = 5
MSG_ACQUISITION = 1008
MSG_IMAGE = 1022
MSG_WAVEFORM = 1026
NAMES = {MSG_CONFIG_FILE: "CONFIG_FILE", MSG_CONFIG_TEXT: "CONFIG_TEXT", MSG_HEADER: "HEADER", MSG_CLOSE: "CLOSE",
         MSG_TEXT: "TEXT", MSG_ACQUISITION: "ACQUISITION", MSG_IMAGE: "IMAGE", MSG_WAVEFORM: "WAVEFORM"}

CONFIG_FILE_BYTES = 1024
MAX_TEXT_BYTES = 16 << 20  # config text, header, TEXT lines
MAX_ACQUISITION_BYTES = 256 << 20  # trajectory + data of one readout (1024 coils x 32 k samples fit)
MAX_WAVEFORM_BYTES = 64 << 20
MAX_CHANNELS = 1024
MAX_TRAJECTORY_DIMENSIONS = 8
ACQ_HEADER_BYTES = ctypes.sizeof(ismrmrd.AcquisitionHeader)  # 340
WAVEFORM_HEADER_BYTES = ctypes.sizeof(ismrmrd.WaveformHeader)  # 40
COMPRESSION_FLAGS = (ismrmrd.ACQ_COMPRESSION1, ismrmrd.ACQ_COMPRESSION2, ismrmrd.ACQ_COMPRESSION3,
                     ismrmrd.ACQ_COMPRESSION4)


class WireError(ValueError):
    """The client broke the protocol (an unknown id, a length beyond a limit, a malformed message); the message
    names what arrived."""


def message_name(mid: int) -> str:
    return f"{NAMES.get(mid, 'unknown')} ({mid})"


class MrdSocket(SafeSocket):
    """SafeSocket (whole messages under a lock, a dropped peer raises :class:`ConnectionDropped`, ``abort`` from
    another thread) speaking MRD: errors are TEXT ``ERR ...`` lines, texts are NUL-terminated as
    python-ismrmrd-server sends them."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock)
        self._pending: int | None = None  # a message id read ahead by peek_id

    # ----------------------------------------------------------------------------------------- sending
    @staticmethod
    def text_message(text: str) -> bytes:
        payload = text.encode("utf-8") + b"\x00"
        return struct.pack("<HI", MSG_TEXT, len(payload)) + payload

    def error_message(self, text: str) -> bytes:
        return self.text_message(text if text.startswith("ERR") else f"ERR {text}")

    def send_text(self, text: str) -> None:
        """One TEXT line (``INF``/``WRN``/``ERR`` prefix chosen by the caller); dropped after CLOSE."""
        with self.lock:
            if not self.close_sent:
                self.write(self.text_message(text))

    def send_image(self, image: ismrmrd.Image) -> None:
        with self.lock:
            if not self.close_sent:
                self.write(struct.pack("<H", MSG_IMAGE) + image.to_bytes())

    # ----------------------------------------------------------------------------------------- reading
    def read_id(self) -> int:
        if self._pending is not None:
            mid, self._pending = self._pending, None
            return mid
        (mid,) = struct.unpack("<H", self.read(2))
        return mid

    def peek_id(self) -> int:
        """The next message id without consuming it."""
        if self._pending is None:
            (self._pending,) = struct.unpack("<H", self.read(2))
        return self._pending

    def read_length(self, what: str, limit: int = MAX_TEXT_BYTES) -> int:
        (n,) = struct.unpack("<I", self.read(4))
        if n > limit:
            raise WireError(f"{what}: length field {n} bytes exceeds the limit of {limit} bytes "
                            "(a corrupt stream or not an MRD client)")
        return n

    def read_text(self, what: str) -> str:
        """uint32 length + text; trailing NULs stripped; undecodable bytes replaced."""
        n = self.read_length(what)
        raw = self.read(n) if n else b""
        return raw.split(b"\x00", 1)[0].decode("utf-8", errors="replace")

    def read_config_file(self) -> str:
        raw = self.read(CONFIG_FILE_BYTES)
        return raw.split(b"\x00", 1)[0].decode("utf-8", errors="replace")

    def read_acquisition(self, index: int) -> ismrmrd.Acquisition:
        """One ACQUISITION payload; its header is checked before the data are read (``index`` names it)."""
        head_bytes = self.read(ACQ_HEADER_BYTES)
        head = ismrmrd.AcquisitionHeader.from_buffer_copy(head_bytes)
        what = f"acquisition {index} (scan_counter {head.scan_counter})"
        ns, nc, nt = int(head.number_of_samples), int(head.active_channels), int(head.trajectory_dimensions)
        if head.version not in (0, 1):
            raise WireError(f"{what}: header version {head.version} is not an ISMRMRD acquisition header "
                            "(a corrupt stream?)")
        for bit in COMPRESSION_FLAGS:
            if int(head.flags) & (1 << (bit - 1)):
                raise WireError(f"{what}: compressed acquisition (ISMRMRD_ACQ_COMPRESSION flag {bit}): not "
                                "supported, send uncompressed data (no -P/-T on gadgetron_ismrmrd_client)")
        if nc > MAX_CHANNELS or nt > MAX_TRAJECTORY_DIMENSIONS or int(head.available_channels) > MAX_CHANNELS:
            raise WireError(f"{what}: {nc} active channels, {nt} trajectory dimensions: beyond the limits "
                            f"({MAX_CHANNELS} channels, {MAX_TRAJECTORY_DIMENSIONS} dimensions; a corrupt stream?)")
        nbytes = ns * nt * 4 + ns * nc * 8
        if nbytes > MAX_ACQUISITION_BYTES:
            raise WireError(f"{what}: {nbytes} bytes of data exceed the limit of {MAX_ACQUISITION_BYTES}")
        return _acquisition(head_bytes, self.read)

    def skip_waveform(self, index: int) -> None:
        head = ismrmrd.WaveformHeader.from_buffer_copy(self.read(WAVEFORM_HEADER_BYTES))
        nbytes = int(head.channels) * int(head.number_of_samples) * 4
        if nbytes > MAX_WAVEFORM_BYTES:
            raise WireError(f"waveform {index}: {nbytes} bytes exceed the limit of {MAX_WAVEFORM_BYTES}")
        if nbytes:
            self.read(nbytes)


def _acquisition(head_bytes: bytes, read: Any) -> ismrmrd.Acquisition:
    """ismrmrd.Acquisition.deserialize_from with the header already read."""
    acq = ismrmrd.Acquisition(head_bytes)
    ns, nc, nt = acq.number_of_samples, acq.active_channels, acq.trajectory_dimensions
    if nt:
        acq.traj[:] = np.frombuffer(read(ns * nt * 4), dtype=np.float32).reshape(ns, nt)
    if ns * nc:
        acq.data[:] = np.frombuffer(read(ns * nc * 8), dtype=np.complex64).reshape(nc, ns)
    return acq


__all__ = ["ConnectionDropped", "MrdSocket", "WireError", "message_name"]
