"""Latency from the last acquisition of a slice to its image, through the wire harness.

For each mode (execute: a fresh ``python -m gadgetron`` child per scan, as Gadgetron's ``<execute>`` does;
connect: a warm ``scoremri serve``) and preset (``sense``, ``fast``) one scan of ``--slices`` slices is sent
slice by slice: a slice's ReconData goes out (in Gadgetron, BucketToBuffer emits it when the slice's last
acquisition arrives) only after the previous image came back, and the time from the end of its sending
to its image is its latency. The first slice of an execute-mode scan also waits for the child's start and
model load (they overlap the scan in Gadgetron only if the scan is long enough). Prints a table.

    OMP_NUM_THREADS=1 python benchmarks/latency.py [--size 128] [--coils 8] [--slices 3] [--device cpu]
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from scoremri.gadget.testing import harness

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load import phantom  # noqa: E402  (same evaluation phantom as the load test)

log = logging.getLogger("latency")


def _paced(items, res: harness.HarnessResult, timeout: float = 1800.0):
    """Yield item i only after the image of item i-1 arrived (one image per slice)."""
    for i, it in enumerate(items):
        deadline = time.monotonic() + timeout
        while len(res.images) < i and not res.errors and time.monotonic() < deadline:
            time.sleep(0.002)
        if res.errors:
            return
        yield it


def _latencies(res: harness.HarnessResult) -> list[float]:
    return [r - s for s, r in zip(res.sent_at, res.received_at)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--coils", type=int, default=8)
    ap.add_argument("--slices", type=int, default=3)
    ap.add_argument("--accel", type=int, default=4)
    ap.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    ap.add_argument("--presets", default="sense,fast")
    ap.add_argument("--modes", default="execute,connect")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from scoremri.recon.simulation import birdcage_maps, simulate_kspace

    n, c = args.size, args.coils
    k = simulate_kspace(phantom(n), birdcage_maps(c, (n, n)), np.ones((n, n), bool), 1e-3,
                        np.random.default_rng(0))
    rows = np.union1d(np.arange(0, n, args.accel), np.arange(n // 2 - 12, n // 2 + 12))
    hdr = harness.header_xml(n, n, c, slices=args.slices, acceleration=args.accel)

    def items():
        return [harness.synthetic_recon_data(k, rows, slice_=s) for s in range(args.slices)]

    table = []
    presets = [p for p in args.presets.split(",") if p]
    modes = [m for m in args.modes.split(",") if m]
    for preset in presets:
        cfg = harness.config_xml(preset, args.device)
        if "execute" in modes:
            res = harness.HarnessResult()
            t0 = time.monotonic()
            harness.run_execute(cfg, hdr, _paced(items(), res), timeout=3600, result=res)
            table.append(("execute", preset, res, time.monotonic() - t0))
        if "connect" in modes:
            port = _free_port()
            logf = tempfile.TemporaryFile()
            proc = subprocess.Popen(
                [sys.executable, "-m", "scoremri.gadget.cli", "serve", "--port", str(port), "--device",
                 args.device, "--preset", preset], stdout=logf, stderr=subprocess.STDOUT, env=dict(os.environ))
            try:
                from scoremri.gadget.server import check_health

                t_start = time.monotonic()
                while True:
                    try:
                        check_health("127.0.0.1", port, 2.0)
                        break
                    except (OSError, ValueError):
                        if proc.poll() is not None or time.monotonic() - t_start > 600:
                            logf.seek(0)
                            print(logf.read().decode()[-3000:], file=sys.stderr)
                            raise RuntimeError("serve did not start")
                        time.sleep(0.2)
                warm_s = time.monotonic() - t_start
                # one scan to warm the caches that a first scan fills (allocator, kernels), then the measured one
                harness.run_connect("127.0.0.1", port, cfg, hdr, items()[:1], timeout=3600)
                res = harness.HarnessResult()
                t0 = time.monotonic()
                harness.run_connect("127.0.0.1", port, cfg, hdr, _paced(items(), res), timeout=3600, result=res)
                table.append((f"connect (serve up in {warm_s:.1f} s)", preset, res, time.monotonic() - t0))
            finally:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                logf.close()
    ok = True
    print(f"latency: last acquisition of a slice -> its image; {n}x{n}, {c} coils, R={args.accel}, "
          f"{args.slices} slices, device {args.device}")
    print("| mode | preset | images | first slice (s) | median other slices (s) | scan wall (s) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for mode, preset, res, wall in table:
        lat = _latencies(res)
        good = len(res.images) == args.slices and not res.errors
        ok &= good
        first = f"{lat[0]:.3f}" if lat else "-"
        rest = f"{float(np.median(lat[1:])):.3f}" if len(lat) > 1 else "-"
        print(f"| {mode} | {preset} | {len(res.images)}/{args.slices}{'' if good else ' ' + str(res.errors)} "
              f"| {first} | {rest} | {wall:.1f} |")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
