"""Gadgetron's own generic GRAPPA chain (Generic_Cartesian_Grappa_Complex.xml, what sites run today) through
the real server on simulated files: with ``--mask grappa`` (an R-grid plus ACS, off-grid ACS lines flagged
calibration only) it beats zero-filled clearly; the fractional ``equispaced`` pattern (every ACS line
calibration-and-imaging) is what made it blur and stretch below zero-filled (issue 16). The table over the
visible cases is benchmarks/grappa.py."""
from __future__ import annotations

import numpy as np
import pytest

import real_gadgetron as rg
from scoremri.gadget.files.rawfile import read_images
from scoremri.gadget.files.replay import replay
from scoremri.gadget.files.simulate import read_ground_truth, simulate, write_raw
from scoremri.gadget.testing.gadgetron_server import GadgetronServer, run_client
from scoremri.gadget.testing.grappa import GENERIC_CHAIN, run_generic_grappa
from scoremri.recon.metrics import evaluate

pytestmark = pytest.mark.gadgetron


def test_generic_grappa_chain_on_a_grappa_pattern_file(gadgetron, dipy_t1, tmp_path):
    mag = rg.mags(dipy_t1, 128, 1)[0]
    with GadgetronServer(tmp_path / "srv", gadgetron) as srv:
        run = run_generic_grappa(mag, tmp_path, name="t1", coils=8, accel=3, acs=24, server=srv)
        old = simulate(mag[None], coils=8, accel=3.0, mask_kind="equispaced", acs=24, sigma=0.0, seed=0)
        write_raw(tmp_path / "equispaced.h5", old)
        res = run_client(srv.port, tmp_path / "equispaced.h5", tmp_path / "eq_out.h5", config_name=GENERIC_CHAIN,
                         group="g", install=gadgetron)
    assert res.returncode == 0
    replay(run.raw, tmp_path / "zf.h5", preset="zero_filled", device="cpu", progress=False)
    zf = evaluate(read_images(tmp_path / "zf.h5")[1][0].data[0, 0], run.gt)
    eq = evaluate(read_images(tmp_path / "eq_out.h5", "g")[1][0].data[0, 0],
                  read_ground_truth(tmp_path / "equispaced.h5")[0][0])
    assert run.image.shape == (128, 128) and np.isfinite(run.image).all()
    # measured on this machine: GRAPPA 41.4 dB, zero-filled 31.5 dB, the equispaced file through GRAPPA 29.8 dB
    assert run.metrics["psnr"] > zf["psnr"] + 6, (run.metrics, zf)
    assert run.metrics["psnr_fg"] > zf["psnr_fg"] + 6
    assert eq["psnr"] < run.metrics["psnr"] - 8, eq
