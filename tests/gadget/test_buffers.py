"""AcquisitionAccumulateTrigger + BucketToBuffer equivalence, and the pipeline XML reader."""
from __future__ import annotations

import io
import textwrap

import ismrmrd
import numpy as np
import pytest
from gadgetron.types.recon_data import read_recon_data, write_recon_data

from scoremri.gadget.gadgetron.buffers import BufferLayoutError, iter_recon_data
from scoremri.gadget.gadgetron.pipeline import PipelineError, PipelineSpec, read_pipeline
from scoremri.gadget.gadgetron.preprocess import preprocess
from scoremri.gadget.files.simulate import make_header

GADGETRON_SPEC = PipelineSpec(trigger_dimension="repetition", sorting_dimension="slice", n_dimension="contrast",
                              s_dimension="average", split_slices=True, ignore_segment=True)


def line(ky: int, data: np.ndarray, *, centre: int | None = None, flags: tuple[int, ...] = (), **idx: int):
    """An acquisition (C, N) at E1 = ky with counters ``idx``."""
    acq = ismrmrd.Acquisition.from_array(np.ascontiguousarray(data, dtype=np.complex64))
    h = acq.getHead()
    h.center_sample = data.shape[1] // 2 if centre is None else centre
    h.idx.kspace_encode_step_1 = ky
    for k, v in idx.items():
        setattr(h.idx, k, v)
    for f in flags:
        h.flags |= 1 << (f - 1)
    h.read_dir[:] = (1, 0, 0)
    acq.setHead(h)
    acq.data[:] = data
    return acq


def rand(rng: np.random.Generator, c: int, n: int) -> np.ndarray:
    return (rng.normal(size=(c, n)) + 1j * rng.normal(size=(c, n))).astype(np.complex64)


def acquired(buf) -> np.ndarray:
    return np.vectorize(lambda h: int(h.number_of_samples) > 0, otypes=[bool])(buf.headers)


def test_lines_land_by_index_ref_and_headers():
    rng = np.random.default_rng(0)
    header = make_header(32, 16, 2, 2, 1, 1, 0)  # ny=32, nx=16, 2 coils
    acqs, expect = [], {}
    for ky in (0, 2, 4, 14, 15, 16, 17, 18, 30):
        d = rand(rng, 2, 16)
        flags = (21,) if 14 <= ky <= 18 else ()
        acqs.append(line(ky, d, flags=flags))
        expect[ky] = d
    acqs.append(line(20, rand(rng, 2, 16), flags=(20,)))  # calibration only
    acqs.append(line(22, rand(rng, 2, 16), flags=(24,)))  # phase correction: neither data nor ref
    (rd,) = list(iter_recon_data(acqs, header, GADGETRON_SPEC))
    (bit,) = rd.bits
    assert bit.data.data.shape == (16, 32, 1, 2, 1, 1, 1) and bit.data.data.dtype == np.complex64
    got = acquired(bit.data)[:, 0, 0, 0, 0]
    assert sorted(np.flatnonzero(got)) == sorted(expect)  # header only where acquired (not 20, not 24)
    for ky, d in expect.items():
        np.testing.assert_array_equal(bit.data.data[:, ky, 0, :, 0, 0, 0], d.T)
        assert bit.data.headers[ky, 0, 0, 0, 0].idx.kspace_encode_step_1 == ky
    assert np.abs(bit.data.data[:, 1]).max() == 0  # unacquired: zeros
    assert bit.ref is not None
    assert sorted(np.flatnonzero(acquired(bit.ref)[:, 0, 0, 0, 0])) == [14, 15, 16, 17, 18, 20]
    sl = [tuple(s) for s in bit.data.sampling.sampling_limits]
    assert sl[0] == (0, 8, 15) and sl[1] == (0, 16, 31)
    assert list(bit.data.sampling.recon_matrix) == [16, 32, 1]


def test_partial_fourier_lines_placed_by_encoding_limits():
    rng = np.random.default_rng(1)
    header = make_header(64, 16, 1, 1, 1, 1, 0)
    lim = header.encoding[0].encodingLimits.kspace_encoding_step_1
    lim.minimum, lim.maximum, lim.center = 0, 47, 16  # 75 % partial Fourier: the first 16 lines missing
    acqs = [line(ky, rand(rng, 1, 16)) for ky in range(48)]
    (rd,) = list(iter_recon_data(acqs, header, GADGETRON_SPEC))
    buf = rd.bits[0].data
    rows = np.flatnonzero(acquired(buf)[:, 0, 0, 0, 0])
    assert rows[0] == 16 and rows[-1] == 63 and rows.size == 48
    np.testing.assert_array_equal(buf.data[:, 32, 0, :, 0, 0, 0], acqs[16].data.T)  # centre line at ny/2
    assert tuple(buf.sampling.sampling_limits[1]) == (16, 32, 63)


