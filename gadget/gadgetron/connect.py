"""Gadgetron's connect mode (``<connect port=.../>``, ``pipelines/scoremri_connect.xml``) as a protocol of
``scoremri serve`` (:mod:`scoremri.gadget.server`): the same CONFIG / HEADER / ReconData wire as execute mode,
served by a long-lived process that keeps the model warm."""
from __future__ import annotations

import logging
import socket
import time
from typing import Any

from .external import MSG_CONFIG, SafeSocket, handle_connection, open_connection

log = logging.getLogger(__name__)


class GadgetronProtocol:
    """One Gadgetron connection per scan: CONFIG (2) first, then HEADER, ReconData, CLOSE."""

    name = "gadgetron"
    default_port = 9003
    first_ids = frozenset({MSG_CONFIG})

    def run_scan(self, conn: socket.socket, addr: Any, server: Any) -> dict[str, Any]:
        t0 = time.monotonic()
        try:
            connection = open_connection(conn)  # reads CONFIG and HEADER; a dropped peer raises, never spins
        except Exception as e:
            text = f"scoremri serve: cannot read CONFIG/HEADER: {type(e).__name__}: {e}"
            log.error("scan from %s: %s", addr, text)
            report = {"status": "error", "error": text}
            server.scan_finished(report, t0)
            self.refuse(conn, text)
            return report
        sock = connection.socket
        server.abort_current = sock.abort
        try:
            report = handle_connection(
                connection,
                prior_provider=server.prior_for,
                default_preset=server.preset,
                default_device=server.device_arg,
                should_stop=lambda: server.stop_reason,
                default_overrides=server.overrides,
                image_sink=server.image_sink,
                threads_configured=True,
                default_slice_batch=server.slice_batch,
            )
            server.scan_finished(report, t0)  # before CLOSE goes out: a health query after CLOSE sees the scan
        finally:
            sock.close()
        return report

    def refuse(self, conn: socket.socket, reason: str) -> None:
        s = SafeSocket(conn)
        try:
            s.send_error(reason)
            s.send_close()
            s.drain(2.0)
        except OSError:
            pass
        s.close()


PROTOCOL = GadgetronProtocol()
