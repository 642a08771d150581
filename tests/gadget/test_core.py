"""ReconCore in process: pixels vs ground truth and vs a direct reconstruct() call, image headers, seeds,
crop to the recon matrix, labelled SENSE fallback (sampler failure, time budget, slice deadline), unusable
input errors, slices batched through one sampler run."""
from __future__ import annotations

import copy
import dataclasses

import ismrmrd
import numpy as np
import pytest

import gadget_data as gd
from scoremri.gadget.core import ReconCore, slice_seed
from scoremri.gadget.images import AI_LABEL, CLASSICAL_LABEL
from scoremri.recon import methods
from scoremri.recon.api import ReconError, reconstruct
from scoremri.recon.config import load_config


def _replace_method(monkeypatch, name, fn):
    """Swap the function of a registered method for the duration of a test."""
    monkeypatch.setitem(methods._REGISTRY, name, dataclasses.replace(methods.get_method(name), fn=fn))


def _hdr(xml: str):
    return ismrmrd.xsd.CreateFromDocument(xml)


def _nrmse(img: np.ndarray, gt: np.ndarray) -> float:
    """Relative error after a least-squares scalar fit on magnitude."""
    a = np.abs(img).ravel()
    g = gt.ravel()
    s = float(a @ g / (a @ a))
    return float(np.linalg.norm(s * a - g) / np.linalg.norm(g))


@pytest.fixture(scope="module")
def sense_cfg():
    return load_config("sense")


def test_sense_image_matches_ground_truth_and_direct_call(sense_cfg):
    core = ReconCore(_hdr(gd.header()), sense_cfg, device="cpu")
    imgs = list(core.process(gd.slice_data()))
    assert len(imgs) == 1
    img = imgs[0]
    assert img.data.dtype == np.complex64 and img.data.shape == (1, 1, gd.NY, gd.NX)
    k, gt = gd.kspace()
    rows = gd.rows_r2()
    mask = np.zeros((gd.NY, gd.NX), bool)
    mask[rows] = True
    seed = slice_seed(sense_cfg.sampler.seed, 0, 0, 0, 0, 0)
    direct = reconstruct(k * mask[None], mask, sense_cfg, device="cpu", seed=seed)
    np.testing.assert_allclose(img.data[0, 0], direct.image, rtol=0, atol=1e-6 * np.abs(direct.image).max())
    assert _nrmse(img.data[0, 0], gt) < 0.08, _nrmse(img.data[0, 0], gt)
    rep = core.finish()
    assert rep["slices"] == 1 and rep["images"] == 1 and rep["fallbacks"] == []


def test_ref_buffer_counts_as_measured_and_gives_same_image(sense_cfg):
    """Embedded ref lines (ACS in a separate ref buffer) are placed on the grid as measured data: nearly the
    same image as with the ACS in the data (maps differ slightly: ESPIRiT on the calib block vs the ACS)."""
    a = list(ReconCore(_hdr(gd.header()), sense_cfg, device="cpu").process(gd.slice_data(ref=False)))[0]
    b = list(ReconCore(_hdr(gd.header()), sense_cfg, device="cpu").process(gd.slice_data(ref=True)))[0]
    ref = np.abs(a.data).max()
    assert np.abs(a.data - b.data).max() < 0.02 * ref
    _, gt = gd.kspace()
    assert _nrmse(b.data[0, 0], gt) < 0.08


