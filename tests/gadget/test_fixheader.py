"""``scoremri fix-header``: removes the header <version> Gadgetron 4.7 refuses, nothing else; replay warns
about such files and reads them; simulate writes no <version>."""
from __future__ import annotations

import logging
import subprocess

import h5py
import pytest

from scoremri.gadget.cli import main
from scoremri.gadget.files.fixheader import fix_header, header_version, strip_version
from scoremri.gadget.files.rawfile import RawFileError, read_raw


def _xml(path):
    with h5py.File(path, "r") as f:
        x = f["dataset/xml"][0]
    return x.decode() if isinstance(x, bytes) else x


def test_fix_header_on_a_version8_file(shepp_logan_generator, tmp_path, caplog):
    raw = tmp_path / "v8.h5"
    subprocess.run([shepp_logan_generator, "-m", "32", "-c", "2", "-o", str(raw)], check=True, capture_output=True)
    before = _xml(raw)
    assert header_version(before) == "8"
    with caplog.at_level(logging.WARNING):
        _, header, acqs = read_raw(raw)
    assert "fix-header" in caplog.text and int(header.version) == 8
    copy = tmp_path / "copy.h5"
    assert main(["fix-header", str(raw), "-o", str(copy)]) == 0
    assert _xml(raw) == before  # -o leaves the original alone
    after = _xml(copy)
    assert header_version(after) is None and "<version>" not in after.split("<encoding")[0]
    assert after == strip_version(before)[0] and len(after) < len(before)
    _, header2, acqs2 = read_raw(copy)
    assert header2.version is None and len(acqs2) == len(acqs)
    assert header2.encoding[0].encodedSpace.matrixSize.x == header.encoding[0].encodedSpace.matrixSize.x
    assert fix_header(copy) is None  # nothing left to fix
    assert fix_header(raw) == "8" and header_version(_xml(raw)) is None  # in place


def test_fix_header_errors(tmp_path, capsys):
    assert main(["fix-header", str(tmp_path / "missing.h5")]) == 1
    assert "no such file" in capsys.readouterr().err
    bad = tmp_path / "not_raw.h5"
    with h5py.File(bad, "w") as f:
        f.create_group("dataset")
    with pytest.raises(RawFileError, match="ISMRMRD header"):
        fix_header(bad)


def test_strip_version_only_touches_the_header_element():
    xml = "<ismrmrdHeader><version>8</version><encoding><x>1</x></encoding></ismrmrdHeader>"
    assert strip_version(xml) == ("<ismrmrdHeader><encoding><x>1</x></encoding></ismrmrdHeader>", "8")
    assert strip_version("<ismrmrdHeader><encoding/></ismrmrdHeader>")[1] is None
