"""Latency, three tables: a whole-process replay by stage (against BART on the same k-space), the last
acquisition of a slice -> its image (execute vs connect mode), and last readout -> last image of a paced
series in connect mode (one slice per sampler run vs batches of the slices that wait).

1. ``--raw FILE`` (default the shipped ``examples/t1_coronal_x4.h5``, 256x256, 8 coils, x4) replayed by a
   fresh ``python`` process as ``scoremri replay`` does: seconds (wall and CPU) for the imports, reading and
   buffering, model load, and per stage of the reconstruction (coil maps, SENSE start, network, data
   consistency, other); then ``bart ecalib -m1 -r 24`` + ``bart pics -d0 -S -l1 -r 0.01`` as processes on
   the same whitened k-space (BART with OMP_NUM_THREADS=1), and the ratio.
2. For each mode (execute: a fresh ``python -m gadgetron`` child per scan, as Gadgetron's ``<execute>`` does;
   connect: a warm ``scoremri serve``) and preset, one scan of ``--slices`` slices sent slice by slice, each
   after the previous image came back: the time from the end of a slice's sending to its image. The first
   slice of an execute-mode scan also waits for the child's start and model load.
3. A series of ``--series-slices`` slices whose ReconData are ready every ``--pace`` seconds, whatever the
   reconstruction does (as BucketToBuffer emits them), to a warm ``scoremri serve``: the time from the last
   slice's readout (its scheduled time) to its image, for ``slice_batch`` 1 (one by one) and 0 (auto: the
   slices that wait run together; 16 on CUDA, 1 on CPU, so compare e.g. ``--series-batches 1,4`` there).

    OMP_NUM_THREADS=1 python benchmarks/latency.py --threads 1                       # CPU, all three tables
    python benchmarks/latency.py --device cuda --size 256 --series-slices 30 --pace 0.2 --tables 1,3
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
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
REPO = Path(__file__).resolve().parents[1]
STAGES = ("maps", "sense", "network", "dc", "other")


# ------------------------------------------------------------------------------------- 1. whole process
def _stages_child(raw: str, out: str, device: str, threads: str | None) -> None:
    """Runs in a fresh process: a replay, timed by stage; prints one JSON line."""
    t_start = _process_start()
    from scoremri.gadget import threads as cpu_threads
    from scoremri.gadget.core import ReconCore
    from scoremri.gadget.files.rawfile import read_raw, write_images
    from scoremri.gadget.gadgetron.buffers import accumulate, bucket_to_buffer
    from scoremri.gadget.gadgetron.pipeline import read_pipeline
    from scoremri.gadget.gadgetron.preprocess import noise_prewhitener, preprocess
    from scoremri.recon.config import load_config

    cpu_threads.configure(threads)
    t = {"start + imports": (time.time() - t_start, time.process_time())}
    w, c = time.time(), time.process_time()
    spec = read_pipeline(None)
    config = load_config("fast")
    _, header, acqs = read_raw(raw)
    W, _ = noise_prewhitener(acqs, header, source=raw)
    lines = preprocess(acqs, header, W, remove_oversampling=spec.remove_ro_oversampling)
    rds = [rd for b in accumulate(lines, spec) for rd in bucket_to_buffer(b, header, spec)]
    t["read + buffer"] = (time.time() - w, time.process_time() - c)
    w, c = time.time(), time.process_time()
    core = ReconCore(header, config, device=device)
    t["model load"] = (time.time() - w, time.process_time() - c)
    w, c = time.time(), time.process_time()
    images = list(core.process_many(rds))
    recon = (time.time() - w, time.process_time() - c)
    rep = core.finish()
    w, c = time.time(), time.process_time()
    write_images(out, images, "dataset")
    t["write"] = (time.time() - w, time.process_time() - c)
    # the k-space of the first slice, whitened, for BART (saved beside the output)
    part = next(iter(core._decode_bit(rds[0].bits[0], 0))).parts[0]
    np.save(out + ".kspace.npy", part.kspace)
    print(json.dumps({"t": t, "recon": recon, "stages": rep["stages"], "stages_cpu": rep["stages_cpu"],
                      "slices": rep["slices"],
                      "total": (time.time() - t_start, time.process_time()), "backend": _backend(core),
                      "threads": cpu_threads.current().threads}))


def _backend(core) -> str:
    return type(core.prior).__name__.replace("ScoreModel", "").lower() if core.prior is not None else "-"


def _process_start() -> float:
    """This process's start (epoch seconds) from /proc, so the interpreter's own start-up counts."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime"))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, StopIteration):
        return time.time()


