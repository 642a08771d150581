"""A start-up patch of gadgetron-python's socket reads, installed with scoremri as ``scoremri-gadgetron.pth``.

Why it exists. Gadgetron's execute mode always starts ``python -m gadgetron PORT MODULE TARGET``;
gadgetron-python's ``__main__`` then builds its ``Connection`` (which reads CONFIG and HEADER) *before* it
imports MODULE. gadgetron 1.4.1's ``Connection.SocketWrapper.read`` loops forever when ``recv`` returns
``b''`` (the peer closed). So when Gadgetron closes the socket early -- e.g. it cannot re-serialise a header
whose ``<version>`` differs from its ISMRMRD schema version, and logs "XML header version does not match
library schema version" -- the child spins at 100 % CPU, Gadgetron waits for the child to exit, and the
client waits forever. Nothing the stream XML names can help: it is imported after the spin.
Only code that runs when the interpreter starts can, hence a ``.pth`` file in site-packages (the mechanism
setuptools' ``distutils-precedence.pth`` and coverage's start-up hook use).

What it does. ``scoremri-gadgetron.pth`` calls :func:`install`, which puts a meta-path finder in front of
the import system; it does nothing until ``gadgetron.external.connection`` is imported (so every other
Python program in the environment pays one small import), then replaces ``Connection.SocketWrapper.read``
with a loop that raises :class:`GadgetronPeerClosed` on end of file, and makes a HEADER that never arrives
name the likely reason. ``python -m gadgetron`` then exits (code 1) within milliseconds, Gadgetron ends the
chain and the client gets Gadgetron's error. The semantics of a successful read are unchanged.

Second repair, for ``<distributed>`` chains: Gadgetron 4.7 drops the ``target`` attribute of ``<execute>``
when it serialises the inner stream for its workers, so a worker starts ``python -m gadgetron PORT
scoremri.gadget.gadget`` without a target and gadgetron-python fails on ``getattr(module, None)``. When the
module is one of ours (:data:`DEFAULT_TARGETS`) and no target was given, :func:`install` appends ours to
``sys.argv`` (at ``.pth`` time ``sys.argv`` is ``['-m', PORT, MODULE]``; runpy replaces only ``argv[0]``).

``SCOREMRI_NO_GADGETRON_PATCH=1`` in the environment turns both off.
"""
from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
from typing import Any

TARGET = "gadgetron.external.connection"
DEFAULT_TARGETS = {  # our execute-mode modules -> their gadget, for a worker started without a target
    "scoremri.gadget.gadget": "score_recon",
    "scoremri.gadget.gadgetron.external": "score_recon",
}
ENV_OFF = "SCOREMRI_NO_GADGETRON_PATCH"
HEADER_HINT = (
    "Gadgetron closed the connection before sending the ISMRMRD header. Its log says why; "
    "'XML header version does not match library schema version' means the raw file's header carries a "
    "<version> its ISMRMRD library refuses (e.g. 8 from ISMRMRD 1.8 tools): "
    "run 'scoremri fix-header RAW.h5' and send the file again"
)


class GadgetronPeerClosed(EOFError):
    """Gadgetron closed the socket in the middle of a read (gadgetron-python would spin forever)."""


def _read(self: Any, nbytes: int) -> bytes:
    """``SocketWrapper.read`` that fails on end of file instead of looping on ``recv() == b''``."""
    chunks = []
    left = nbytes
    while left > 0:
        chunk = self.socket.recv(left)
        if not chunk:
            raise GadgetronPeerClosed(f"connection closed by Gadgetron ({nbytes - left} of {nbytes} bytes read)")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def patch(module: Any) -> None:
    """Patch a loaded ``gadgetron.external.connection`` module in place (idempotent)."""
    connection = getattr(module, "Connection", None)
    wrapper = getattr(connection, "SocketWrapper", None)
    if wrapper is None or getattr(wrapper, "_scoremri_patched", False):
        return
    wrapper.read = _read
    wrapper._scoremri_patched = True
    read_header = connection._read_header

    def _read_header(self: Any) -> Any:
        try:
            return read_header(self)
        except GadgetronPeerClosed as e:  # gadgetron's __main__ logs it (CRITICAL) and exits with code 1
            raise GadgetronPeerClosed(f"{HEADER_HINT} ({e})") from None

    connection._read_header = _read_header


class _Finder(importlib.abc.MetaPathFinder):
    """Finds nothing itself; wraps the loader of ``gadgetron.external.connection`` to patch it once loaded."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != TARGET:
            return None
        sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _Finder)]
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_patch(module: Any) -> None:
            exec_module(module)
            patch(module)

        spec.loader.exec_module = exec_and_patch  # type: ignore[method-assign]
        return spec


def _is_gadgetron_main() -> bool:
    """This interpreter was started as ``python [options] -m gadgetron ...``."""
    a = getattr(sys, "orig_argv", [])
    return any(x == "-m" and y == "gadgetron" for x, y in zip(a, a[1:]))


def add_missing_target(argv: list[str]) -> bool:
    """``['-m', PORT, MODULE]`` with MODULE ours -> append its target in place; True when it did."""
    if len(argv) == 3 and argv[0] == "-m" and argv[2] in DEFAULT_TARGETS:
        argv.append(DEFAULT_TARGETS[argv[2]])
        return True
    return False


def install() -> None:
    """Register the patch (from the ``.pth`` file at interpreter start; safe to call more than once)."""
    if os.environ.get(ENV_OFF, "") not in ("", "0"):
        return
    if _is_gadgetron_main():
        add_missing_target(sys.argv)
    loaded = sys.modules.get(TARGET)
    if loaded is not None:
        patch(loaded)
        return
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.insert(0, _Finder())
