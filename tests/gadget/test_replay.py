"""scoremri replay end to end: simulate -> replay == in-memory reconstruction; ismrmrd generator files; errors."""
from __future__ import annotations

import logging
import subprocess

import numpy as np
import pytest
import torch

from scoremri.gadget.cli import main
from scoremri.gadget.files.rawfile import read_images
from scoremri.gadget.files.replay import replay
from scoremri.gadget.files.simulate import read_ground_truth, simulate, write_raw
from scoremri.recon import noise as rnoise
from scoremri.recon.api import reconstruct
from scoremri.recon.config import load_config
from scoremri.recon.metrics import evaluate


def _t1(dipy_t1: np.ndarray, n: int) -> np.ndarray:
    img = torch.nn.functional.interpolate(torch.from_numpy(dipy_t1)[None, None], size=(n, n), mode="area")[0, 0]
    img = img.numpy()
    return img / img.max()


@pytest.fixture(scope="module")
def scan(tmp_path_factory, dipy_t1):
    sim = simulate(_t1(dipy_t1, 128), coils=8, accel=4, acs=16, sigma=0.005, seed=1, ro_oversampling=2)
    path = tmp_path_factory.mktemp("replay") / "t1.h5"
    write_raw(path, sim)
    return path, sim


def _in_memory(sim: dict) -> np.ndarray:
    """The same k-space reconstructed without files: whiten, remove RO oversampling, reconstruct."""
    W = rnoise.prewhitening_matrix(rnoise.noise_covariance(sim["acquisitions"][0].data), 5.0, 5.0, 0.5)
    k = rnoise.prewhiten(sim["kspace"][0], W)  # (C, ky, 2 nx)
    nx = k.shape[-1] // 2
    x = np.fft.fftshift(np.fft.ifft(np.fft.ifftshift(k, axes=-1), axis=-1, norm="ortho"), axes=-1)
    x = x[..., nx // 2 : nx // 2 + nx]
    k = np.fft.fftshift(np.fft.fft(np.fft.ifftshift(x, axes=-1), axis=-1, norm="ortho"), axes=-1)
    mask = np.repeat(sim["mask"][:, None], nx, axis=1)
    return reconstruct(k.astype(np.complex64), mask, load_config("sense")).image


def test_round_trip_matches_in_memory_reconstruction(scan, tmp_path):
    path, sim = scan
    out = replay(path, tmp_path / "out.h5", preset="sense", progress=False)
    assert out["images"] == {1: 1} and out["noise"]["noise_scans"] == 1
    (img,) = read_images(tmp_path / "out.h5")[1]
    x = img.data[0, 0]
    assert img.data.dtype == np.complex64 and x.shape == (128, 128)
    gt = read_ground_truth(path)[0][0]
    ours, ref = evaluate(x, gt), evaluate(_in_memory(sim), gt)
    assert abs(ours["psnr"] - ref["psnr"]) < 0.1
    assert abs(ours["psnr_fg"] - ref["psnr_fg"]) < 0.1
    assert ours["psnr"] > 27  # SENSE at x4 with 8 coils on a 128^2 brain slice (29.6 dB measured)
    assert ours["scale"] == pytest.approx(1.0, abs=0.05)  # the ground truth is in replay's (whitened) units
    zf = replay(path, tmp_path / "zf.h5", preset="zero_filled", progress=False)
    assert zf["images"] == {1: 1}
    assert evaluate(read_images(tmp_path / "zf.h5")[1][0].data[0, 0], gt)["psnr"] < ours["psnr"] - 1


def test_separate_noise_file_and_missing_noise(scan, tmp_path, caplog):
    path, sim = scan
    img_only = tmp_path / "img_only.h5"
    write_raw(img_only, {**sim, "acquisitions": sim["acquisitions"][1:]})
    noise = tmp_path / "noise.h5"
    write_raw(noise, {**sim, "acquisitions": sim["acquisitions"][:1]})
    a = replay(path, tmp_path / "a.h5", preset="zero_filled", progress=False)
    b = replay(img_only, tmp_path / "b.h5", preset="zero_filled", noise=noise, progress=False)
    xa = read_images(tmp_path / "a.h5")[1][0].data
    xb = read_images(tmp_path / "b.h5")[1][0].data
    np.testing.assert_allclose(xb, xa, rtol=1e-5, atol=1e-5 * np.abs(xa).max())
    assert b["noise"]["source"] == str(noise)
    with caplog.at_level(logging.WARNING):
        c = replay(img_only, tmp_path / "c.h5", preset="zero_filled", progress=False)
    assert "NOT prewhitened" in caplog.text and c["noise"]["noise_scans"] == 0
    xc = read_images(tmp_path / "c.h5")[1][0].data
    ratio = np.abs(xa).max() / np.abs(xc).max()
    assert ratio == pytest.approx(sim["scale"], rel=0.05)  # whitening = 1 / (sigma sqrt 2)


def test_shepp_logan_generator_file(shepp_logan_generator, tmp_path):
    raw = tmp_path / "sl.h5"
    subprocess.run([shepp_logan_generator, "-a", "4", "-w", "24", "-C", "-m", "64", "-o", str(raw)], check=True,
                   capture_output=True, cwd=tmp_path)
    out = replay(raw, tmp_path / "sl_out.h5", preset="sense", progress=False)
    images = read_images(tmp_path / "sl_out.h5")[1]
    assert len(images) == 4  # one image per repetition (the generator writes acceleration-many repetitions)
    assert [im.repetition for im in images] == [0, 1, 2, 3]
    assert [im.image_index for im in images] == [1, 2, 3, 4]
    for im in images:
        assert im.data.shape == (1, 1, 64, 64) and im.data.dtype == np.complex64
        assert np.isfinite(im.data).all() and np.abs(im.data).max() > 0
    assert out["report"]["slices"] == 4


def test_cli_png_and_clear_errors(scan, tmp_path, capsys):
    path, _ = scan
    rc = main(["replay", str(path), "-o", str(tmp_path / "o.h5"), "--preset", "zero_filled",
               "--png", str(tmp_path / "png"), "-G", "recon"])
    assert rc == 0
    assert sorted(p.name for p in (tmp_path / "png").iterdir()) == ["o_s1_001.png"]
    assert 1 in read_images(tmp_path / "o.h5", group="recon")
    blob = path.read_bytes()
    (tmp_path / "cut.h5").write_bytes(blob[: len(blob) // 3])
    capsys.readouterr()
    rc = main(["replay", str(tmp_path / "cut.h5"), "-o", str(tmp_path / "x.h5"), "--preset", "sense", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and err[0].startswith("scoremri replay: error: ") and "cut.h5" in err[0]
    rc = main(["replay", str(path), "-o", str(tmp_path / "x.h5"), "--set", "sampler.bogus=1", "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "sampler.bogus" in err[0]  # a bad --set is a command-line error


def test_shipped_sample(repo, tmp_path):
    """examples/t1_coronal_x4.h5: small, strict header, replays with SENSE close to its stored ground truth."""
    raw = repo / "examples" / "t1_coronal_x4.h5"
    assert raw.stat().st_size < 8e6
    out = replay(raw, tmp_path / "ex.h5", preset="sense", progress=False, png=tmp_path)
    assert out["noise"]["noise_scans"] == 1 and out["images"] == {1: 1}
    (img,) = read_images(tmp_path / "ex.h5")[1]
    assert img.data.shape == (1, 1, 256, 256)
    gt = read_ground_truth(raw)[0][0]
    e = evaluate(img.data[0, 0], gt)
    assert e["psnr"] > 32 and e["scale"] == pytest.approx(1.0, abs=0.03)  # measured 34.7 dB, scale 1.002
    assert [p.name for p in out["png"]] == ["ex_s1_001.png"]


def test_multislice_without_oversampling(dipy_t1, tmp_path):
    img = _t1(dipy_t1, 48)
    sim = simulate(np.stack([img, img[::-1]]), coils=4, accel=2, acs=8, sigma=0.005, seed=4, ro_oversampling=1)
    write_raw(tmp_path / "ms.h5", sim)
    out = replay(tmp_path / "ms.h5", tmp_path / "ms_out.h5", preset="sense", progress=False)
    images = read_images(tmp_path / "ms_out.h5")[1]
    assert out["images"] == {1: 2} and [im.slice for im in images] == [0, 1]
    assert images[0].position[2] != images[1].position[2]
    gts = read_ground_truth(tmp_path / "ms.h5")[0]
    for im, gt in zip(images, gts):
        e = evaluate(im.data[0, 0], gt)
        assert e["psnr"] > 28 and e["scale"] == pytest.approx(1.0, abs=0.05)  # measured 30.7 dB, 0.998


def _raw_bytes(path) -> tuple[bytes, bytes]:
    """The raw dataset's header and acquisition table, byte for byte."""
    import h5py

    with h5py.File(path, "r") as f:
        table = f["dataset/data"][()]
        acqs = table["head"].tobytes() + b"".join(np.asarray(r["data"]).tobytes() + np.asarray(r["traj"]).tobytes()
                                                  for r in table)
        return bytes(f["dataset/xml"][0]), acqs


def test_output_naming_the_input_is_refused_and_nothing_is_touched(scan, tmp_path, capsys):
    """-o (or --nifti) naming the raw input, by its path, a relative path, a symlink or a hard link, or -o
    naming another raw file: one-line error, exit 2, the raw file byte-identical (same mtime too)."""
    import os
    import shutil

    path, _ = scan
    raw = tmp_path / "raw.h5"
    shutil.copy(path, raw)
    before, stat = raw.read_bytes(), raw.stat()
    (tmp_path / "link.h5").symlink_to(raw)
    os.link(raw, tmp_path / "hard.h5")
    other = tmp_path / "other_raw.h5"
    shutil.copy(path, other)
    other_before = other.read_bytes()
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        for argv in (["-o", str(raw)], ["-o", "raw.h5"], ["-o", "./sub/../raw.h5"], ["-o", "link.h5"],
                     ["-o", "hard.h5"], ["-o", "raw.h5", "-G", "recon"], ["--nifti", "link.h5"],
                     ["-o", "x.h5", "--dicom", "raw.h5"]):
            (tmp_path / "sub").mkdir(exist_ok=True)
            capsys.readouterr()
            rc = main(["replay", "raw.h5", "--preset", "zero_filled", "--no-progress", *argv])
            err = capsys.readouterr().err.strip().splitlines()
            assert rc == 2 and len(err) == 1, (argv, err)
            assert "replay never writes into its input" in err[0] and "raw input" in err[0]
        capsys.readouterr()
        rc = main(["replay", "raw.h5", "-o", "other_raw.h5", "--preset", "zero_filled", "--no-progress"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and "holds raw data" in err[0]
        # another group of another raw file is fine (gadgetron_ismrmrd_client -G does the same)
        assert main(["replay", "raw.h5", "-o", "other_raw.h5", "-G", "recon", "--preset", "zero_filled",
                     "--no-progress"]) == 0
        assert 1 in read_images(other, group="recon")
        assert _raw_bytes(other) == _raw_bytes(path)
    finally:
        os.chdir(cwd)
    assert raw.read_bytes() == before and raw.stat().st_mtime_ns == stat.st_mtime_ns
    assert other.read_bytes() != other_before  # it got its new group, and nothing else (checked above)
    for argv, text in ((["--preset", "zero_filled"], "nothing to write"),
                       (["--dicom", str(other)], "needs a directory"),
                       (["--nifti", str(tmp_path / "x.img")], "must end in .nii"),
                       (["-o", str(tmp_path / "y.h5"), "--anonymise"], "--anonymise applies to --dicom")):
        capsys.readouterr()
        rc = main(["replay", str(raw), "--no-progress", *argv])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and text in err[0], (argv, err)
    assert not (tmp_path / "y.h5").exists()


def test_attribute_string_len_matches_the_stored_attributes(scan, tmp_path):
    """ismrmrd-python's append_image leaves attribute_string_len at 0; our writer stores the true byte length
    (non-ASCII text included), as the wire serializer and the C++ library do."""
    import h5py
    import ismrmrd

    from scoremri.gadget.files.rawfile import write_images

    path, _ = scan
    replay(path, tmp_path / "o.h5", preset="zero_filled", progress=False)
    with h5py.File(tmp_path / "o.h5", "r") as f:
        heads = f["dataset/image_1/header"][()]
        attrs = f["dataset/image_1/attributes"][()]
    for h, a in zip(heads, attrs):
        a = a if isinstance(a, bytes) else a.encode("utf-8")
        assert int(h["attribute_string_len"]) == len(a) > 100
    img = read_images(tmp_path / "o.h5")[1][0]
    img.meta["GADGETRON_ImageComment"] = "µ-scaled, Ångström — non-ASCII"
    write_images(tmp_path / "u.h5", [img])
    with h5py.File(tmp_path / "u.h5", "r") as f:
        h, a = f["dataset/image_1/header"][0], f["dataset/image_1/attributes"][0]
    a = a if isinstance(a, bytes) else a.encode("utf-8")
    assert int(h["attribute_string_len"]) == len(a) == len(img.attribute_string.encode("utf-8"))
    assert len(a) > len(img.attribute_string)  # bytes, not characters
    back = read_images(tmp_path / "u.h5")[1][0]
    assert back.meta["GADGETRON_ImageComment"] == "µ-scaled, Ångström — non-ASCII"
    # the wire (serialize_into) agrees with the file
    wire = ismrmrd.Image.from_bytes(back.to_bytes())
    assert wire.getHead().attribute_string_len == int(h["attribute_string_len"])
