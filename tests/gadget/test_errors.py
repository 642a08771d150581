"""Error paths through the real child: unusable input -> ERROR naming the problem + CLOSE + clean exit, with
the images of earlier slices received; a dropped parent -> the child exits; a failing sampler -> a
labelled SENSE fallback (a config value that is only invalid at sampling time, no test-only code path)."""
from __future__ import annotations

import numpy as np
from gadgetron.types.recon_data import ReconBit, ReconBuffer, ReconData

import gadget_data as gd
from scoremri.gadget.testing import harness


def _run(items, config=None, **kw):
    return harness.run_execute(config or harness.config_xml("sense", "cpu"), gd.header(slices=3), items,
                               timeout=120, **kw)


def _assert_error(res, *words: str, images: int) -> None:
    assert len(res.errors) == 1, (res.errors, res.child_log[-3000:])
    for w in words:
        assert w in res.errors[0], res.errors[0]
    assert res.closed, "no CLOSE after ERROR"
    assert res.exit_code == 0, res.child_log[-3000:]
    assert len(res.images) == images
    for im in res.images:
        assert im.data.dtype == np.complex64 and np.isfinite(im.data).all()


def test_missing_calibration_after_a_good_slice():
    bad = gd.slice_data(slice_=1, rows=np.arange(1, gd.NY, 4))  # no ref, centre not sampled
    res = _run([gd.slice_data(slice_=0), bad, gd.slice_data(slice_=2)])
    _assert_error(res, "calibration", "slice 1", images=1)
    assert res.images[0].slice == 0


def test_nan_data_after_a_good_slice():
    bad = gd.slice_data(slice_=1)
    bad.bits[0].data.data[...] = np.nan
    res = _run([gd.slice_data(slice_=0), bad])
    _assert_error(res, "NaN", images=1)


def test_wrong_dimensions():
    buf = gd.slice_data().bits[0].data
    bad = ReconData([ReconBit(ReconBuffer(np.ascontiguousarray(buf.data[..., 0]), None, None, buf.headers,
                                          buf.sampling))])
    res = _run([gd.slice_data(slice_=0), bad])
    _assert_error(res, "7 dimensions", images=1)


def test_corrupt_model_file(tmp_path):
    garbage = tmp_path / "broken.safetensors"
    garbage.write_bytes(b"this is not a model" * 100)
    cfg = harness.config_xml("fast", "cpu", **{"model.path": str(garbage)})
    res = _run([gd.slice_data()], config=cfg)
    _assert_error(res, "broken.safetensors", images=0)


def test_unknown_config_property_is_named():
    res = _run([gd.slice_data()], config=harness.config_xml("sense", "cpu", **{"sampler.stepz": "3"}))
    _assert_error(res, "sampler.stepz", images=0)


def test_parent_dropping_the_socket_mid_stream_ends_the_child():
    items = [gd.slice_data(slice_=s) for s in range(3)]
    res = _run(items, drop_after=1, exit_timeout=20)
    assert not res.timed_out, "child still running 20 s after the parent dropped the socket"
    assert res.exit_code is not None
    assert "dropped the connection" in res.child_log


def test_sampler_failure_gives_labelled_fallback_image():
    """sampler.dc=ssos passes config validation but the fast sampler refuses it when it samples."""
    cfg = harness.config_xml("fast", "cpu", **{"sampler.dc": "ssos", "sampler.steps": "2"})
    res = _run([gd.slice_data(slice_=0)], config=cfg)
    assert res.errors == [] and res.closed and res.exit_code == 0, res.child_log[-3000:]
    assert len(res.images) == 1
    comment = res.images[0].meta["GADGETRON_ImageComment"]
    assert "FALLBACK" in comment and "fast failed" in comment and "ssos" in comment, comment
