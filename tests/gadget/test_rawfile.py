"""Raw file reading (clear errors for bad files), NoiseAdjust/RemoveROOversampling steps, image writing."""
from __future__ import annotations

import logging

import h5py
import ismrmrd
import numpy as np
import pytest

from scoremri.gadget.files.preview import preview, write_png
from scoremri.gadget.files.rawfile import RawFileError, read_images, read_noise, read_raw, write_images
from scoremri.gadget.files.simulate import simulate, write_raw
from scoremri.gadget.gadgetron.preprocess import noise_prewhitener, preprocess, remove_ro_oversampling
from scoremri.recon import noise as rnoise


@pytest.fixture(scope="module")
def raw(tmp_path_factory, dipy_t1):
    img = dipy_t1[::8, ::8]
    sim = simulate(img / img.max(), coils=3, accel=2, acs=6, sigma=0.02, seed=2, ro_oversampling=2,
                   noise_samples=512)
    path = tmp_path_factory.mktemp("raw") / "scan.h5"
    write_raw(path, sim)
    return path, sim


def test_read_raw_round_trip(raw):
    path, sim = raw
    xml, header, acqs = read_raw(path)
    assert xml == sim["xml"]
    assert len(acqs) == len(sim["acquisitions"])
    for a, b in zip(acqs, sim["acquisitions"]):
        np.testing.assert_array_equal(a.data, b.data)
        assert a.getHead() == b.getHead()
    # the ismrmrd library reads our file the same way
    ds = ismrmrd.Dataset(str(path), "dataset", create_if_needed=False, mode="r")
    np.testing.assert_array_equal(ds.read_acquisition(5).data, acqs[5].data)
    ds.close()


def test_bad_files_give_clear_errors(raw, tmp_path):
    path, _ = raw
    with pytest.raises(RawFileError, match="no such file"):
        read_raw(tmp_path / "nope.h5")
    (tmp_path / "text.h5").write_text("not hdf5")
    with pytest.raises(RawFileError, match="not an HDF5 file"):
        read_raw(tmp_path / "text.h5")
    blob = path.read_bytes()
    (tmp_path / "trunc.h5").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(RawFileError, match="trunc.h5"):
        read_raw(tmp_path / "trunc.h5")
    with pytest.raises(RawFileError, match="no group 'other'"):
        read_raw(path, group="other")
    bad = tmp_path / "badxml.h5"
    bad.write_bytes(blob)
    with h5py.File(bad, "a") as f:
        f["dataset/xml"][0] = b"<ismrmrdHeader><bogus/></ismrmrdHeader>"
    with pytest.raises(RawFileError, match="invalid ISMRMRD XML header"):
        read_raw(bad)
    short = tmp_path / "short.h5"
    short.write_bytes(blob)
    with h5py.File(short, "a") as f:
        rec = f["dataset/data"][3]
        rec["data"] = rec["data"][:-10]
        f["dataset/data"][3] = rec
    with pytest.raises(RawFileError, match="acquisition 3: .* data values but the header says"):
        read_raw(short)
    nodata = tmp_path / "nodata.h5"
    with h5py.File(nodata, "w") as f:
        f.create_group("dataset").create_dataset("xml", data=[b"x"])
    with pytest.raises(RawFileError, match="acquisitions\\) is missing"):
        read_raw(nodata)


def test_prewhitener_matches_recon_noise_and_whitens(raw, tmp_path):
    path, sim = raw
    _, header, acqs = read_raw(path)
    W, rep = noise_prewhitener(acqs, header)
    noise = acqs[0].data
    want = rnoise.prewhitening_matrix(rnoise.noise_covariance(noise), 5.0, 5.0, 0.5)
    np.testing.assert_allclose(W, want, rtol=1e-6)
    assert rep["noise_scans"] == 1 and rep["noise_samples"] == 512 and rep["noise_std"] == pytest.approx(0.02, rel=0.1)
    # whitened noise scan: identity covariance (s = 1)
    wn = W @ noise
    np.testing.assert_allclose(wn @ wn.conj().T / (wn.shape[1] - 1), np.eye(3), atol=1e-5)
    # preprocess applies exactly W @ data, after which RO oversampling goes
    out = preprocess(acqs, header, W, remove_oversampling=False)
    assert len(out) == len(acqs) - 1
    np.testing.assert_allclose(out[0].data, W @ acqs[1].data, rtol=1e-5, atol=1e-6)
    # a separate noise file (dependent measurement) gives the same matrix
    nfile = tmp_path / "noise.h5"
    write_raw(nfile, {**sim, "acquisitions": sim["acquisitions"][:1]})
    W2, rep2 = noise_prewhitener(read_noise(nfile), header, acq_dwell_time_us=5.0, source=str(nfile))
    np.testing.assert_allclose(W2, W)
    assert rep2["source"] == str(nfile)
    with pytest.raises(RawFileError, match="no noise scans"):
        read_noise(_imaging_only(sim, tmp_path))


def _imaging_only(sim, tmp_path):
    p = tmp_path / "imgonly.h5"
    write_raw(p, {**sim, "acquisitions": sim["acquisitions"][1:]})
    return p