def test_asymmetric_echo_placed_by_center_sample():
    rng = np.random.default_rng(2)
    header = make_header(16, 64, 1, 1, 1, 1, 0)
    d = rand(rng, 1, 48)
    acqs = [line(ky, d, centre=16) for ky in range(16)]  # 48 of 64 samples, echo at sample 16
    (rd,) = list(iter_recon_data(acqs, header, GADGETRON_SPEC))
    buf = rd.bits[0].data
    assert buf.data.shape[0] == 64
    np.testing.assert_array_equal(buf.data[16:64, 3, 0, :, 0, 0, 0], d.T)
    assert buf.data[32, 3, 0, 0, 0, 0, 0] == d[0, 16]  # the echo centre at RO // 2
    assert np.abs(buf.data[:16]).max() == 0
    assert tuple(buf.sampling.sampling_limits[0]) == (16, 32, 63)


def test_readout_oversampling_removed_before_buffering():
    rng = np.random.default_rng(3)
    header = make_header(8, 32, 2, 1, 1, 2, 0)  # encoded x 64, recon x 32, FOV doubled
    prof = np.zeros((2, 64), np.complex64)
    prof[:, 16:48] = rand(rng, 2, 32)
    k = np.fft.fftshift(np.fft.fft(np.fft.ifftshift(prof, axes=-1), axis=-1, norm="ortho"), axes=-1)
    acqs = preprocess([line(ky, k) for ky in range(8)], header, None)
    assert acqs[0].number_of_samples == 32 and acqs[0].center_sample == 16
    want = np.fft.fftshift(np.fft.fft(np.fft.ifftshift(prof[:, 16:48], axes=-1), axis=-1, norm="ortho"), axes=-1)
    np.testing.assert_allclose(acqs[0].data, want, atol=1e-5)
    (rd,) = list(iter_recon_data(acqs, header, GADGETRON_SPEC))
    assert rd.bits[0].data.data.shape[0] == 32
    assert list(rd.bits[0].data.sampling.encoded_matrix) == [32, 8, 1]


def test_trigger_sorting_and_split_slices():
    rng = np.random.default_rng(4)
    header = make_header(8, 8, 1, 1, 2, 1, 0)
    acqs = []
    for rep in range(2):
        for ky in range(8):
            for s in (1, 0):  # interleaved slices, slice 1 first
                acqs.append(line(ky, rand(rng, 1, 8), slice=s, repetition=rep))
    rds = list(iter_recon_data(acqs, header, GADGETRON_SPEC))
    got = [(rd.bits[0].data.headers[0, 0, 0, 0, 0].idx.repetition, rd.bits[0].data.headers[0, 0, 0, 0, 0].idx.slice)
           for rd in rds]
    assert got == [(0, 0), (0, 1), (1, 0), (1, 1)]
    # without split_slices both slices share one buffer (LOC = 2), one per repetition
    spec = PipelineSpec(trigger_dimension="repetition", sorting_dimension="", split_slices=False)
    rds = list(iter_recon_data(acqs, header, spec))
    assert len(rds) == 2 and rds[0].bits[0].data.data.shape[-1] == 2
    a = rds[1].bits[0].data
    src = [x for x in acqs if x.idx.repetition == 1 and x.idx.slice == 1 and x.idx.kspace_encode_step_1 == 5][0]
    np.testing.assert_array_equal(a.data[:, 5, 0, :, 0, 0, 1], src.data.T)
    # no trigger dimension: a single bucket at the end; repetitions become separate buffers (key)
    rds = list(iter_recon_data(acqs, header, PipelineSpec(split_slices=True)))
    assert len(rds) == 4


def test_n_and_s_dimensions_and_averages():
    rng = np.random.default_rng(5)
    header = make_header(8, 8, 1, 1, 1, 1, 0)
    acqs = [line(ky, rand(rng, 1, 8), contrast=c, average=a) for c in range(2) for a in range(3) for ky in range(8)]
    (rd,) = list(iter_recon_data(acqs, header, GADGETRON_SPEC))  # N = contrast, S = average
    buf = rd.bits[0].data
    assert buf.data.shape[4:] == (2, 3, 1)
    src = [x for x in acqs if x.idx.contrast == 1 and x.idx.average == 2 and x.idx.kspace_encode_step_1 == 4][0]
    np.testing.assert_array_equal(buf.data[:, 4, 0, :, 1, 2, 0], src.data.T)
    # averages that are neither N nor S: one buffer per average (Gadgetron's key includes the average)
    rds = list(iter_recon_data(acqs, header, PipelineSpec(n_dimension="contrast", split_slices=True)))
    assert len(rds) == 3 and all(r.bits[0].data.data.shape[4:] == (2, 1, 1) for r in rds)


def test_wire_round_trip_of_buffers():
    rng = np.random.default_rng(6)
    header = make_header(16, 8, 2, 2, 1, 1, 0)
    acqs = [line(ky, rand(rng, 2, 8), flags=(21,) if 6 <= ky <= 9 else ()) for ky in range(0, 16, 2)]
    acqs += [line(ky, rand(rng, 2, 8), flags=(20,)) for ky in (7, 9)]
    (rd,) = list(iter_recon_data(acqs, header, GADGETRON_SPEC))
    stream = io.BytesIO()
    write_recon_data(stream, rd)
    stream.seek(2)  # skip the message id
    back = read_recon_data(stream)
    for a, b in ((rd.bits[0].data, back.bits[0].data), (rd.bits[0].ref, back.bits[0].ref)):
        np.testing.assert_array_equal(a.data, b.data)
        assert [h.idx.kspace_encode_step_1 for h in a.headers.ravel()] == [
            h.idx.kspace_encode_step_1 for h in b.headers.ravel()]
        assert [tuple(x) for x in a.sampling.sampling_limits] == [tuple(x) for x in b.sampling.sampling_limits]


