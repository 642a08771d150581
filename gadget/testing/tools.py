"""Where the real reference clients are, and how to run them (tests, benchmarks, by hand).

- python-ismrmrd-server's MRD client (``client.py``): ``$SCOREMRI_MRD_CLIENT`` (the file or its folder), else
  ``../shared/mrd-client/client.py`` beside the repository (the layout of this machine and of CI).
- Gadgetron's ``gadgetron_ismrmrd_client``: ``$SCOREMRI_GADGETRON`` (the Gadgetron folder, its ``bin/``, or a
  binary in it), else ``../shared/gadgetron/bin/``, else ``PATH``.

A relocatable Gadgetron folder whose library symlinks were flattened into small text files holding the link
target (what some copy tools and archive round trips do) cannot load its libraries ("file too short"):
:func:`gadgetron_env` then points ``LD_LIBRARY_PATH`` at a folder of real symlinks made once in the temp dir.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared"


def mrd_client() -> Path | None:
    """python-ismrmrd-server's ``client.py`` (None when absent)."""
    env = os.environ.get("SCOREMRI_MRD_CLIENT")
    cands = []
    if env:
        p = Path(env)
        cands.append(p / "client.py" if p.is_dir() else p)
    cands.append(SHARED / "mrd-client" / "client.py")
    return next((c for c in cands if c.is_file()), None)


def gadgetron_bin(name: str = "gadgetron_ismrmrd_client") -> Path | None:
    """A binary of the Gadgetron install (None when absent)."""
    env = os.environ.get("SCOREMRI_GADGETRON")
    dirs: list[Path] = []
    if env:
        p = Path(env)
        if p.is_file():
            dirs.append(p.parent)
        else:
            dirs += [p / "bin", p]
    dirs.append(SHARED / "gadgetron" / "bin")
    for d in dirs:
        if (d / name).is_file():
            return d / name
    found = shutil.which(name)
    return Path(found) if found else None


def _flattened_links(lib: Path) -> dict[str, str]:
    """{name: target} of files in ``lib`` that hold a sibling's name instead of being a symlink to it."""
    out = {}
    for f in lib.iterdir():
        if f.is_symlink() or not f.is_file() or f.stat().st_size > 255 or ".so" not in f.name:
            continue
        try:
            target = f.read_text().strip()
        except (OSError, UnicodeDecodeError):
            continue
        if target and "/" not in target and (lib / target).is_file() and target != f.name:
            out[f.name] = target
    for name in list(out):  # a chain (libX.so -> libX.so.4.7 -> libX.so.4.7.2) ends at the real file
        seen = {name}
        while out[name] in out and out[name] not in seen:
            seen.add(out[name])
            out[name] = out[out[name]]
    return out


def gadgetron_env(binary: Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment to run a Gadgetron binary with: ``base`` (default ``os.environ``), plus
    ``LD_LIBRARY_PATH`` to real symlinks when the install's ``lib/`` has flattened ones."""
    env = dict(os.environ if base is None else base)
    lib = binary.resolve().parent.parent / "lib"
    if not lib.is_dir():
        return env
    links = _flattened_links(lib)
    if not links:
        return env
    key = hashlib.sha256(str(lib).encode()).hexdigest()[:12]
    shadow = Path(tempfile.gettempdir()) / f"scoremri-gadgetron-libs-{key}"
    shadow.mkdir(exist_ok=True)
    for name, target in links.items():
        link = shadow / name
        want = lib / target
        if link.is_symlink() and os.readlink(link) == str(want):
            continue
        tmp = shadow / f".{name}.{os.getpid()}"
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        tmp.symlink_to(want)
        os.replace(tmp, link)  # atomic: parallel test processes never see a half-made link
    env["LD_LIBRARY_PATH"] = os.pathsep.join([str(shadow)] + [p for p in [env.get("LD_LIBRARY_PATH")] if p])
    return env


__all__ = ["gadgetron_bin", "gadgetron_env", "mrd_client"]
