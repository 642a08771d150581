"""ISMRMRD raw files in, ISMRMRD image files out.

- :func:`read_raw`: header (strict ismrmrd 1.15 xsd classes) and all acquisitions of ``<group>``; a missing,
  truncated or malformed file raises :class:`RawFileError` naming the problem.
- :func:`read_noise`: the noise scans of a separate noise measurement (``replay --noise``).
- :func:`write_images` / :func:`read_images`: ``<group>/image_<series>`` exactly as ``gadgetron_ismrmrd_client``
  stores images (with ``attribute_string_len`` set, which ismrmrd-python's writer leaves at 0).
- :func:`same_file` / :func:`holds_raw_data`: the checks that keep an output from replacing raw data.

What Gadgetron does to the acquisitions before our gadget (NoiseAdjust, RemoveROOversampling, buffering) lives
in the Gadgetron wing (:mod:`scoremri.gadget.gadgetron.preprocess`, :mod:`scoremri.gadget.gadgetron.buffers`).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterable

import h5py
import ismrmrd
import ismrmrd.xsd
import numpy as np

log = logging.getLogger(__name__)

FLAG_NOISE = 19  # ACQ_IS_NOISE_MEASUREMENT
GADGETRON_SCHEMA_VERSION = 14  # ISMRMRD C++ 1.14, Gadgetron 4.7: refuses any other header <version>


class RawFileError(ValueError):
    """A raw/image file is missing, truncated or malformed; the message names the file and the problem."""


# ------------------------------------------------------------------------------------------------ reading


def parse_header(xml: str | bytes, source: str = "header") -> Any:
    """ISMRMRD XML -> ``ismrmrd.xsd.ismrmrdHeader`` with the strict 1.15 classes (RawFileError if invalid)."""
    if isinstance(xml, bytes):
        xml = xml.decode("utf-8", errors="replace")
    xml = xml.rstrip("\x00").strip()
    if not xml:
        raise RawFileError(f"{source}: the ISMRMRD XML header is empty")
    try:
        return ismrmrd.xsd.CreateFromDocument(xml)
    except Exception as e:  # pyxb raises many types
        raise RawFileError(f"{source}: invalid ISMRMRD XML header: {type(e).__name__}: {e}") from e


def read_raw(path: str | Path, group: str = "dataset") -> tuple[str, Any, list[ismrmrd.Acquisition]]:
    """Read an ISMRMRD raw ``.h5``: ``(header_xml, header, acquisitions)`` in file order.

    Raises RawFileError for a missing/unreadable/truncated file, a missing group, header or acquisition table,
    an invalid header, or acquisitions whose data size disagrees with their header.
    """
    path = Path(path)
    if not path.exists():
        raise RawFileError(f"{path}: no such file")
    try:
        if not h5py.is_hdf5(str(path)):
            raise RawFileError(f"{path}: not an HDF5 file (ISMRMRD raw data is HDF5)")
        with h5py.File(str(path), "r") as f:
            if group not in f:
                raise RawFileError(f"{path}: no group '{group}' (groups: {', '.join(f.keys()) or 'none'})")
            g = f[group]
            if "xml" not in g:
                raise RawFileError(f"{path}: '{group}/xml' (the ISMRMRD header) is missing")
            xml_raw = g["xml"][0]
            if "data" not in g:
                raise RawFileError(f"{path}: '{group}/data' (the acquisitions) is missing")
            table = g["data"][()]
    except RawFileError:
        raise
    except Exception as e:  # h5py: OSError/KeyError for truncated or corrupt files
        raise RawFileError(f"{path}: cannot read ISMRMRD raw data (truncated or corrupt?): {e}") from e
    xml = xml_raw.decode("utf-8", errors="replace") if isinstance(xml_raw, bytes) else str(xml_raw)
    xml = xml.rstrip("\x00")
    header = parse_header(xml, str(path))
    version = getattr(header, "version", None)
    if version is not None and int(version) != GADGETRON_SCHEMA_VERSION:
        log.warning("%s: the ISMRMRD header says <version>%s</version>: replay reads it, but Gadgetron 4.7 "
                    "(ISMRMRD schema %d) refuses it wherever a chain re-serialises the header; "
                    "'scoremri fix-header %s' removes it", path, version, GADGETRON_SCHEMA_VERSION, path)
    names = table.dtype.names or ()
    if not {"head", "data"} <= set(names):
        raise RawFileError(f"{path}: '{group}/data' is not an ISMRMRD acquisition table (fields {names})")
    acqs: list[ismrmrd.Acquisition] = []
    for i, rec in enumerate(table):
        try:
            acq = ismrmrd.Acquisition(rec["head"].tobytes())
        except Exception as e:
            raise RawFileError(f"{path}: acquisition {i}: unreadable header: {e}") from e
        nc, ns, nt = acq.active_channels, acq.number_of_samples, acq.trajectory_dimensions
        d = np.asarray(rec["data"], dtype=np.float32)
        if d.size != 2 * nc * ns:
            raise RawFileError(
                f"{path}: acquisition {i}: {d.size} data values but the header says {nc} channels x {ns} "
                f"samples x 2 = {2 * nc * ns} (truncated or malformed)"
            )
        acq.data[:] = d.view(np.complex64).reshape(nc, ns)
        if nt > 0:
            t = np.asarray(rec["traj"], dtype=np.float32)
            if t.size != ns * nt:
                raise RawFileError(f"{path}: acquisition {i}: trajectory has {t.size} values, expected {ns * nt}")
            acq.traj[:] = t.reshape(ns, nt)
        acqs.append(acq)
    if not acqs:
        raise RawFileError(f"{path}: '{group}/data' holds no acquisitions")
    log.info("read %s: %d acquisitions (%d noise scans)", path, len(acqs), sum(bool(a.is_flag_set(FLAG_NOISE)) for a in acqs))
    return xml, header, acqs


def read_noise(path: str | Path, group: str = "dataset") -> list[ismrmrd.Acquisition]:
    """The noise scans of a separate noise measurement (e.g. a Siemens noise prescan); RawFileError when the
    file holds none."""
    _, _, acqs = read_raw(path, group)
    noise = [a for a in acqs if a.is_flag_set(FLAG_NOISE)]
    if not noise:
        raise RawFileError(f"{path}: no noise scans (flag ACQ_IS_NOISE_MEASUREMENT) in the noise file")
    return noise


# ---------------------------------------------------------------------------------------------- writing


def with_attribute_length(img: ismrmrd.Image) -> ismrmrd.Image:
    """``img`` with ``attribute_string_len`` = the UTF-8 byte length of its attribute string (the meta XML).

    ismrmrd-python's ``Dataset.append_image`` stores the header as it is (``attribute_string_len`` 0 for a
    new image; only the wire serializer sets it), so a reader that trusts the header (the C++ library, MATLAB)
    sees no attributes. Set here, at the one place we write image files."""
    n = len(img.attribute_string.encode("utf-8"))
    head = img.getHead()
    if int(head.attribute_string_len) != n:
        data = img.data.copy()
        head.attribute_string_len = n
        img.setHead(head)
        img.data[:] = data
    return img


def write_images(path: str | Path, images: Iterable[ismrmrd.Image], group: str = "dataset") -> dict[int, int]:
    """Append images to ``path`` as ``<group>/image_<series>/{header,attributes,data}`` (the layout
    gadgetron_ismrmrd_client writes). Returns {series: count}."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    counts: dict[int, int] = {}
    with ismrmrd.Dataset(str(path), group, create_if_needed=True) as ds:
        for img in images:
            series = int(img.image_series_index)
            ds.append_image(f"image_{series}", with_attribute_length(img))
            counts[series] = counts.get(series, 0) + 1
    return counts