def test_line_outside_limits_is_an_error():
    header = make_header(8, 8, 1, 1, 1, 1, 0)
    acqs = [line(ky, np.ones((1, 8), np.complex64)) for ky in (0, 1, 12)]
    with pytest.raises(BufferLayoutError, match="kspace_encode_step_1 = 12"):
        list(iter_recon_data(acqs, header, GADGETRON_SPEC))
    acqs = [line(0, np.ones((1, 8), np.complex64), centre=1), line(1, np.ones((1, 6), np.complex64), centre=1)]
    with pytest.raises(BufferLayoutError, match="do not fit"):
        list(iter_recon_data(acqs, header, GADGETRON_SPEC))


# ------------------------------------------------------------------------------------------------ pipeline


def test_shipped_pipeline_properties(repo):
    spec = read_pipeline(repo / "pipelines" / "scoremri.xml")
    assert spec.trigger_dimension == "repetition" and spec.sorting_dimension == "slice"
    assert spec.split_slices is True
    assert spec.noise_adjust and spec.remove_ro_oversampling
    assert (spec.external_module, spec.external_target) == ("scoremri.gadget.gadget", "score_recon")
    assert "preset" in spec.config


def test_pipeline_both_property_spellings_and_errors(tmp_path):
    xml = textwrap.dedent("""\
        <configuration><version>2</version><stream>
          <gadget><name>A</name><dll>x</dll><classname>AcquisitionAccumulateTriggerGadget</classname>
            <property name="trigger_dimension" value="slice"/>
            <property><name>sorting_dimension</name><value>contrast</value></property></gadget>
          <gadget><name>B</name><dll>x</dll><classname>BucketToBufferGadget</classname>
            <property name="N_dimension" value="phase"/><property name="split_slices" value="True"/></gadget>
          <external><execute name="m" target="t" type="python"/>
            <configuration><property name="sampler.steps" value="7"/></configuration></external>
        </stream></configuration>""")
    p = tmp_path / "a.xml"
    p.write_text(xml)
    spec = read_pipeline(p)
    assert (spec.trigger_dimension, spec.sorting_dimension, spec.n_dimension) == ("slice", "contrast", "phase")
    assert spec.split_slices and not spec.noise_adjust and not spec.remove_ro_oversampling
    assert spec.config == {"sampler.steps": "7"} and spec.external_target == "t"
    p.write_text(xml.replace('value="phase"', 'value="bogus"'))
    with pytest.raises(PipelineError, match="N_dimension = 'bogus'"):
        read_pipeline(p)
    p.write_text(xml.replace("<external>", "<externalx>").replace("</external>", "</externalx>"))
    with pytest.raises(PipelineError, match="no <external>"):
        read_pipeline(p)
    p.write_text(xml[:-30])
    with pytest.raises(PipelineError, match="invalid XML"):
        read_pipeline(p)
    with pytest.raises(PipelineError, match="no such pipeline"):
        read_pipeline(tmp_path / "missing.xml")


def test_separate_calibration_ref_buffer_is_as_tall_as_the_block():
    import ismrmrd.xsd as xsd

    rng = np.random.default_rng(7)
    header = make_header(32, 8, 2, 2, 1, 1, 0)
    lim = header.encoding[0].encodingLimits.kspace_encoding_step_1
    lim.center, lim.maximum = 14, 29  # partial Fourier: data shift by 16 - 14 = 2 rows, separate ref lines do not
    header.encoding[0].parallelImaging.calibrationMode = xsd.calibrationModeType.SEPARATE
    refs = {ky: rand(rng, 2, 8) for ky in range(10, 18)}
    acqs = [line(ky, d, flags=(20,)) for ky, d in refs.items()]
    acqs += [line(ky, rand(rng, 2, 8)) for ky in range(0, 30, 2)]
    (rd,) = list(iter_recon_data(acqs, header, GADGETRON_SPEC))
    ref, data = rd.bits[0].ref, rd.bits[0].data
    assert ref.data.shape[:2] == (8, 8) and data.data.shape[:2] == (8, 32)
    for ky, d in refs.items():
        np.testing.assert_array_equal(ref.data[:, ky - 10, 0, :, 0, 0, 0], d.T)
    assert sorted(np.flatnonzero(acquired(data)[:, 0, 0, 0, 0])) == list(range(2, 32, 2))
    assert tuple(data.sampling.sampling_limits[1]) == (2, 16, 31)
    assert tuple(ref.sampling.sampling_limits[1]) == (0, 14, 29)  # raw limits for separate ref
