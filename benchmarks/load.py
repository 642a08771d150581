"""Load test: N slices (default 100) through the wire harness against a real ``python -m gadgetron`` child
with the ``sense`` preset, 20 slice locations x 5 repetitions. Checks every image arrives, reports the
child's peak RSS and its RSS after the first repetition vs at the end (bounded: no growth once the coil
maps of every location are cached). Prints a table; exit code 1 when an image is missing or
RSS grows by more than ``--max-growth-mb``.

    OMP_NUM_THREADS=1 python benchmarks/load.py [--slices 100] [--size 128] [--coils 8]
"""
from __future__ import annotations

import argparse
import logging
import sys
import time

import numpy as np

from scoremri.gadget.testing import harness

log = logging.getLogger("load")


def phantom(n: int) -> np.ndarray:
    """dipy's t1_coronal_slice resampled to (n, n) by k-space cropping/padding, magnitude in [0, 1]."""
    import torch

    from scoremri.model.publish import dipy_slice
    from scoremri.recon.fft import fft2c, ifft2c

    img = dipy_slice()
    k = fft2c(torch.from_numpy(img.astype(np.complex64))).numpy()
    out = np.zeros((n, n), np.complex64)
    ny, nx = k.shape
    sy, sx = min(n, ny), min(n, nx)
    out[n // 2 - sy // 2 : n // 2 - sy // 2 + sy, n // 2 - sx // 2 : n // 2 - sx // 2 + sx] = k[
        ny // 2 - sy // 2 : ny // 2 - sy // 2 + sy, nx // 2 - sx // 2 : nx // 2 - sx // 2 + sx
    ]
    m = np.abs(ifft2c(torch.from_numpy(out)).numpy())
    return (m / m.max()).astype(np.float32)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slices", type=int, default=100)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--coils", type=int, default=8)
    ap.add_argument("--preset", default="sense")
    ap.add_argument("--locations", type=int, default=20, help="slice locations (coil maps cached per location)")
    ap.add_argument("--warmup", type=int, default=0,
                    help="slices after which RSS is the baseline (default: one repetition = --locations)")
    ap.add_argument("--max-growth-mb", type=float, default=50.0)
    ap.add_argument("--threads", default="auto", metavar="N", help="the gadget's threads property (default auto)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from scoremri.recon.simulation import birdcage_maps, simulate_kspace

    n, c = args.size, args.coils
    rng = np.random.default_rng(0)
    k = simulate_kspace(phantom(n), birdcage_maps(c, (n, n)), np.ones((n, n), bool), 1e-3, rng)
    rows = np.union1d(np.arange(0, n, 3), np.arange(n // 2 - 12, n // 2 + 12))
    nslices = args.slices
    nloc = args.locations

    def items():
        for s in range(nslices):
            yield harness.synthetic_recon_data(k, rows, slice_=s % nloc, repetition=s // nloc)

    hdr = harness.header_xml(n, n, c, slices=nloc, repetitions=nslices // nloc + 1, acceleration=3)
    t0 = time.monotonic()
    res = harness.run_execute(harness.config_xml(args.preset, "cpu", threads=args.threads), hdr, items(), timeout=3000, sample_rss=True)
    wall = time.monotonic() - t0
    ok = len(res.images) == nslices and not res.errors and res.closed and res.exit_code == 0

    def rss_at(t: float) -> int:
        before = [kb for (ts, kb) in res.rss_samples_kb if ts <= t]
        return before[-1] if before else 0

    w = min(args.warmup or nloc, len(res.received_at)) - 1
    base = rss_at(res.received_at[w]) if w >= 0 else 0
    mid = rss_at(res.received_at[len(res.received_at) // 2]) if res.received_at else 0
    end = rss_at(res.received_at[-1]) if res.received_at else 0
    growth_mb = (end - base) / 1024.0
    per_slice = np.diff(np.asarray(res.received_at)) if len(res.received_at) > 1 else np.zeros(1)
    rows_out = [
        ("slices sent / images received", f"{nslices} / {len(res.images)}"),
        ("errors", str(len(res.errors))),
        ("CLOSE received, child exit code", f"{res.closed}, {res.exit_code}"),
        ("matrix, coils, preset", f"{n}x{n}, {c}, {args.preset}"),
        ("wall time (s)", f"{wall:.1f}"),
        ("median s per slice (steady state)", f"{float(np.median(per_slice)):.3f}"),
        ("child peak RSS VmHWM (MB)", f"{(res.peak_rss_kb or 0) / 1024:.1f}"),
        (f"child RSS after slice {w + 1} (MB)", f"{base / 1024:.1f}"),
        (f"child RSS after slice {len(res.received_at) // 2} (MB)", f"{mid / 1024:.1f}"),
        (f"child RSS after slice {len(res.received_at)} (MB)", f"{end / 1024:.1f}"),
        ("growth after warm-up (MB)", f"{growth_mb:+.1f} (bound {args.max_growth_mb:g})"),
    ]
    width = max(len(a) for a, _ in rows_out)
    print(f"| {'quantity':<{width}} | value |")
    print(f"| {'-' * width} | ----- |")
    for a, b in rows_out:
        print(f"| {a:<{width}} | {b} |")
    if not ok:
        print("FAILED: missing images or errors", res.errors, file=sys.stderr)
        return 1
    if growth_mb > args.max_growth_mb:
        print(f"FAILED: RSS grew by {growth_mb:.1f} MB after warm-up", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
