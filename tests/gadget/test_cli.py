"""The command line as a new user meets it: one-line errors that name the value, exit 2 for the command line and 1
for the data, --version, help for every option, Ctrl-C and SIGTERM that keep the finished images."""
from __future__ import annotations

import argparse
import importlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from scoremri.gadget import cli
from scoremri.gadget.cli import main
from scoremri.gadget.files.rawfile import read_images
from scoremri.gadget.files.simulate import simulate, write_raw
from scoremri.recon.config import preset_names


def _run(capsys, *argv: str) -> tuple[int, list[str]]:
    capsys.readouterr()
    try:
        rc = main(list(argv))
    except SystemExit as e:  # argparse's own exits (help, version, option errors)
        rc = int(e.code or 0)
    return rc, capsys.readouterr().err.strip().splitlines()


def _one_line(err: list[str], prog: str, *words: str) -> None:
    """Exactly one line on stderr (progress bars aside), starting with the command, naming every word."""
    lines = [line for line in err if "it/s]" not in line and "buffer" not in line]
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"scoremri {prog}: error: ") or lines[0].startswith("scoremri: error: "), lines
    for w in words:
        assert w in lines[0], (w, lines[0])


@pytest.fixture(scope="module")
def raw3(tmp_path_factory) -> Path:
    """A 3-slice 48x48 simulated scan."""
    rng = np.random.default_rng(1)
    mag = np.abs(rng.normal(size=(3, 48, 48))).astype(np.float32)
    mag[:, :8] = 0
    path = tmp_path_factory.mktemp("cli") / "raw3.h5"
    write_raw(path, simulate(mag / mag.max(), coils=4, accel=2, acs=16, sigma=0.01, ro_oversampling=1))
    return path


def test_version_and_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("scoremri ")
    with pytest.raises(SystemExit) as e:
        main(["replay", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    for name in preset_names():  # the presets are listed where they are chosen
        assert name in out


@pytest.mark.parametrize("command", list(cli.SUBCOMMANDS))
def test_every_option_has_help_text(command):
    parser = argparse.ArgumentParser()
    importlib.import_module(cli.SUBCOMMANDS[command][0]).add_arguments(parser)
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help and action.help != argparse.SUPPRESS, f"{command} {action.option_strings or action.dest}"


def test_unknown_command_and_bad_option(capsys):
    rc, err = _run(capsys, "reconstruct")
    assert rc == 2
    _one_line(err, "", "reconstruct")
    rc, err = _run(capsys, "simulate", "x.npy", "-o", "y.h5", "--coils", "many")
    assert rc == 2
    _one_line(err, "simulate", "--coils", "many")


def test_simulate_user_errors(capsys, tmp_path, dipy_t1):
    img = tmp_path / "t1.npy"
    np.save(img, dipy_t1)
    out = str(tmp_path / "o.h5")
    rc, err = _run(capsys, "simulate", str(tmp_path / "missing.npy"), "-o", out)
    assert rc == 1
    _one_line(err, "simulate", "missing.npy")
    np.save(tmp_path / "zero.npy", np.zeros((32, 32)))
    rc, err = _run(capsys, "simulate", str(tmp_path / "zero.npy"), "-o", out)
    assert rc == 1
    _one_line(err, "simulate", "all zero")
    rc, err = _run(capsys, "simulate", str(img), "-o", out, "--accel", "0")
    assert rc == 2
    _one_line(err, "simulate", "--accel", "0")
    rc, err = _run(capsys, "simulate", str(img), "-o", out, "--acs", "300")
    assert rc == 2
    _one_line(err, "simulate", "--acs", "300")
    import nibabel

    four_d = Path(nibabel.__file__).parent / "tests" / "data" / "example4d.nii.gz"
    rc, err = _run(capsys, "simulate", str(four_d), "-o", out)
    assert rc == 2
    _one_line(err, "simulate", "--volume", "2 volumes")
    rc, err = _run(capsys, "simulate", str(four_d), "-o", out, "--volume", "1")
    assert rc == 0 and Path(out).exists()


def test_replay_user_errors(capsys, tmp_path, raw3):
    out = str(tmp_path / "o.h5")
    rc, err = _run(capsys, "replay", str(tmp_path / "nope.h5"), "-o", out, "--no-progress")
    assert rc == 1
    _one_line(err, "replay", "nope.h5", "no such file")
    rc, err = _run(capsys, "replay", str(raw3), "-o", out, "--preset", "fastest", "--no-progress")
    assert rc == 2
    _one_line(err, "replay", "fastest", "available")
    rc, err = _run(capsys, "replay", str(raw3), "-o", out, "--set", "sampler.steps=-1", "--no-progress")
    assert rc == 2
    _one_line(err, "replay", "sampler.steps")
    rc, err = _run(capsys, "replay", str(raw3), "-o", out, "--pipeline", str(tmp_path / "chain.xml"), "--no-progress")
    assert rc == 1
    _one_line(err, "replay", "chain.xml")


def test_serve_user_errors(capsys):
    rc, err = _run(capsys, "serve", "--preset", "fastest", "--no-warmup", "--port", "0")
    assert rc == 2
    _one_line(err, "serve", "fastest")
    rc, err = _run(capsys, "serve", "--port", "70000", "--no-warmup")
    assert rc == 2
    _one_line(err, "serve", "70000")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        rc, err = _run(capsys, "serve", "--port", str(port), "--preset", "sense", "--no-warmup")
    assert rc == 1
    _one_line(err, "serve", f"127.0.0.1:{port}")


def test_train_and_export_user_errors(capsys, tmp_path):
    rc, err = _run(capsys, "train", "-o", str(tmp_path / "run"))
    assert rc == 2
    _one_line(err, "train", "no training data")
    rc, err = _run(capsys, "train", str(tmp_path / "gone.nii.gz"), "-o", str(tmp_path / "run"))
    assert rc == 1
    _one_line(err, "train", "gone.nii.gz")
    rc, err = _run(capsys, "export", str(tmp_path / "gone.safetensors"), "-o", str(tmp_path / "m.onnx"))
    assert rc == 1
    _one_line(err, "export", "gone.safetensors")


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signals_keep_finished_images(tmp_path, raw3, sig, code):
    """Interrupted after the first of three slices: one line saying what was kept, and that image readable."""
    png = tmp_path / "png"
    out = tmp_path / "o.h5"
    cmd = [sys.executable, "-m", "scoremri.gadget.cli", "replay", str(raw3), "-o", str(out), "--png", str(png),
           "--preset", "paper", "--set", "sampler.steps=60", "--device", "cpu", "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 240
        while not (png.exists() and any(png.iterdir())):
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "no image within the deadline"
            time.sleep(0.2)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, err
    last = [line for line in err.strip().splitlines() if line.startswith("scoremri replay:")]
    assert len(last) == 1 and "kept" in last[0] and str(out) in last[0], err
    images = read_images(out)[1]
    assert 1 <= len(images) < 3 and np.isfinite(images[0].data).all()
