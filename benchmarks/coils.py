"""Coil-map and classical-reconstruction benchmark: ours (torch, CPU and CUDA when present) vs BART 0.8.

For 256^2 and 320^2 images, 8 and 16 birdcage coils, x4 random line mask with 24 ACS lines, noise sigma 0.005
(std of real and imaginary parts, image max 1): ESPIRiT time (ours CPU / GPU, BART ``ecalib -m1 -r 24``), SENSE
time (ours, 30 CG iterations, lam 0.01), and PSNR (ARCHITECTURE.md evaluation protocol, full image) of zero-filled,
SENSE (ours: our maps), BART ``pics -d0 -S -l2 -r 0.01`` and the best of ``pics -d0 -S -l1 -r {0.003,0.01,0.03}``
(both with BART's ecalib maps). Image: dipy's t1_coronal_slice (evaluation data), bilinearly resized for 320^2.

Usage: python benchmarks/coils.py [--quick] [--threads 1]. Prints one markdown table; progress via logging.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from scoremri.model.publish import dipy_slice  # noqa: E402
from scoremri.recon.classical import sense_recon  # noqa: E402
from scoremri.recon.coils import estimate_maps  # noqa: E402
from scoremri.recon.config import CoilConfig  # noqa: E402
from scoremri.recon.masks import make_mask  # noqa: E402
from scoremri.recon.metrics import evaluate  # noqa: E402
from scoremri.recon.operators import SenseOp  # noqa: E402
from scoremri.recon.simulation import birdcage_maps, complex_image, simulate_kspace  # noqa: E402

log = logging.getLogger("benchmarks.coils")


def load_slice(n: int) -> np.ndarray:
    """dipy t1_coronal_slice (256, 256) scaled to max 1, resized to (n, n) with torch bilinear interpolation."""
    img = dipy_slice()
    if img.shape != (n, n):
        t = torch.from_numpy(img)[None, None]
        img = torch.nn.functional.interpolate(t, size=(n, n), mode="bilinear", align_corners=False)[0, 0].numpy()
        img = np.clip(img, 0, None) / img.max()
    return img


def timed(fn, repeats: int = 1, sync: bool = False):
    best, out = float("inf"), None
    for _ in range(repeats):
        if sync:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if sync:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return out, best


def run_case(n: int, ncoils: int, lambdas: list[float], have_bart: bool, cuda: bool) -> dict[str, float | str]:
    rng = np.random.default_rng(0)
    gt = load_slice(n)
    S = birdcage_maps(ncoils, (n, n))
    mask = make_mask("random", (n, n), 4, acs=24, seed=0)
    k = simulate_kspace(complex_image(gt, rng), S, mask, 0.005, rng)
    kt, mt = torch.from_numpy(k), torch.from_numpy(mask)
    cfg = CoilConfig(method="espirit")
    (maps, _), t_esp = timed(lambda: estimate_maps(kt, mt, cfg), repeats=2)
    row: dict[str, float | str] = {"size": f"{n}^2", "coils": ncoils, "espirit_cpu_s": t_esp}
    if cuda:
        kc, mc = kt.cuda(), mt.cuda()
        estimate_maps(kc, mc, cfg)  # warm-up
        _, row["espirit_gpu_s"] = timed(lambda: estimate_maps(kc, mc, cfg), repeats=3, sync=True)
    zf = SenseOp(maps, mt).adjoint(kt)
    row["psnr_zf"] = evaluate(zf.numpy(), gt)["psnr"]
    (x, _), row["sense_cpu_s"] = timed(lambda: sense_recon(kt, mt, maps, lam=0.01, iters=30), repeats=2)
    row["psnr_sense"] = evaluate(x.numpy(), gt)["psnr"]
    if cuda:
        mg = maps.cuda()
        sense_recon(kc, mc, mg, lam=0.01, iters=30)
        _, row["sense_gpu_s"] = timed(lambda: sense_recon(kc, mc, mg, lam=0.01, iters=30), repeats=3, sync=True)
    if have_bart:
        from scoremri.gadget.testing import bart as B

        bmaps, row["ecalib_s"] = timed(lambda: B.ecalib(k, calib=24))
        xb, row["pics_sense_s"] = timed(lambda: B.pics_sense(k, bmaps))
        row["psnr_pics_sense"] = evaluate(xb, gt)["psnr"]
        best = (-np.inf, None)
        for lam in lambdas:
            p = evaluate(B.pics_l1(k, bmaps, lam), gt)["psnr"]
            best = max(best, (p, lam), key=lambda t: t[0])
        row["psnr_pics_l1"], row["l1_lambda"] = best
    log.info("done %s", row)
    return row


def main() -> int:
    from scoremri.gadget.threads import configure, parse_threads

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="256^2, 8 coils, one L1 lambda")
    ap.add_argument("--threads", type=parse_threads, default=1, metavar="N",
                    help="torch CPU threads (default 1, as BART here; auto: scoremri.gadget.threads)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args.threads = configure(args.threads).threads
    cuda = torch.cuda.is_available()
    have_bart = shutil.which("bart") is not None
    if not have_bart:
        log.warning("BART not found: BART columns are n/a")
    cases = [(256, 8)] if args.quick else [(256, 8), (256, 16), (320, 8), (320, 16)]
    lambdas = [0.01] if args.quick else [0.003, 0.01, 0.03]
    rows = [run_case(n, c, lambdas, have_bart, cuda) for n, c in cases]
    cols = [
        ("size", "size"), ("coils", "coils"), ("espirit_cpu_s", "ESPIRiT ours CPU s"),
        ("espirit_gpu_s", "ESPIRiT ours GPU s"), ("ecalib_s", "BART ecalib s"), ("sense_cpu_s", "SENSE ours CPU s"),
        ("sense_gpu_s", "SENSE ours GPU s"), ("pics_sense_s", "BART pics SENSE s"), ("psnr_zf", "PSNR zero-filled"),
        ("psnr_sense", "PSNR SENSE ours"), ("psnr_pics_sense", "PSNR BART SENSE"), ("psnr_pics_l1", "PSNR BART L1"),
        ("l1_lambda", "L1 lambda"),
    ]

    def fmt(v):
        if v is None:
            return "n/a"
        if isinstance(v, float):
            return f"{v:.3f}" if v < 10 else f"{v:.2f}"
        return str(v)

    print(f"threads: torch {args.threads}, BART OMP_NUM_THREADS=1; x4 random mask, 24 ACS, sigma 0.005; "
          f"device: CPU{' + ' + torch.cuda.get_device_name() if cuda else ''}")
    print("| " + " | ".join(h for _, h in cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(fmt(r.get(k)) for k, _ in cols) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