def test_no_noise_scans_warns(raw, caplog):
    path, sim = raw
    _, header, acqs = read_raw(path)
    with caplog.at_level(logging.WARNING):
        W, rep = noise_prewhitener(acqs[1:], header)
    assert W is None and rep["noise_scans"] == 0
    assert "NOT prewhitened" in caplog.text


def test_remove_ro_oversampling_keeps_centre_and_updates_counters():
    rng = np.random.default_rng(0)
    prof = np.zeros((2, 40), np.complex64)
    prof[:, 10:30] = rng.normal(size=(2, 20)) + 1j * rng.normal(size=(2, 20))
    k = np.fft.fftshift(np.fft.fft(np.fft.ifftshift(prof, axes=-1), axis=-1, norm="ortho"), axes=-1)
    acq = ismrmrd.Acquisition.from_array(k.astype(np.complex64), center_sample=20, discard_pre=4, discard_post=2)
    out = remove_ro_oversampling(acq, 2.0)
    assert (out.number_of_samples, out.center_sample, out.discard_pre, out.discard_post) == (20, 10, 2, 1)
    back = np.fft.fftshift(np.fft.ifft(np.fft.ifftshift(out.data, axes=-1), axis=-1, norm="ortho"), axes=-1)
    np.testing.assert_allclose(back, prof[:, 10:30], atol=1e-5)  # image pixels preserved (unitary FFTs)


def _image(series: int, index: int, arr: np.ndarray) -> ismrmrd.Image:
    img = ismrmrd.Image.from_array(arr[None, None].astype(np.complex64))
    h = img.getHead()
    h.image_series_index = series
    h.image_index = index
    h.image_type = 5
    img.setHead(h)
    img.data[:] = arr[None, None]
    return img


def _picture(path, shape: tuple[int, int]) -> np.ndarray:
    """The (ny, nx) image inside a labelled preview PNG (its box is in the PNG text), at its own pixel size."""
    from PIL import Image

    im = Image.open(path)
    x0, y0, w, h = (int(v) for v in im.text["scoremri:image_box"].split(","))
    assert h % shape[0] == 0 and w % shape[1] == 0 and h >= 256 - shape[0]  # enlarged by a whole factor
    rgb = np.asarray(im.convert("RGB"))[y0 : y0 + h, x0 : x0 + w]
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 0] == rgb[..., 2]).all()  # grey, nothing drawn on it
    gray = rgb[..., 0]
    fy, fx = h // shape[0], w // shape[1]
    small = gray[::fy, ::fx]
    np.testing.assert_array_equal(np.kron(small, np.ones((fy, fx), np.uint8)), gray)
    return small


def test_write_images_layout_and_png(tmp_path):
    rng = np.random.default_rng(1)
    arrs = [rng.normal(size=(12, 10)) + 1j * rng.normal(size=(12, 10)) for _ in range(3)]
    imgs = [_image(1, 1, arrs[0]), _image(1, 2, arrs[1]), _image(2, 1, arrs[2])]
    counts = write_images(tmp_path / "o.h5", imgs)
    assert counts == {1: 2, 2: 1}
    with h5py.File(tmp_path / "o.h5") as f:
        assert set(f["dataset"].keys()) == {"image_1", "image_2"}
        assert set(f["dataset/image_1"].keys()) == {"header", "attributes", "data"}
        assert f["dataset/image_1/data"].shape == (2, 1, 1, 12, 10)
    back = read_images(tmp_path / "o.h5")
    np.testing.assert_allclose(back[1][1].data[0, 0], arrs[1].astype(np.complex64))
    assert back[2][0].image_type == 5
    paths = write_png(tmp_path / "png", imgs, prefix="o")
    assert [p.name for p in paths] == ["o_s1_001.png", "o_s1_002.png", "o_s2_001.png"]
    pic = _picture(paths[1], (12, 10))
    assert pic.shape == (12, 10) and pic.dtype == np.uint8
    np.testing.assert_array_equal(pic, preview(imgs[1].data))
    mag = np.abs(arrs[1])
    top = np.percentile(mag, 99.5)
    assert pic.max() == 255 and (pic == 255).sum() >= (mag >= top).sum()
    j = np.unravel_index(np.argmin(mag), mag.shape)
    assert abs(int(pic[j]) - round(255 * mag[j] / top)) <= 1


def test_png_of_a_float_std_map(tmp_path):
    std = np.linspace(0, 2, 12 * 10, dtype=np.float32).reshape(12, 10)
    img = ismrmrd.Image.from_array(std[None, None])
    h = img.getHead()
    h.image_series_index, h.image_index, h.image_type = 2, 1, 1
    img.setHead(h)
    img.data[:] = std[None, None]
    (p,) = write_png(tmp_path, [img], prefix="r")
    pic = _picture(p, (12, 10))
    assert p.name == "r_s2_001.png" and pic[0, 0] == 0 and pic[-1, -1] == 255
    assert np.all(np.diff(pic.ravel().astype(int)) >= 0)  # monotone map, no wrap-around
