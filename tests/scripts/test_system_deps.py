"""scripts/system-deps.sh: which Debian packages each option asks apt for, run against stub dpkg-query / apt-get /
sudo on PATH (nothing is installed)."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "system-deps.sh"
BASE = ["bart", "ismrmrd-tools", "dicom3tools", "dcm2niix"]


def _run(tmp_path: Path, *args: str, installed: bool = False) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Runs the script with stubs; returns the process and the apt-get calls (one string each)."""
    stubs = tmp_path / "bin"
    stubs.mkdir(exist_ok=True)
    log = tmp_path / "apt.log"
    status = "install ok installed" if installed else ""
    (stubs / "dpkg-query").write_text(f"#!/bin/sh\nprintf '%s' '{status}'\n")
    (stubs / "apt-get").write_text(f'#!/bin/sh\necho "$*" >> {log}\n')
    (stubs / "sudo").write_text('#!/bin/sh\nexec "$@"\n')
    for f in stubs.iterdir():
        f.chmod(0o755)
    env = {**os.environ, "PATH": f"{stubs}:/usr/bin:/bin"}
    proc = subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=30)
    calls = log.read_text().splitlines() if log.exists() else []
    return proc, calls


def _installed_packages(calls: list[str]) -> list[str]:
    install = [c for c in calls if c.split()[:1] == ["install"]]
    assert len(install) == 1, calls
    return [w for w in install[0].split() if not w.startswith("-") and w != "install"]


@pytest.mark.parametrize("args, extra", [
    ((), []),
    (("--train",), ["mricron-data"]),
    (("--bench",), ["insighttoolkit5-examples"]),
    (("--train", "--bench"), ["mricron-data", "insighttoolkit5-examples"]),
    (("--bench", "--train"), ["insighttoolkit5-examples", "mricron-data"]),
])
def test_options_choose_the_packages(tmp_path: Path, args: tuple[str, ...], extra: list[str]) -> None:
    proc, calls = _run(tmp_path, *args)
    assert proc.returncode == 0, proc.stderr
    assert calls[0].split()[:1] == ["update"]
    assert _installed_packages(calls) == BASE + extra


def test_nothing_to_do_when_everything_is_installed(tmp_path: Path) -> None:
    proc, calls = _run(tmp_path, "--train", "--bench", installed=True)
    assert proc.returncode == 0, proc.stderr
    assert calls == []


def test_unknown_option_is_named_and_installs_nothing(tmp_path: Path) -> None:
    proc, calls = _run(tmp_path, "--benchmark")
    assert proc.returncode == 2
    assert "--benchmark" in proc.stderr and "--bench" in proc.stderr
    assert calls == []
