"""Score a replayed image file against the ground truth stored in its simulated raw file.

    python benchmarks/sample.py out/t1_coronal_x4_recon.h5 [--raw examples/t1_coronal_x4.h5]

Prints PSNR / SSIM / NMSE (full image and foreground) per image of series 1, after the one least-squares
magnitude scale of recon.metrics (ARCHITECTURE.md, "Conventions").
"""
from __future__ import annotations

import argparse

import h5py
import ismrmrd
import numpy as np

from scoremri.recon.metrics import evaluate, foreground_mask


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("images", help="ISMRMRD image file written by replay / gadgetron_ismrmrd_client")
    ap.add_argument("--raw", default="examples/t1_coronal_x4.h5", help="simulated raw file with /dataset/phantom")
    ap.add_argument("-G", "--group", default="dataset")
    args = ap.parse_args()
    with h5py.File(args.raw, "r") as f:
        ph = f["dataset/phantom"][()]
    gt_all = ph["real"] + 1j * ph["imag"] if ph.dtype.names else ph
    ds = ismrmrd.Dataset(args.images, args.group, False)
    n = ds.number_of_images("image_1")
    print(f"{'image':>5} {'PSNR':>7} {'SSIM':>6} {'NMSE':>8} {'PSNR fg':>8} {'SSIM fg':>8}")
    for i in range(n):
        im = ds.read_image("image_1", i)
        gt = gt_all[min(im.slice, len(gt_all) - 1)]
        m = evaluate(im.data[0, 0], gt, foreground_mask(np.abs(gt)))
        print(f"{i:>5} {m['psnr']:7.2f} {m['ssim']:6.3f} {m['nmse']:8.5f} {m['psnr_fg']:8.2f} {m['ssim_fg']:8.3f}")
    ds.close()


if __name__ == "__main__":
    main()
