"""What sites run today: Gadgetron's own ``Generic_Cartesian_Grappa_Complex.xml`` through the real Gadgetron
4.7 server on the visible evaluation cases, beside zero-filled and SENSE of the same files; prints one table.

Each case (the magnitude images of benchmarks/cases.py: dipy ``t1_coronal_slice.npy``, nibabel
``example4d.nii.gz`` slices, the BART and ISMRMRD Shepp-Logan phantoms) becomes a noise-free raw file as a
scanner acquires it for GRAPPA (``scoremri simulate --mask grappa``: every R-th line through the centre +
24 ACS lines, 12 below 192 lines; C birdcage coils; 2x readout oversampling), goes through the chain
(``gadget.testing.grappa.run_generic_grappa``) and through ``scoremri replay`` (zero_filled, sense presets) and
is scored against the file's ground truth by ``recon.metrics.evaluate`` (one least-squares magnitude scale,
both divided by max |gt|; full image and foreground), the metric of benchmarks/sample.py and quality.py.

    OMP_NUM_THREADS=1 python benchmarks/grappa.py            # t1, ex4d_z10, both phantoms; R 2/4/8; 8 coils
    python benchmarks/grappa.py --no-compression                       # diagnostic: the chain keeping all coils
    python benchmarks/grappa.py --data t1 --accel 4 --coils 8 16 --png out/grappa   # PNG: gt | GRAPPA | 5x error
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cases import cases  # noqa: E402  (dipy, example4d, Shepp-Logan phantoms)

from scoremri.gadget.files.rawfile import read_images  # noqa: E402
from scoremri.gadget.files.replay import replay  # noqa: E402
from scoremri.gadget.testing.gadgetron_server import GadgetronServer, find_gadgetron  # noqa: E402
from scoremri.gadget.testing.grappa import (  # noqa: E402
    GENERIC_CHAIN,
    chain_without_coil_compression,
    run_generic_grappa,
)
from scoremri.recon.metrics import evaluate, scale_to  # noqa: E402


def _png(path: Path, gt: np.ndarray, x: np.ndarray) -> None:
    from PIL import Image

    xs, gs, _ = scale_to(x, gt)
    xs, gs = np.abs(xs), np.abs(gs)
    row = np.concatenate([gs, xs, np.clip(5 * np.abs(xs - gs), 0, 1)], axis=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.clip(row, 0, 1) * 255).astype(np.uint8)).save(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", nargs="+", default=["t1", "ex4d", "ex4d1", "phantom", "ismrmrd"],
                    help="cases (benchmarks/cases.py): t1 ex4d [ex4d1 = one slice] phantom ismrmrd")
    ap.add_argument("--coils", nargs="+", type=int, default=[8])
    ap.add_argument("--accel", nargs="+", type=int, default=[2, 4, 8], help="GRAPPA reduction factors R")
    ap.add_argument("--acs", type=int, default=None, help="ACS lines (default as quality.py: 24, 12 below 192 lines)")
    ap.add_argument("--sigma", type=float, default=0.0, help="noise std per real/imag part (no noise scan written)")
    ap.add_argument("--chain", default=GENERIC_CHAIN, help="Gadgetron config name or XML path")
    ap.add_argument("--no-compression", action="store_true",
                    help="diagnostic: the chain with its coil compression off (KLT threshold -1), not what sites run")
    ap.add_argument("--png", default=None, metavar="DIR", help="write gt | GRAPPA | 5x error PNGs here")
    ap.add_argument("--workdir", default=None, help="keep raw files and outputs here (default: a temp folder)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("scoremri.gadget.gadgetron.preprocess").setLevel(logging.ERROR)  # no noise scans: known
    install = find_gadgetron()
    tmp = tempfile.TemporaryDirectory() if args.workdir is None else None
    work = Path(args.workdir or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    if args.no_compression:
        args.chain = str(chain_without_coil_compression(work / "grappa_all_coils.xml", install, args.chain))
    head = (f"{'case':<14}{'coils':>6}{'R':>3}{'x true':>7} | {'GRAPPA PSNR':>11}{'SSIM':>7}{'PSNR fg':>8}{'SSIM fg':>8}"
            f"{'s':>6} | {'ZF PSNR':>8}{'fg':>7} | {'SENSE PSNR':>10}{'fg':>7}")
    print(f"\n# Gadgetron {Path(args.chain).name} (real server, {install.source}) vs replay zero_filled / sense; "
          f"sigma={args.sigma}; metric: recon.metrics.evaluate")
    print(head)
    print("-" * len(head))
    with GadgetronServer(work / "gadgetron", install) as srv:
        for case in cases(args.data, args.seed):
            mag = np.abs(case.gt)
            ny = mag.shape[0]
            acs = args.acs if args.acs is not None else (24 if ny >= 192 else 12)
            for ncoil in args.coils:
                for r in args.accel:
                    try:
                        run = run_generic_grappa(mag, work, name=case.name, coils=ncoil, accel=r, acs=acs,
                                                 sigma=args.sigma, seed=args.seed, chain=args.chain, server=srv)
                    except RuntimeError as e:
                        print(f"{case.name:<14}{ncoil:>6}{r:>3}{'':>7} | the chain failed: {str(e).split('; ', 1)[-1]}")
                        continue
                    other = {}
                    for preset in ("zero_filled", "sense"):
                        out = work / f"{run.raw.stem}_{preset}.h5"
                        out.unlink(missing_ok=True)
                        replay(run.raw, out, preset=preset, device="cpu", progress=False)
                        other[preset] = evaluate(read_images(out)[1][0].data[0, 0], run.gt)
                    m, z, s = run.metrics, other["zero_filled"], other["sense"]
                    print(f"{case.name:<14}{ncoil:>6}{r:>3}{run.true_accel:>7.2f} | {m['psnr']:>11.2f}"
                          f"{m['ssim']:>7.3f}{m['psnr_fg']:>8.2f}{m['ssim_fg']:>8.3f}{run.seconds:>6.1f} | "
                          f"{z['psnr']:>8.2f}{z['psnr_fg']:>7.2f} | {s['psnr']:>10.2f}{s['psnr_fg']:>7.2f}", flush=True)
                    if args.png:
                        _png(Path(args.png) / f"{case.name}_c{ncoil}_R{r}.png", run.gt, run.image)
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
