"""The shipped chains through the real Gadgetron 4.7 server and client, as a site runs them: each test starts
its own server (free port, own -W folder, -d true) and stops it by PID. Images must equal ``scoremri replay``
of the same file at the same thread count (max relative difference <= 1e-4), headers must pass Gadgetron's
integration-test rules (counters, image_type, image_index, matrix exact; geometry to 1e-6), labels present,
and no ``python -m gadgetron`` child may be left running."""
from __future__ import annotations

import subprocess

import numpy as np
import pytest

import real_gadgetron as rg
from scoremri.gadget.files.rawfile import read_images
from scoremri.gadget.testing.gadgetron_server import GadgetronServer, ServeProcess, run_client, wait_for

pytestmark = pytest.mark.gadgetron


@pytest.fixture(scope="module")
def raw3(tmp_path_factory, dipy_t1):
    """3 distinct slices 64x64, 4 coils, random x3 with 16 ACS lines, 2x readout oversampling, noise-free."""
    path = tmp_path_factory.mktemp("chains") / "t1_3slices.h5"
    rg.simulated(path, rg.mags(dipy_t1, 64, 3))
    return path


@pytest.fixture(scope="module")
def generator_raw(tmp_path_factory, gadgetron):
    """ISMRMRD 1.14's own generator (the one beside the server): Shepp-Logan, 4 coils, R=2, 16 ACS lines."""
    path = tmp_path_factory.mktemp("chains") / "shepp_logan.h5"
    subprocess.run([str(gadgetron.tool("ismrmrd_generate_cartesian_shepp_logan")), "-m", "64", "-c", "4", "-a",
                    "2", "-w", "16", "-n", "0", "-o", str(path)], check=True, capture_output=True, timeout=60,
                   env=gadgetron.env())
    return path


@pytest.fixture(scope="module")
def replayed(tmp_path_factory, raw3, generator_raw):
    """``scoremri replay`` of both files with the sense variant of scoremri.xml (the buffering properties and
    the <external> configuration are the same in every variant used here: one reference per file)."""
    d = tmp_path_factory.mktemp("replay")
    xml = rg.variant("scoremri.xml", d / "chain.xml")
    return {raw3: rg.replay(raw3, d / "raw3.h5", xml)[1], generator_raw: rg.replay(generator_raw, d / "gen.h5", xml)[1]}


def _run(gadgetron, tmp_path, raw, xml, *, timeout=120):
    with GadgetronServer(tmp_path, gadgetron) as srv:
        res = run_client(srv.port, raw, tmp_path / "out.h5", xml=xml, group="g", timeout=timeout, install=gadgetron)
        wait_for(lambda: not srv.python_children(), 15)
        left = srv.python_children()
    assert not res.timed_out and res.returncode == 0, res.output[-2000:] + srv.log()[-3000:]
    assert left == [], f"python -m gadgetron children still running after the scan: {left}"
    assert "ERROR" not in res.output, res.output[-2000:]
    return read_images(tmp_path / "out.h5", "g"), srv


def test_execute_chain_equals_replay(gadgetron, raw3, replayed, tmp_path):
    xml = rg.variant("scoremri.xml", tmp_path / "chain.xml")
    got, srv = _run(gadgetron, tmp_path, raw3, xml)
    assert list(got) == [1] and len(got[1]) == 3
    rg.assert_images_equal(got[1], replayed[raw3])
    assert [im.image_index for im in sorted(got[1], key=lambda i: i.slice)] == [1, 2, 3]
    assert all(im.image_type == 5 and im.data.dtype == np.complex64 for im in got[1])
    assert srv.log().count("image sent: slice") == 3


def test_generator_file_equals_replay(gadgetron, generator_raw, replayed, tmp_path):
    xml = rg.variant("scoremri.xml", tmp_path / "chain.xml")
    got, _ = _run(gadgetron, tmp_path, generator_raw, xml)
    assert len(got[1]) == 2  # R=2 interleaved calibration: the generator writes 2 repetitions
    rg.assert_images_equal(got[1], replayed[generator_raw])


def test_magnitude_chain_is_autoscaled_ushort_of_replay(gadgetron, raw3, generator_raw, replayed, tmp_path):
    """ComplexToFloat -> AutoScale -> FloatToUShort after our gadget: magnitude ushort images a scanner
    database takes, equal (to one count) to the same steps applied to replay's complex images."""
    xml = rg.variant("scoremri_magnitude.xml", tmp_path / "chain.xml")
    for i, raw in enumerate((raw3, generator_raw)):
        d = tmp_path / f"scan{i}"
        d.mkdir()
        got, _ = _run(gadgetron, d, raw, xml)
        rg.assert_images_equal(got[1], replayed[raw], skip=("data_type", "image_type"), pixels=False)
        refs = rg.by_slice(replayed[raw])
        for im in got[1]:
            assert im.image_type == 1 and im.data.dtype == np.uint16  # magnitude, ushort
            expect = rg.autoscale_ushort(np.abs(refs[rg.key(im)].data))
            diff = np.abs(im.data.astype(np.int64) - expect.astype(np.int64))
            assert diff.max() <= 1, f"{rg.key(im)}: {diff.max()} counts"
            assert 1500 < im.data.max() <= 4095


def test_connect_chain_two_scans_on_one_serve(gadgetron, raw3, generator_raw, replayed, tmp_path):
    """scoremri_connect.xml with one `scoremri serve`: two scans in a row, each equal to replay."""
    with ServeProcess("--preset", "sense") as serve:
        xml = rg.variant("scoremri_connect.xml", tmp_path / "chain.xml", connect_port=serve.port)
        for i, raw in enumerate((raw3, generator_raw)):
            d = tmp_path / f"scan{i}"
            d.mkdir()
            got, _ = _run(gadgetron, d, raw, xml)
            rg.assert_images_equal(got[1], replayed[raw])
        health = serve.health()
        log = serve.text()
    assert health["scans_done"] == 2 and health["model_loads"] == 0, health
    assert log.count("image sent: slice") == 3 + 2, log[-3000:]  # the generator's R=2 file: 2 repetitions
