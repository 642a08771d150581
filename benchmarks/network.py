"""Score-network benchmark: parameters, GFLOP per forward, ms per forward and training iterations/s.

    python benchmarks/network.py            # full table: default + paper, 256/320, b1/2/16, fp32/bf16/compiled
    python benchmarks/network.py --quick    # reduced CPU table (skips what takes too long on a small CPU)

Prints one markdown table (the only output besides logging). GFLOP are counted with
torch.utils.flop_counter on meta tensors (2 FLOP per multiply-add). Reference (ARCHITECTURE.md, "Reference numbers"):
official NCSN++ 2.08 TFLOP at 320x320; 63 ms (fp32/TF32) and 16.6 ms (bf16 + compile) per forward on an
H100; 10.95 s per forward on a 2-core CPU.
"""
from __future__ import annotations

import argparse
import logging
import os
import time
from typing import Callable

import torch

from scoremri.model.ncsnpp import build_network, count_parameters
from scoremri.model.train import EMA, dsm_loss
from scoremri.model.sde import VESDE

log = logging.getLogger("benchmarks.network")


def gflop(size: str, res: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        net = build_network(size)
        x = torch.empty(1, 1, res, res)
        s = torch.ones(1)
    with FlopCounterMode(display=False) as fc:
        net(x, s)
    return fc.get_total_flops() / 1e9


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def time_call(fn: Callable[[], object], dev: torch.device, budget_s: float, max_reps: int = 20) -> float:
    """Simple timing: one warm-up, then repeats until budget_s; returns seconds per call. A warm-up call
    longer than budget_s is itself the measurement (slow CPU cells)."""
    t = time.perf_counter()
    fn()
    _sync(dev)
    if time.perf_counter() - t > budget_s:
        return time.perf_counter() - t
    n, t0 = 0, time.perf_counter()
    while n < max_reps:
        fn()
        n += 1
        _sync(dev)
        if time.perf_counter() - t0 > budget_s:
            break
    return (time.perf_counter() - t0) / n


def _cpu_has_bf16() -> bool:
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def main() -> None:
    from scoremri.gadget.threads import configure, parse_threads

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="reduced CPU table")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=parse_threads, default=None, metavar="N",
                   help="CPU threads (default auto: scoremri.gadget.threads)")
    p.add_argument("--budget", type=float, default=3.0, help="seconds of timing per cell")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    configure(args.threads)
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    cpu = dev.type == "cpu"
    rows: list[tuple[str, ...]] = []
    header = ("size", "params (M)", "res", "GFLOP/fwd (b1)", "batch", "mode", "ms / forward", "ms / image")
    # cells: (size, res, batch, mode); skip the ones that take too long on a CPU
    sizes = ("default", "paper")
    for size in sizes:
        nparam = count_parameters(build_network(size)) / 1e6
        for res in (256, 320):
            gf = gflop(size, res)
            for batch in (1, 2, 16):
                for mode in ("fp32", "bf16", "compiled"):
                    skip = ""
                    if cpu and args.quick:
                        if size == "paper" and not (res == 256 and batch == 1 and mode == "fp32"):
                            skip = "skipped (--quick, CPU)"
                        elif size == "default" and (batch == 16 or mode == "compiled" or
                                                    (mode == "bf16" and (res, batch) != (256, 1))):
                            skip = "skipped (--quick, CPU)"
                    elif cpu and size == "paper" and batch == 16:
                        skip = "skipped (CPU: minutes per call)"
                    elif cpu and mode == "bf16" and not _cpu_has_bf16() and (res, batch) != (256, 1):
                        skip = "skipped (CPU without native bf16: ~30x slower than fp32)"
                    if skip:
                        rows.append((size, f"{nparam:.2f}", str(res), f"{gf:.1f}", str(batch), mode, skip, ""))
                        continue
                    net = build_network(size).to(dev).eval()
                    if mode == "compiled":
                        net = net.to(memory_format=torch.channels_last)
                    fn_net = torch.compile(net) if mode == "compiled" else net
                    x = torch.randn(batch, 1, res, res, device=dev)
                    s = torch.rand(batch, device=dev) + 0.05
                    if mode == "compiled":
                        x = x.to(memory_format=torch.channels_last)
                    dt = torch.bfloat16 if (mode in ("bf16", "compiled") and not cpu) or mode == "bf16" else None

                    def fwd() -> None:
                        with torch.no_grad(), torch.autocast(dev.type, dtype=dt or torch.float32,
                                                             enabled=dt is not None):
                            fn_net(x, s)

                    sec = time_call(fwd, dev, args.budget)
                    label = mode if mode != "compiled" else ("compiled+bf16+CL" if not cpu else "compiled+CL")
                    rows.append((size, f"{nparam:.2f}", str(res), f"{gf:.1f}", str(batch), label,
                                 f"{sec * 1e3:.1f}", f"{sec * 1e3 / batch:.1f}"))
                    log.info("%s", rows[-1])
    # training throughput, batch 32 at 256^2 (default size; batch 4 with --quick on a CPU)
    train_rows = []
    for mode in ("fp32", "compiled"):
        if cpu and (args.quick and mode == "compiled"):
            train_rows.append(("default", "4", "256", mode, "skipped (--quick, CPU)"))
            continue
        net = build_network("default").to(dev)
        opt = torch.optim.Adam(net.parameters(), lr=1e-4, fused=not cpu or None)
        ema = EMA(net, 0.999)
        model = torch.compile(net) if mode == "compiled" else net
        sde = VESDE()
        tb = 4 if (cpu and args.quick) else 32  # batch 32 at 256^2 needs ~10 GB and minutes per step on CPU
        x0 = torch.rand(tb, 1, 256, 256, device=dev)
        use_bf16 = not cpu

        def step() -> None:
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_bf16):
                loss = dsm_loss(model, x0, sde)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            ema.update(net, 100)

        sec = time_call(step, dev, args.budget, max_reps=20 if not cpu else 2)
        train_rows.append(("default", str(tb), "256", mode + ("+bf16" if use_bf16 else ""), f"{1 / sec:.2f}"))
        log.info("%s", train_rows[-1])
    where = (torch.cuda.get_device_name(dev) if not cpu else
             f"CPU, {torch.get_num_threads()} threads (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '')})")
    print(f"\n## Score network forward ({where}, torch {torch.__version__})\n")
    print("| " + " | ".join(header) + " |")
    print("|" + " --- |" * len(header))
    skipped: dict[str, list[str]] = {}
    for r in rows:
        if r[6].startswith("skipped"):
            skipped.setdefault(r[6], []).append(f"{r[0]} {r[2]}^2 b{r[4]} {r[5]}")
        else:
            print("| " + " | ".join(r) + " |")
    for why, cells in skipped.items():
        print(f"\n{why}: {', '.join(cells)}")
    print("\n## Training iterations/s (DSM step: forward, backward, clip, Adam, EMA)\n")
    print("| size | batch | res | mode | it/s |\n| --- | --- | --- | --- | --- |")
    for r in train_rows:
        print("| " + " | ".join(r) + " |")
    print("\nReference (H100, official NCSN++ 320^2 b1): 63 ms fp32/TF32, 16.6 ms plain-torch bf16+compile; "
          "2-core CPU: 10.95 s; 2.08 TFLOP per forward.")


if __name__ == "__main__":
    main()