def test_headers_counters_geometry_index_and_labels(sense_cfg):
    cfg = copy.deepcopy(sense_cfg)
    cfg.output.series = 7
    core = ReconCore(_hdr(gd.header(slices=3)), cfg, device="cpu")
    rds = [gd.slice_data(slice_=s, repetition=1) for s in range(3)]
    imgs = [im for rd in rds for im in core.process(rd)]
    assert [im.image_index for im in imgs] == [1, 2, 3]
    for s, (im, rd) in enumerate(zip(imgs, rds)):
        centre = rd.bits[0].data.headers[gd.NY // 2, 0, 0, 0, 0]
        assert im.image_type == 5 and im.image_series_index == 7
        assert tuple(im.matrix_size) == (gd.NX, gd.NY, 1)
        np.testing.assert_allclose(list(im.field_of_view), [256.0, 256.0, 5.0])
        for f in ("position", "read_dir", "phase_dir", "slice_dir", "patient_table_position"):
            np.testing.assert_allclose(list(getattr(im, f)), list(getattr(centre, f)), atol=1e-6)
        for f in ("slice", "contrast", "phase", "repetition", "set", "average"):
            assert getattr(im, f) == getattr(centre.idx, f)
        assert im.slice == s and im.repetition == 1
        meta = im.meta
        assert meta["GADGETRON_DataRole"] == "Image"
        # SENSE is a classical method: labelled as a research reconstruction, never as AI-generated
        assert meta["GADGETRON_ImageComment"].startswith(CLASSICAL_LABEL)
        assert "AI" not in meta["GADGETRON_ImageComment"] and "model" not in meta["GADGETRON_ImageComment"]
        assert "sampler sense" in meta["GADGETRON_ImageComment"]
        assert "FALLBACK" not in meta["GADGETRON_ImageComment"]
        assert meta["GADGETRON_SeqDescription"] == "_SCOREMRI_SENSE"
        assert meta["AIGenerated"] == "0" and meta["SCOREMRI_Method"] == "sense"
    # map cache: one entry per slice location
    assert sorted(core._maps) == [(0, 0), (1, 0), (2, 0)]


def test_slice_seed_depends_on_counters_only():
    a = slice_seed(0, 1, 0, 0, 2, 0)
    assert a == slice_seed(0, 1, 0, 0, 2, 0)
    assert len({a, slice_seed(0, 2, 0, 0, 2, 0), slice_seed(0, 1, 0, 0, 3, 0), slice_seed(1, 1, 0, 0, 2, 0)}) == 4


def test_phase_oversampling_is_cropped_to_recon_fov(sense_cfg):
    rd = gd.slice_data()
    s = rd.bits[0].data.sampling
    s.encoded_FOV[1] = 512.0  # 2x phase oversampling: recon FOV is half the encoded FOV in y
    s.recon_matrix[1] = gd.NY // 2
    img = list(ReconCore(_hdr(gd.header()), sense_cfg, device="cpu").process(rd))[0]
    assert img.data.shape == (1, 1, gd.NY // 2, gd.NX)
    full = list(ReconCore(_hdr(gd.header()), sense_cfg, device="cpu").process(gd.slice_data()))[0]
    np.testing.assert_allclose(img.data[0, 0], full.data[0, 0, gd.NY // 4 : gd.NY // 4 + gd.NY // 2], atol=1e-6)


class _Prior:
    sigma_min, sigma_max, sha256, name = 0.01, 1.0, "ab" * 32, "dummy"


def test_sampler_failure_falls_back_to_labelled_sense(sense_cfg, monkeypatch):
    def broken(problem):
        raise RuntimeError("simulated sampler failure")

    _replace_method(monkeypatch, "fast", broken)
    cfg = load_config("sense", {"sampler.method": "fast"})
    core = ReconCore(_hdr(gd.header()), cfg, device="cpu", prior=_Prior())
    img = list(core.process(gd.slice_data()))[0]
    sense_img = list(ReconCore(_hdr(gd.header()), sense_cfg, device="cpu").process(gd.slice_data()))[0]
    np.testing.assert_allclose(img.data, sense_img.data, atol=1e-6 * np.abs(sense_img.data).max())
    comment = img.meta["GADGETRON_ImageComment"]
    assert "FALLBACK" in comment and "simulated sampler failure" in comment and "(fast requested)" in comment
    # the fallback image is SENSE, not the prior's: no AI label, no model hash
    assert comment.startswith(CLASSICAL_LABEL) and "AI-generated" not in comment and "abababab" not in comment
    assert img.meta["GADGETRON_SeqDescription"] == "_SCOREMRI_SENSE_FALLBACK"
    assert img.meta["AIGenerated"] == "0" and img.meta["SCOREMRI_Requested"] == "fast"
    rep = core.finish()
    assert len(rep["fallbacks"]) == 1 and "simulated sampler failure" in rep["fallbacks"][0]["reason"]


def test_time_budget_exceeded_falls_back_for_the_rest(sense_cfg, monkeypatch):
    import torch

    calls = []

    def slow_but_fine(problem):
        calls.append(1)
        img = torch.zeros((problem.batch, *problem.kspace.shape[-2:]), dtype=torch.complex64)
        return img, None, {"nfe": 3}

    _replace_method(monkeypatch, "fast", slow_but_fine)
    # a zero image contradicts the data: the sanity check (tested on its own) is off to isolate the budget
    cfg = load_config("sense", {"sampler.method": "fast", "sampler.time_budget_s": "1e-9", "sampler.sanity": "false"})
    core = ReconCore(_hdr(gd.header(slices=3)), cfg, device="cpu", prior=_Prior())
    imgs = [im for s in range(3) for im in core.process(gd.slice_data(slice_=s))]
    assert len(calls) == 1  # first slice ran the learned method, the budget was then spent
    assert "FALLBACK" not in imgs[0].meta["GADGETRON_ImageComment"]
    assert "NFE 3" in imgs[0].meta["GADGETRON_ImageComment"]
    # the slice the learned method made is AI-generated; the SENSE fallbacks after it are not
    assert imgs[0].meta["GADGETRON_ImageComment"].startswith(AI_LABEL)
    assert "model abababababab" in imgs[0].meta["GADGETRON_ImageComment"]
    assert imgs[0].meta["GADGETRON_SeqDescription"] == "_SCOREMRI_AI"
    assert imgs[0].meta["AIGenerated"] == "1"
    for im in imgs[1:]:
        assert "time budget" in im.meta["GADGETRON_ImageComment"]
        assert "AI-generated" not in im.meta["GADGETRON_ImageComment"]
        assert im.meta["AIGenerated"] == "0"
        assert np.abs(im.data).max() > 0
    assert len(core.finish()["fallbacks"]) == 2


@pytest.mark.parametrize(
    "mutate, message",
    [
        ("nan", "NaN"),
        ("nocalib", "calibration"),
        ("dims", "7 dimensions"),
        ("e2", "undersampled along E2"),
    ],
)
def test_unusable_input_raises_clear_recon_error(sense_cfg, mutate, message):
    from gadgetron.types.recon_data import ReconBit, ReconBuffer, ReconData

    if mutate == "nocalib":
        rd = gd.slice_data(rows=np.arange(0, gd.NY, 4))
    else:
        rd = gd.slice_data()
    buf = rd.bits[0].data
    if mutate == "nan":
        buf.data[:, :, :, :, :, :, :] = np.nan
    elif mutate == "dims":
        rd = ReconData([ReconBit(ReconBuffer(buf.data[..., 0], None, None, buf.headers, buf.sampling))])
    elif mutate == "e2":
        data = np.concatenate([buf.data, buf.data], axis=2)
        heads = np.concatenate([buf.headers, buf.headers], axis=1)
        heads[1, 1, 0, 0, 0] = ismrmrd.AcquisitionHeader()  # a line missing in partition 1 only
        heads[0, 1, 0, 0, 0] = ismrmrd.AcquisitionHeader()
        rd = ReconData([ReconBit(ReconBuffer(data, None, None, heads, buf.sampling))])
    core = ReconCore(_hdr(gd.header()), sense_cfg, device="cpu")
    with pytest.raises(ReconError, match=message):
        list(core.process(rd))


def test_fully_sampled_3d_e2_is_reconstructed_per_partition(sense_cfg):
    """3-D with a fully sampled E2: inverse FFT along E2, then one 2-D recon per partition -> z = 2."""
    from gadgetron.types.recon_data import ReconBit, ReconBuffer, ReconData

    from scoremri.recon.fft import fft1c
    import torch

    buf = gd.slice_data().bits[0].data
    # two partitions: the same slice and a scaled copy, then FFT along E2 to make E2 k-space
    img_space = np.concatenate([buf.data, 0.5 * buf.data], axis=2)
    data = fft1c(torch.from_numpy(np.ascontiguousarray(img_space)), dim=2).numpy().astype(np.complex64)
    heads = np.concatenate([buf.headers, buf.headers], axis=1)
    buf.sampling.encoded_matrix[2] = buf.sampling.recon_matrix[2] = 2
    rd = ReconData([ReconBit(ReconBuffer(data, None, None, heads, buf.sampling))])
    img = list(ReconCore(_hdr(gd.header()), sense_cfg, device="cpu").process(rd))[0]
    assert img.data.shape == (1, 2, gd.NY, gd.NX)
    a, b = img.data[0, 0], img.data[0, 1]
    rel = np.abs(b - 0.5 * a).max() / np.abs(a).max()
    assert rel < 1e-3, rel


def test_uncertainty_sends_std_map_in_next_series(monkeypatch):
    import torch

    def with_std(problem):
        shape = (problem.batch, *problem.kspace.shape[-2:])
        img = torch.ones(shape, dtype=torch.complex64)
        std = torch.full(shape, 0.25, dtype=torch.float32)
        return img, std, {"nfe": 4}

    _replace_method(monkeypatch, "fast", with_std)
    cfg = load_config("sense", {"sampler.method": "fast", "sampler.samples": "2", "output.uncertainty": "true",
                                "output.series": "3", "sampler.sanity": "false"})  # a flat image, maps cropped
    core = ReconCore(_hdr(gd.header()), cfg, device="cpu", prior=_Prior())
    imgs = list(core.process(gd.slice_data()))
    assert [(im.image_series_index, im.image_type, im.data.dtype) for im in imgs] == [
        (3, 5, np.complex64), (4, 1, np.float32)]
    np.testing.assert_allclose(imgs[1].data, 0.25)
    assert imgs[0].image_index == imgs[1].image_index == 1


def test_configuration_properties_both_xml_forms():
    from scoremri.gadget.gadgetron.external import config_from_properties, parse_properties
    from scoremri.recon.config import ConfigError

    xml = ('<configuration><property name="preset" value="sense"/>'
           '<property><name>sampler.cg_iters</name><value>7</value></property>'
           '<property name="device" value="cpu"/></configuration>')
    props = parse_properties(xml)
    assert props == {"preset": "sense", "sampler.cg_iters": "7", "device": "cpu"}
    cfg, device = config_from_properties(props)
    assert cfg.sampler.method == "sense" and cfg.sampler.cg_iters == 7 and device == "cpu"
    assert config_from_properties({})[0].sampler.method == "fast"  # default preset
    with pytest.raises(ConfigError, match="device"):
        config_from_properties({"device": "tpu"})


def test_averages_in_s_are_combined(sense_cfg):
    """S_dimension=average: two noisy averages -> one image equal to the image of the averaged k-space."""
    from gadgetron.types.recon_data import ReconBit, ReconBuffer, ReconData

    b1, b2 = gd.slice_data(seed=1).bits[0].data, gd.slice_data(seed=2).bits[0].data
    for h in b2.headers.flat:
        h.idx.average = 1
    data = np.concatenate([b1.data, b2.data], axis=5)
    heads = np.concatenate([b1.headers, b2.headers], axis=3)
    rd = ReconData([ReconBit(ReconBuffer(data, None, None, heads, b1.sampling))])
    imgs = list(ReconCore(_hdr(gd.header()), sense_cfg, device="cpu").process(rd))
    assert len(imgs) == 1 and imgs[0].average == 0
    mean = ReconData([ReconBit(ReconBuffer(((b1.data + b2.data) / 2).astype(np.complex64), None, None,
                                           b1.headers, b1.sampling))])
    ref = list(ReconCore(_hdr(gd.header()), sense_cfg, device="cpu").process(mean))[0]
    np.testing.assert_allclose(imgs[0].data, ref.data, atol=1e-5 * np.abs(ref.data).max())


class _SlowGaussian:
    """A Gaussian prior (recon tests' exactness prior) whose network calls each take ``delay`` seconds."""

    def __init__(self, delay: float) -> None:
        from scoremri.model.priors import GaussianPrior

        self.inner = GaussianPrior(0.5, 0.2, sigma_min=0.01, sigma_max=20.0)
        self.sigma_min, self.sigma_max, self.sha256, self.name = 0.01, 20.0, "cd" * 32, "slow"
        self.delay = delay
        self.calls = 0

    def denoise(self, x, sigma):
        import time

        self.calls += 1
        time.sleep(self.delay)
        return self.inner.denoise(x, sigma)


def test_slices_ready_together_run_as_one_batch_with_the_same_images():
    cfg = load_config("fast", {"sampler.steps": 4})
    prior = _SlowGaussian(0.0)
    rds = [gd.slice_data(slice_=s, seed=s) for s in range(3)]
    one = ReconCore(_hdr(gd.header(slices=3)), cfg, device="cpu", prior=prior, max_batch=1)
    a = [im for rd in rds for im in one.process(rd)]
    batched = ReconCore(_hdr(gd.header(slices=3)), cfg, device="cpu", prior=prior, max_batch=8)
    b = list(batched.process_many(rds))
    assert [im.slice for im in b] == [0, 1, 2] and [im.image_index for im in b] == [1, 2, 3]
    for x, y in zip(a, b):
        assert np.abs(x.data - y.data).max() <= 1e-4 * np.abs(x.data).max()
        assert x.meta["GADGETRON_ImageComment"] == y.meta["GADGETRON_ImageComment"]
    assert one.finish()["batches"] == [1, 1, 1]
    rep = batched.finish()
    assert rep["batches"] == [3] and rep["slices"] == 3 and rep["fallbacks"] == []
    assert {"maps", "sense", "network", "dc"} <= set(rep["stages"])


def test_slice_deadline_falls_back_to_labelled_sense_with_a_warning(sense_cfg, caplog):
    cfg = load_config("fast", {"sampler.steps": 50, "sampler.slice_deadline_s": 0.2})
    prior = _SlowGaussian(0.05)
    core = ReconCore(_hdr(gd.header(slices=2)), cfg, device="cpu", prior=prior, max_batch=2)
    with caplog.at_level("WARNING", logger="scoremri.gadget.core"):
        imgs = list(core.process_many([gd.slice_data(slice_=s) for s in range(2)]))
    assert prior.calls < 50  # stopped inside the sampler, not after it
    sense = list(ReconCore(_hdr(gd.header()), sense_cfg, device="cpu").process(gd.slice_data()))[0]
    np.testing.assert_allclose(imgs[0].data, sense.data, atol=1e-6 * np.abs(sense.data).max())
    for s, im in enumerate(imgs):
        comment = im.meta["GADGETRON_ImageComment"]
        assert "FALLBACK to SENSE" in comment and "slice_deadline_s exceeded" in comment
        assert "0.2 s per slice x 2 slices = 0.4 s" in comment
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 2 and all("slice_deadline_s exceeded" in w for w in warned)
    assert warned[0].startswith("slice 0 contrast 0") and warned[1].startswith("slice 1 contrast 0")
    assert len(core.finish()["fallbacks"]) == 2


def test_a_failing_slice_does_not_take_the_batch_with_it(sense_cfg, monkeypatch):
    """A run of several slices that fails is retried slice by slice: only the bad one falls back."""
    real = methods.get_method("fast").fn

    def picky(problem):
        if bool((problem.kspace.abs().sum(dim=(1, 2, 3)) > 1e3).any()):  # the loud slice
            raise RuntimeError("simulated failure on one slice")
        return real(problem)

    _replace_method(monkeypatch, "fast", picky)
    cfg = load_config("fast", {"sampler.steps": 3})
    rds = [gd.slice_data(slice_=s, seed=s) for s in range(3)]
    loud = rds[1].bits[0].data
    loud.data = np.asarray(loud.data) * 1e4
    core = ReconCore(_hdr(gd.header(slices=3)), cfg, device="cpu", prior=_SlowGaussian(0.0), max_batch=3)
    imgs = list(core.process_many(rds))
    comments = [im.meta["GADGETRON_ImageComment"] for im in imgs]
    assert "FALLBACK" not in comments[0] and "FALLBACK" not in comments[2]
    assert "simulated failure on one slice" in comments[1]
    assert core.finish()["batches"] == [1, 1]
