"""Slices spread over several Gadgetron servers with Gadgetron's own ``<distributed>`` node
(``pipelines/scoremri_distributed.xml``): one front server (NoiseAdjust, AcquisitionDistributor on slice) and
two worker servers listed by GADGETRON_REMOTE_WORKER_COMMAND, all real, on this machine. The workers' logs
must show that each reconstructed a slice, and every slice must equal the single-server run of
``pipelines/scoremri.xml`` (pixels to 1e-4; slice, counters and geometry exact; image numbering may differ:
each worker numbers its own). Both XMLs run unmodified, so this is also the suite's ``fast`` sampler scan
through the real server (Gadgetron 4.7 drops the <external> configuration on its way to a worker, so workers
run the defaults -- which the shipped XMLs state explicitly)."""
from __future__ import annotations

import json
import re

import pytest

import real_gadgetron as rg
from scoremri.gadget.files.rawfile import read_images
from scoremri.gadget.testing.gadgetron_server import GadgetronServer, run_client, wait_for

pytestmark = [pytest.mark.gadgetron, pytest.mark.slow]


def _slices_done(log: str) -> set[int]:
    return {int(m) for m in re.findall(r"image sent: slice (\d+)", log)}


def test_slices_spread_over_two_workers_equal_a_single_server(gadgetron, dipy_t1, tmp_path):
    raw = tmp_path / "t1_2slices.h5"
    rg.simulated(raw, rg.mags(dipy_t1, 64, 2))
    one = tmp_path / "single"
    one.mkdir()
    with GadgetronServer(one, gadgetron) as srv:
        res = run_client(srv.port, raw, one / "out.h5", xml=rg.PIPELINES / "scoremri.xml", group="g", timeout=300,
                         install=gadgetron)
        wait_for(lambda: not srv.python_children(), 15)
    assert res.returncode == 0 and not res.timed_out, srv.log()[-3000:]
    single = read_images(one / "out.h5", "g")[1]

    d = tmp_path / "distributed"
    d.mkdir()
    workers = [GadgetronServer(d, gadgetron, name=f"worker{i}").start() for i in (1, 2)]
    try:
        # Gadgetron runs the command without a shell: one argument, its inner quotes escaped
        peers = json.dumps(json.dumps([f"127.0.0.1:{w.port}" for w in workers]))
        with GadgetronServer(d, gadgetron, name="front", worker_command=f"echo {peers}") as front:
            res = run_client(front.port, raw, d / "out.h5", xml=rg.PIPELINES / "scoremri_distributed.xml",
                             group="g", timeout=300, install=gadgetron)
            for s in [front, *workers]:
                wait_for(lambda: not s.python_children(), 15)
            front_log = front.log()
    finally:
        for w in workers:
            w.stop()
    logs = [w.log() for w in workers]
    assert res.returncode == 0 and not res.timed_out, front_log[-2000:] + "".join(x[-2000:] for x in logs)
    assert front_log.count("Connecting to peer: 127.0.0.1:") == 2, front_log[-3000:]
    assert "image sent" not in front_log  # the front reconstructed nothing itself
    done = [_slices_done(x) for x in logs]
    assert done[0] and done[1], f"each worker must reconstruct a slice: {done}"
    assert done[0] | done[1] == {0, 1} and not done[0] & done[1], done
    assert all("'method': 'fast'" in x for x in logs)  # the scan reports: the defaults ran
    assert not any(w.leftover for w in workers) and not front.leftover

    spread = read_images(d / "out.h5", "g")[1]
    rg.assert_images_equal(spread, single, skip=("image_index",))
    assert all(im.meta["GADGETRON_ImageComment"].count("sampler fast") == 1 for im in spread)
