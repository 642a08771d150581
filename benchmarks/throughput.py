"""Slices per second against the number of slices per sampler run (``reconstruct_batch``), by stage.

S simulated slices (dipy's T1 slice resampled to --size, birdcage coils, x4 random mask with 24 ACS lines,
each slice with its own intensity, noise and seed) are reconstructed in runs of b slices for every b in
--batches, as ReconCore does with the slices that are ready together. For each network backend and b it
prints slices per second, wall and CPU seconds per slice, seconds per slice by stage (coil maps, SENSE
start, network, data consistency, other; CPU seconds on CPU, wall seconds on CUDA) and the largest relative difference of any image from the b = 1
run (a slice's image must not depend on its batch: <= 1e-4). A warm-up run (model load, first calls) is
not timed.

    OMP_NUM_THREADS=1 python benchmarks/throughput.py                        # CPU: 256x256, 8 coils, 8 slices
    python benchmarks/throughput.py --backends torch,onnx --batches 1,2      # the CPU backends compared
    python benchmarks/throughput.py --device cuda --slices 32 --batches 1,4,8,16,32

Timings on a shared machine are noisy: compare rows of one run (they are interleaved per batch size), and
read the CPU column (user + system seconds of this process) where other jobs steal the cores.
"""
from __future__ import annotations

import argparse
import logging
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load import phantom  # noqa: E402  (dipy's T1 slice resampled: visible evaluation data)

log = logging.getLogger("throughput")
STAGES = ("maps", "sense", "network", "dc", "other")


def make_series(n: int, coils: int, slices: int, accel: float = 4.0, seed: int = 0):
    """``slices`` (kspace (C, n, n) complex64, mask (n, n) bool, ground truth (n, n)) with different intensity,
    noise and mask per slice (x4 random, 24 ACS lines)."""
    from scoremri.recon.masks import make_mask
    from scoremri.recon.simulation import birdcage_maps, simulate_kspace

    rng = np.random.default_rng(seed)
    base = phantom(n)
    maps = birdcage_maps(coils, (n, n))
    out = []
    for s in range(slices):
        gain = float(0.5 + rng.random())
        img = base * gain
        mask = make_mask("random", (n, n), accel, acs=24, seed=seed + s)
        k = simulate_kspace(img, maps, mask, 0.005 * gain, rng).astype(np.complex64)
        out.append((k * mask[None], mask, img))
    return out


def machine(device: str) -> str:
    """One line naming the device and the threads."""
    import torch

    if device.startswith("cuda"):
        return f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}"
    from scoremri.gadget import threads

    plan = threads.current()
    what = plan.describe() if plan else f"{torch.get_num_threads()} threads"
    return f"CPU {platform.processor() or platform.machine()}, {what}, torch {torch.__version__}"


def run_batches(series, cfg, device: str, prior, b: int, seeds):
    """Reconstruct every slice in runs of ``b``: (images, wall s, CPU s, stage seconds summed over slices)."""
    import torch

    from scoremri.recon.api import reconstruct_batch

    images, stages = [], dict.fromkeys(STAGES, 0.0)
    key = "stages_cpu" if not device.startswith("cuda") else "stages"  # CPU: CPU seconds (busy machines)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(0, len(series), b):
        part = series[i : i + b]
        res = reconstruct_batch([k for k, _, _ in part], [m for _, m, _ in part], cfg, device=device,
                                seeds=seeds[i : i + b], prior=prior)
        for r in res:
            images.append(r.image)
            for k, v in r.report[key].items():
                stages[k] = stages.get(k, 0.0) + v
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return images, time.perf_counter() - t0, time.process_time() - c0, stages


def main(argv: list[str] | None = None) -> int:
    from scoremri.gadget import threads

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--coils", type=int, default=8)
    ap.add_argument("--slices", type=int, default=8)
    ap.add_argument("--batches", default="1,2,4,8", help="slices per sampler run, comma-separated")
    ap.add_argument("--preset", default="fast")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="config override (repeatable)")
    ap.add_argument("--backends", default="auto", help="model.backend values to compare, e.g. torch,onnx")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    ap.add_argument("--threads", type=threads.parse_threads, default=None, metavar="N",
                    help="CPU threads (default auto, scoremri.gadget.threads)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    threads.configure(args.threads)

    from scoremri.gadget.core import load_prior
    from scoremri.model.backends import resolve_backend
    from scoremri.recon.api import reconstruct_batch, resolve_device
    from scoremri.recon.config import load_config, parse_overrides

    device = str(resolve_device(args.device))
    batches = [int(b) for b in args.batches.split(",") if b]
    series = make_series(args.size, args.coils, args.slices)
    seeds = list(range(1000, 1000 + args.slices))
    rows = []
    ok = True
    for backend in [b for b in args.backends.split(",") if b]:
        cfg = load_config(args.preset, {**parse_overrides(args.set), "model.backend": backend})
        import torch

        prior = load_prior(cfg, torch.device(device)) if cfg.sampler.method not in ("sense", "zero_filled") else None
        name = resolve_backend(cfg.model, device) if prior is not None else "-"
        warm = load_config(args.preset, {**parse_overrides(args.set), "model.backend": backend, "sampler.steps": 2})
        reconstruct_batch([series[0][0]], [series[0][1]], warm, device=device, prior=prior)  # not timed
        ref = None
        for b in batches:
            images, wall, cpu, stages = run_batches(series, cfg, device, prior, b, seeds)
            if ref is None:
                ref = images
            diff = max(float(np.abs(a - r).max() / np.abs(r).max()) for a, r in zip(images, ref))
            ok &= diff <= 1e-4
            rows.append((name, b, args.slices / wall, wall / args.slices, cpu / args.slices,
                         {k: v / args.slices for k, v in stages.items()}, diff))
            log.warning("backend %s batch %d: %.2f s per slice", name, b, wall / args.slices)
    print(f"throughput: {args.slices} slices {args.size}x{args.size}, {args.coils} coils, x4, preset {args.preset}"
          f"{' ' + ' '.join(args.set) if args.set else ''}; {machine(device)}")
    print("| backend | slices per run | slices/s | s/slice wall | s/slice CPU | "
          + " | ".join(f"{s} s" for s in STAGES) + " | max rel diff vs 1 |")
    print("| --- " * (6 + len(STAGES)) + "|")
    for name, b, sps, spslice, cpu, st, diff in rows:
        print(f"| {name} | {b} | {sps:.3f} | {spslice:.2f} | {cpu:.2f} | "
              + " | ".join(f"{st.get(s, 0.0):.2f}" for s in STAGES) + f" | {diff:.1e} |")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
