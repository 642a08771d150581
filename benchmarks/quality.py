"""Image quality and speed of every reconstruction method on the visible evaluation data; prints one table.

Data (evaluation only, never used for training): dipy ``t1_coronal_slice.npy`` (256x256), nibabel
``example4d.nii.gz`` slices (128x96), a Shepp-Logan phantom (``bart phantom``, 256x256) and the RSS image of
an ``ismrmrd_generate_cartesian_shepp_logan`` file (noise-free, 256x256). Each magnitude image (max 1) gets
a smooth random phase, C birdcage coils, a 1-D random mask with 24 ACS lines (12 for the 128-line
example4d slices: 24 do not fit x8, and BART ecalib returns all-zero maps from <= 10 lines) at x4 and x8, and complex noise sigma 0.005 per part (``recon.simulation``).

Methods, all through ``scoremri.recon.api.reconstruct`` with the same ESPIRiT maps (ours, from the ACS) --
except BART, which runs the exact command lines of DESIGN.md section 4 with its own ``ecalib -m1 -r 24`` maps:
zero_filled, sense, bart_l1 (best of lambda 0.003/0.01/0.03 by PSNR), pc (N stated; 2000 on GPU), fast
(preset ``fast``), fast K=8 (preset ``uncertainty``: mean of 8 samples + Pearson correlation r of the std
map with the actual error |mean - gt| after the metric's scale, over the image and the foreground).

Metrics: ``recon.metrics.evaluate`` (one least-squares scale on magnitude, both divided by max|gt|).

    OMP_NUM_THREADS=1 python benchmarks/quality.py --quick            # CPU, about 10 minutes
    python benchmarks/quality.py --device cuda --pc-steps 2000         # GPU, the full table (in chunks:
    python benchmarks/quality.py --device cuda --data t1 --coils 16 ...  #   --data/--coils/--accel select)
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from scoremri.model.publish import dipy_slice  # noqa: E402
from scoremri.recon.api import reconstruct  # noqa: E402
from scoremri.recon.config import load_config  # noqa: E402
from scoremri.recon.masks import make_mask, true_acceleration  # noqa: E402
from scoremri.recon.metrics import evaluate, foreground_mask, scale_to  # noqa: E402
from scoremri.recon.simulation import birdcage_maps, complex_image, simulate_kspace  # noqa: E402

log = logging.getLogger("benchmarks.quality")

REFERENCE = [  # DESIGN.md section 5 (H100, official code, measured)
    ("official NCSN++ forward 320x320 (H100)", "63 ms"),
    ("official complex single-coil PC, N=2000 (H100)", "392 s/slice"),
    ("official 15-coil hybrid, N=2000 (H100)", "94 min/slice"),
    ("official NCSN++ forward on a 2-core CPU", "10.95 s -> ~24 h per complex slice at N=2000"),
    ("trial 16M U-Net + DDS, 50-100 NFE (H100)", "~+1.4 dB over BART pics at x4 (held-out brain), level at x8; 0.3-2.6 s"),
]


SMALL_ACS = 12  # ACS lines for matrices below 192 lines (BART ecalib returns all-zero maps with <= 10)


@dataclass
class Case:
    name: str
    gt: np.ndarray  # (ny, nx) complex64, max |gt| = 1


# ------------------------------------------------------------------------------------------------ data
def _norm(mag: np.ndarray) -> np.ndarray:
    mag = np.abs(np.asarray(mag, dtype=np.float64))
    return (mag / mag.max()).astype(np.float32)


def load_example4d(slices: list[int]) -> list[tuple[str, np.ndarray]]:
    import nibabel

    p = Path(nibabel.__file__).parent / "tests" / "data" / "example4d.nii.gz"
    vol = np.asarray(nibabel.load(p).get_fdata())
    return [(f"ex4d_z{z}", _norm(np.ascontiguousarray(vol[:, :, z, 0]))) for z in slices]  # (128, 96)


def load_bart_phantom(n: int = 256) -> np.ndarray | None:
    if not shutil.which("bart"):
        return None
    from scoremri.gadget.testing.bart import bart

    return _norm(np.squeeze(bart(f"phantom -x {n}")))


def load_ismrmrd_phantom(n: int = 256) -> np.ndarray | None:
    exe = shutil.which("ismrmrd_generate_cartesian_shepp_logan")
    if not exe:
        return None
    import ismrmrd

    from scoremri.recon.fft import ifft2c

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "sl.h5")
        subprocess.run([exe, "-m", str(n), "-c", "8", "-O", "1", "-n", "0", "-o", out], check=True,
                       capture_output=True, cwd=tmp)
        ds = ismrmrd.Dataset(out, "dataset", create_if_needed=False)
        n_acq = ds.number_of_acquisitions()
        first = ds.read_acquisition(0)
        c, nx = first.data.shape
        k = np.zeros((c, n, nx), np.complex64)
        for i in range(n_acq):
            a = ds.read_acquisition(i)
            k[:, a.idx.kspace_encode_step_1, :] = a.data
        ds.close()
    img = ifft2c(torch.from_numpy(k)).abs().pow(2).sum(0).sqrt().numpy()
    return _norm(img)


def cases(which: list[str], seed: int = 0) -> list[Case]:
    rng = np.random.default_rng(seed)
    mags: list[tuple[str, np.ndarray]] = []
    if "t1" in which:
        mags.append(("dipy_t1", dipy_slice()))
    if "ex4d" in which:
        mags += load_example4d([10] if "ex4d1" in which else [10, 14])
    if "phantom" in which:
        p = load_bart_phantom()
        if p is None:
            log.warning("bart not installed: Shepp-Logan phantom row skipped")
        else:
            mags.append(("bart_phantom", p))
    if "ismrmrd" in which:
        p = load_ismrmrd_phantom()
        if p is None:
            log.warning("ismrmrd-tools not installed: ismrmrd Shepp-Logan row skipped")
        else:
            mags.append(("ismrmrd_sl", p))
    return [Case(name, complex_image(m, rng)) for name, m in mags]


# --------------------------------------------------------------------------------------------- methods
def bart_l1_best(k: np.ndarray, gt: np.ndarray, fg: np.ndarray, acs: int) -> tuple[np.ndarray, float, float]:
    """BART ecalib -m1 -r ACS maps (24 for 256 lines; the ACS width for small matrices), pics -d0 -S -l1 -r
    LAMBDA for LAMBDA in {0.003, 0.01, 0.03}: the best by PSNR -> (image, lambda, seconds incl. ecalib)."""
    from scoremri.gadget.testing.bart import ecalib, pics_l1

    t0 = time.perf_counter()
    maps = ecalib(k, calib=acs)
    t_cal = time.perf_counter() - t0
    best = (None, 0.0, 0.0, -np.inf)
    for lam in (0.003, 0.01, 0.03):
        t1 = time.perf_counter()
        x = pics_l1(k, maps, lam)
        dt = time.perf_counter() - t1 + t_cal
        p = evaluate(x, gt, fg)["psnr"]
        if p > best[3]:
            best = (x, lam, dt, p)
    return best[0], best[1], best[2]


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel() - a.mean(), b.ravel() - b.mean()
    return float((a @ b) / max(np.sqrt((a @ a) * (b @ b)), 1e-30))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="CPU subset: t1, one ex4d slice, phantom; 8 coils; x4/x8; pc (N=50) and K=8 on ex4d only")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--data", nargs="+", default=["t1", "ex4d", "phantom", "ismrmrd"])
    ap.add_argument("--coils", nargs="+", type=int, default=[8, 16])
    ap.add_argument("--accel", nargs="+", type=float, default=[4.0, 8.0])
    ap.add_argument("--methods", nargs="+", default=["zero_filled", "sense", "bart_l1", "pc", "fast", "fast_k8"])
    ap.add_argument("--pc-steps", type=int, default=2000, help="pc levels N (2000 = the paper)")
    ap.add_argument("--pc-on", default="", help="run pc only on rows whose label contains this text")
    ap.add_argument("--k8-on", default="", help="run fast K=8 only on rows whose label contains this text")
    ap.add_argument("--sigma", type=float, default=0.005)
    ap.add_argument("--set", action="append", default=[], help="override for the learned methods, e.g. model.path=... or sampler.steps=30 (fast)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.quick:
        args.data = [d for d in args.data if d in ("t1", "ex4d", "phantom")] + ["ex4d1"]
        args.coils = [8]
        if args.pc_steps == 2000:
            args.pc_steps = 50
        args.pc_on = args.pc_on or "ex4d_z10"
        args.k8_on = args.k8_on or "ex4d_z10"
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from scoremri.recon.config import parse_overrides

    over = parse_overrides(args.set)
    from scoremri.recon.coils import estimate_maps

    rows: list[tuple] = []
    for case in cases(args.data, args.seed):
        gt = case.gt
        fg = foreground_mask(gt)
        ny, nx = gt.shape
        for ncoil in args.coils:
            smaps = birdcage_maps(ncoil, gt.shape)
            for accel in args.accel:
                acs = 24 if ny >= 192 else SMALL_ACS
                mask = make_mask("random", gt.shape, accel, acs=acs, seed=args.seed)
                rng = np.random.default_rng(args.seed + 1)
                k = simulate_kspace(gt, smaps, mask, args.sigma, rng)
                r_true = true_acceleration(mask)
                cfg_c = load_config("sense")
                t0 = time.perf_counter()
                maps, _ = estimate_maps(torch.from_numpy(k), torch.from_numpy(mask.astype(np.float32)), cfg_c.coils)
                t_maps = time.perf_counter() - t0
                maps = maps.numpy()
                label = f"{case.name} {ny}x{nx} C{ncoil} x{r_true:.1f}"
                for meth in args.methods:
                    extra = ""
                    if meth == "pc" and args.pc_on not in label:
                        continue
                    if meth == "fast_k8" and args.k8_on not in label:
                        continue
                    t0 = time.perf_counter()
                    if meth == "bart_l1":
                        if not shutil.which("bart"):
                            continue
                        img, lam, dt = bart_l1_best(k, gt, fg, acs)
                        extra = f"lam={lam}"
                        std = None
                    else:
                        if meth == "pc":
                            cfg = load_config("paper", {**over, "sampler.steps": args.pc_steps})
                        elif meth == "fast":
                            cfg = load_config("fast", over)
                        elif meth == "fast_k8":
                            cfg = load_config("uncertainty", over)
                        else:
                            cfg = load_config(meth)
                        res = reconstruct(k, mask, cfg, maps=maps, device=args.device, seed=args.seed)
                        dt = time.perf_counter() - t0 + t_maps
                        img, std = res.image, res.std
                        rep = res.report
                        if meth in ("pc", "fast", "fast_k8"):
                            extra = f"nfe={rep['nfe']}"
                            if meth == "fast" or meth == "fast_k8":
                                extra += f" {rep['start']}@{rep['start_sigma']:.3g}"
                            if meth == "pc":
                                extra += f" N={rep['steps']}"
                    m = evaluate(img, gt, fg)
                    if std is not None:
                        xs, gs, a = scale_to(img, gt)
                        err = np.abs(xs - gs)
                        sd = a * std / np.abs(gt).max()
                        extra += f" r(std,err)={pearson(err, sd):.2f} (fg {pearson(err[fg], sd[fg]):.2f})"
                    rows.append((label, meth, m["psnr"], m["ssim"], m["psnr_fg"], m["ssim_fg"], dt, extra))
                    print(f"{label:34s} {meth:12s} {m['psnr']:6.2f} {m['ssim']:.3f} {m['psnr_fg']:6.2f} "
                          f"{m['ssim_fg']:.3f} {dt:8.2f}  {extra}", file=sys.stderr, flush=True)
    dev = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\n# scoremri quality benchmark  device: {dev}  sigma={args.sigma}  pc N={args.pc_steps}"
          f"  masks: 1-D random, 24 ACS lines (ny >= 192; else {SMALL_ACS})")
    print(f"| {'case':34s} | {'method':11s} | PSNR  | SSIM  | PSNR fg | SSIM fg | s/slice | notes")
    print(f"|{'-' * 36}|{'-' * 13}|-------|-------|---------|---------|---------|------")
    for label, meth, p, s, pf, sf, dt, extra in rows:
        print(f"| {label:34s} | {meth:11s} | {p:5.2f} | {s:.3f} | {pf:7.2f} | {sf:.3f} | {dt:7.2f} | {extra}")
    print("\n# reference numbers (DESIGN.md section 5)")
    for what, val in REFERENCE:
        print(f"| {what:48s} | {val}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
