"""``scoremri fix-header``: drop the ISMRMRD header ``<version>`` that Gadgetron 4.7 refuses.

Gadgetron 4.7 (ISMRMRD C++ 1.14) refuses a header whose ``<version>`` differs from its schema version (14)
wherever a chain re-serialises the header -- every external Python gadget, the generic recon chains -- with
"XML header version does not match library schema version". Files written by ISMRMRD 1.8 tools (Debian's
``ismrmrd_generate_cartesian_shepp_logan``, older converters) say ``<version>8</version>``. A header without
``<version>`` passes every ISMRMRD version, and nothing else in the file needs to change: this command
removes the element (in place, or into a copy with ``-o``) and checks that the result is a valid header.
scoremri itself writes no ``<version>`` (``simulate``), and ``replay`` reads such files as they are.

    scoremri fix-header raw.h5                 # in place
    scoremri fix-header raw.h5 -o fixed.h5     # a copy
"""
from __future__ import annotations

import argparse
import logging
import re
import shutil
from pathlib import Path

import h5py

from .rawfile import RawFileError, parse_header

log = logging.getLogger(__name__)

VERSION_RE = re.compile(r"\s*<version>\s*([^<]*?)\s*</version>", re.S)


def header_version(xml: str) -> str | None:
    """The ``<version>`` text of an ISMRMRD XML header (the top-level element only), or None."""
    m = VERSION_RE.search(_top_level(xml))
    return m.group(1) if m else None


def _top_level(xml: str) -> str:
    """The header text before its first <encoding> (``<version>`` is the first child of ismrmrdHeader)."""
    i = xml.find("<encoding")
    return xml if i < 0 else xml[:i]


def strip_version(xml: str) -> tuple[str, str | None]:
    """(header without its ``<version>`` element, the removed version or None)."""
    head = _top_level(xml)
    m = VERSION_RE.search(head)
    if m is None:
        return xml, None
    return xml[: m.start()] + xml[m.end():], m.group(1)


def fix_header(path: str | Path, output: str | Path | None = None, group: str = "dataset") -> str | None:
    """Remove ``<version>`` from ``<group>/xml`` of ``path`` (or of a copy at ``output``). Returns the removed
    version (None: nothing to do; a copy is still written when ``output`` is given)."""
    path = Path(path)
    if not path.exists():
        raise RawFileError(f"{path}: no such file")
    try:
        with h5py.File(str(path), "r") as f:
            if group not in f or "xml" not in f[group]:
                raise RawFileError(f"{path}: no '{group}/xml' (the ISMRMRD header)")
            raw = f[group]["xml"][0]
    except RawFileError:
        raise
    except Exception as e:
        raise RawFileError(f"{path}: cannot read ISMRMRD raw data (truncated or corrupt?): {e}") from e
    xml = (raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else str(raw)).rstrip("\x00")
    fixed, version = strip_version(xml)
    parse_header(fixed, str(path))  # the result must be a valid header (RawFileError otherwise)
    target = Path(output) if output is not None else path
    if output is not None and target.resolve() != path.resolve():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    if version is None:
        log.info("%s: the header has no <version>: nothing to fix", path)
        return None
    with h5py.File(str(target), "r+") as f:
        ds = f[group]["xml"]
        info = h5py.check_string_dtype(ds.dtype)
        ds[0] = fixed if info is not None and info.encoding == "utf-8" else fixed.encode("utf-8")
    log.info("%s: removed <version>%s</version> from the ISMRMRD header (%s)", path, version, target)
    return version


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("raw", help="ISMRMRD raw .h5 whose header <version> Gadgetron refuses")
    parser.add_argument("-o", "--output", default=None, help="write a fixed copy here (default: fix in place)")
    parser.add_argument("-d", "--in-group", default="dataset", help="HDF5 group of the raw data (default dataset)")


DATA_ERRORS = (RawFileError,)


def run(args: argparse.Namespace) -> int:
    fix_header(args.raw, args.output, args.in_group)
    return 0