def same_file(a: str | Path, b: str | Path) -> bool:
    """True when the two paths name one file (symlinks, relative paths and hard links resolved)."""
    try:
        return Path(a).exists() and Path(b).exists() and Path(a).samefile(b)
    except OSError:
        return False


def holds_raw_data(path: str | Path, group: str) -> bool:
    """True when ``path`` is an HDF5 file whose ``group`` holds ISMRMRD raw data (``data`` or ``xml``)."""
    p = Path(path)
    if not p.is_file():
        return False
    try:
        if not h5py.is_hdf5(str(p)):
            return False
        with h5py.File(str(p), "r") as f:
            return group in f and isinstance(f[group], h5py.Group) and bool({"data", "xml"} & set(f[group].keys()))
    except OSError:
        return False


def read_images(path: str | Path, group: str = "dataset") -> dict[int, list[ismrmrd.Image]]:
    """All images of ``<group>/image_<series>`` -> {series: [Image, ...]} (RawFileError if absent)."""
    path = Path(path)
    if not path.exists():
        raise RawFileError(f"{path}: no such file")
    out: dict[int, list[ismrmrd.Image]] = {}
    with ismrmrd.Dataset(str(path), group, create_if_needed=False, mode="r") as ds:
        try:
            names = list(ds.list())
        except LookupError as e:
            raise RawFileError(f"{path}: no group '{group}'") from e
        for name in names:
            if not name.startswith("image_"):
                continue
            series = int(name.split("_", 1)[1])
            out[series] = [ds.read_image(name, i) for i in range(ds.number_of_images(name))]
    return out