def _timed(cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(wall, CPU of the child) seconds of one command."""
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, env=env)
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.perf_counter() - t0, (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)


def table_stages(args: argparse.Namespace) -> bool:
    from scoremri.gadget.testing import bart as bt

    tmp = Path(tempfile.mkdtemp(prefix="scoremri-latency-"))
    try:
        out = str(tmp / "out.h5")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--stages-child", args.raw, "--stages-out", out,
               "--device", args.device] + (["--threads", str(args.threads)] if args.threads else [])
        proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            return False
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        rows = [(k, *v) for k, v in r["t"].items() if k != "write"]
        ns = max(r["slices"], 1)
        rows += [(f"recon: {s} (per slice)", r["stages"].get(s, 0.0) / ns, r["stages_cpu"].get(s, 0.0) / ns)
                 for s in STAGES]
        rows += [("recon (per slice)", r["recon"][0] / ns, r["recon"][1] / ns), ("write", *r["t"]["write"]),
                 ("whole process", *r["total"])]
        bart_s = None
        if shutil.which("bart"):
            k = np.load(out + ".kspace.npy")
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            bt.write_cfl(tmp / "ksp", bt.to_bart(k))
            e = _timed(["bart", "ecalib", "-m1", "-r", "24", str(tmp / "ksp"), str(tmp / "maps")], env)
            p = _timed(["bart", "pics", "-d0", "-S", "-l1", "-r", "0.01", str(tmp / "ksp"), str(tmp / "maps"),
                        str(tmp / "rec")], env)
            rows += [("BART ecalib -m1 -r 24", *e), ("BART pics -d0 -S -l1 -r 0.01", *p)]
            bart_s = (e[0] + p[0], e[1] + p[1])
        print(f"\n1. whole-process replay of {args.raw} by stage ({r['slices']} slice(s), preset fast, backend "
              f"{r['backend']}, {r['threads']} thread(s), device {args.device})")
        print("| stage | wall s | CPU s |")
        print("| --- | --- | --- |")
        for name, wall, cpu in rows:
            print(f"| {name} | {wall:.2f} | {cpu:.2f} |")
        if bart_s:
            print(f"| ratio whole process / BART (ecalib + pics) | {r['total'][0] / bart_s[0]:.1f} | "
                  f"{r['total'][1] / bart_s[1]:.1f} |")
        return True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------- 2. latency, 3. paced series
def _paced(items, res: harness.HarnessResult, timeout: float = 1800.0):
    """Yield item i only after the image of item i-1 arrived (one image per slice)."""
    for i, it in enumerate(items):
        deadline = time.monotonic() + timeout
        while len(res.images) < i and not res.errors and time.monotonic() < deadline:
            time.sleep(0.002)
        if res.errors:
            return
        yield it


def _clocked(items, pace: float, readout_at: list[float]):
    """Yield item i at t0 + i * pace, whatever comes back (the scanner does not wait), recording that time in
    ``readout_at`` (the slice's last readout: when BucketToBuffer emits it; sending may finish later when
    the receiver applies back-pressure, and Gadgetron then holds the data, not the scanner)."""
    t0 = time.monotonic()
    for i, it in enumerate(items):
        readout_at.append(t0 + i * pace)
        delay = readout_at[-1] - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        yield it


def _latencies(res: harness.HarnessResult) -> list[float]:
    return [r - s for s, r in zip(res.sent_at, res.received_at)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Serve:
    """A ``scoremri serve`` subprocess, up and healthy, stopped with SIGTERM at exit."""

    def __init__(self, args: argparse.Namespace, preset: str) -> None:
        from scoremri.gadget.server import check_health

        self.port = _free_port()
        self.logf = tempfile.TemporaryFile()
        cmd = [sys.executable, "-m", "scoremri.gadget.cli", "serve", "--port", str(self.port), "--device",
               args.device, "--preset", preset] + (["--threads", str(args.threads)] if args.threads else [])
        self.proc = subprocess.Popen(cmd, stdout=self.logf, stderr=subprocess.STDOUT, env=dict(os.environ))
        t0 = time.monotonic()
        while True:
            try:
                check_health("127.0.0.1", self.port, 2.0)
                break
            except (OSError, ValueError):
                if self.proc.poll() is not None or time.monotonic() - t0 > 600:
                    self.logf.seek(0)
                    print(self.logf.read().decode()[-3000:], file=sys.stderr)
                    self.close()
                    raise RuntimeError("serve did not start")
                time.sleep(0.2)
        self.up_s = time.monotonic() - t0

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.logf.close()


def _series(args: argparse.Namespace, n_slices: int):
    from scoremri.recon.simulation import birdcage_maps, simulate_kspace

    n, c = args.size, args.coils
    k = simulate_kspace(phantom(n), birdcage_maps(c, (n, n)), np.ones((n, n), bool), 1e-3,
                        np.random.default_rng(0))
    rows = np.union1d(np.arange(0, n, args.accel), np.arange(n // 2 - 12, n // 2 + 12))
    hdr = harness.header_xml(n, n, c, slices=n_slices, acceleration=args.accel)
    return hdr, (lambda: [harness.synthetic_recon_data(k, rows, slice_=s) for s in range(n_slices)])


def table_latency(args: argparse.Namespace) -> bool:
    hdr, items = _series(args, args.slices)
    table = []
    for preset in [p for p in args.presets.split(",") if p]:
        cfg = harness.config_xml(preset, args.device, threads=args.threads or "auto")
        if "execute" in args.modes:
            res = harness.HarnessResult()
            t0 = time.monotonic()
            harness.run_execute(cfg, hdr, _paced(items(), res), timeout=3600, result=res)
            table.append(("execute", preset, res, time.monotonic() - t0))
        if "connect" in args.modes:
            serve = _Serve(args, preset)
            try:
                # one scan to warm what a first scan fills (allocator, kernels), then the measured one
                harness.run_connect("127.0.0.1", serve.port, cfg, hdr, items()[:1], timeout=3600)
                res = harness.HarnessResult()
                t0 = time.monotonic()
                harness.run_connect("127.0.0.1", serve.port, cfg, hdr, _paced(items(), res), timeout=3600, result=res)
                table.append((f"connect (serve up in {serve.up_s:.1f} s)", preset, res, time.monotonic() - t0))
            finally:
                serve.close()
    ok = True
    print(f"\n2. latency: last acquisition of a slice -> its image; {args.size}x{args.size}, {args.coils} coils, "
          f"R={args.accel}, {args.slices} slices sent one after the other's image, device {args.device}")
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
    return ok


def table_series(args: argparse.Namespace) -> bool:
    n = args.series_slices
    hdr, items = _series(args, n)
    rows = []
    serve = _Serve(args, args.series_preset)
    try:
        for batch in [int(b) for b in args.series_batches.split(",") if b]:
            cfg = harness.config_xml(args.series_preset, args.device, threads=args.threads or "auto",
                                     slice_batch=batch)
            harness.run_connect("127.0.0.1", serve.port, cfg, hdr, items()[:1], timeout=3600)  # warm
            res = harness.HarnessResult()
            readout_at: list[float] = []
            t0 = time.monotonic()
            harness.run_connect("127.0.0.1", serve.port, cfg, hdr, _clocked(items(), args.pace, readout_at),
                                timeout=7200, result=res)
            rows.append((batch, res, time.monotonic() - t0, readout_at))
    finally:
        serve.close()
    ok = True
    print(f"\n3. paced series in connect mode: {n} slices {args.size}x{args.size}, {args.coils} coils, R={args.accel}, "
          f"one ReconData every {args.pace:g} s, preset {args.series_preset}, device {args.device}")
    print("| slice_batch | images | last readout -> last image (s) | first slice latency (s) | series wall (s) |")
    print("| --- | --- | --- | --- | --- |")
    for batch, res, wall, readout_at in rows:
        good = len(res.images) == n and not res.errors and len(readout_at) == n
        ok &= good
        tail = res.received_at[-1] - readout_at[-1] if good else float("nan")
        first = res.received_at[0] - readout_at[0] if res.received_at else float("nan")
        name = f"{batch} (auto)" if batch == 0 else str(batch)
        print(f"| {name} | {len(res.images)}/{n}{'' if good else ' ' + str(res.errors)} | {tail:.2f} | {first:.2f} "
              f"| {wall:.1f} |")
    return ok


def main(argv: list[str] | None = None) -> int:
    from scoremri.gadget.threads import parse_threads

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tables", default="1,2,3", help="which tables: 1 stages, 2 latency, 3 paced series")
    ap.add_argument("--raw", default=str(REPO / "examples" / "t1_coronal_x4.h5"), help="table 1: the raw file")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--coils", type=int, default=8)
    ap.add_argument("--slices", type=int, default=3)
    ap.add_argument("--accel", type=int, default=4)
    ap.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    ap.add_argument("--threads", type=parse_threads, default=None, metavar="N",
                    help="CPU threads of every process started (default auto)")
    ap.add_argument("--presets", default="sense,fast")
    ap.add_argument("--modes", default="execute,connect")
    ap.add_argument("--series-slices", type=int, default=30)
    ap.add_argument("--series-preset", default="fast")
    ap.add_argument("--series-batches", default="1,0", help="slice_batch values for table 3 (0 = auto)")
    ap.add_argument("--pace", type=float, default=0.5, help="seconds between the slices of table 3")
    ap.add_argument("--stages-child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--stages-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.stages_child:
        _stages_child(args.stages_child, args.stages_out, args.device, args.threads)
        return 0
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from scoremri.gadget import threads

    plan = threads.configure(args.threads)
    print(f"latency benchmark, device {args.device}, this process: {plan.describe()}")
    ok = True
    tables = {t.strip() for t in args.tables.split(",")}
    if "1" in tables:
        ok &= table_stages(args)
    if "2" in tables:
        ok &= table_latency(args)
    if "3" in tables:
        ok &= table_series(args)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
