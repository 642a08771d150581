"""Pack on CPU what the one GPU call of issue 10 needs and the GPU machine cannot make (it has no nibabel,
nilearn, ismrmrd, gadgetron or BART): the training volumes and the measurement subset as k-space.

    .venv/bin/python scripts/gpu_pack.py                       # -> gpu_pack/ (git-ignored), about 5 min
    .venv/bin/python scripts/gpu_pack.py --no-bart --max-slices 1 --sources dipy ex4d   # a quick small pack

Training data: ONLY nilearn's MNI152 T1 template (package data) and Debian mricron-data's
``inia19-t1-brain.nii.gz`` (the project's data rule); each volume is stored as it is (uint8) or as float16 of
volume / max, with the file's sha256 and the number of slices ``scoremri train`` would take from it.

Measurement subset: the cases of issue 11's visible benchmark, from its own definitions
(``benchmarks/quality.py``: ``make_cases``, ``write_case``, ``run_bart``; nothing is copied here). Each case's
raw file goes through the chain replay runs (``raw_chain``: noise prewhitening, readout oversampling removal,
Gadgetron's buffering) into the slice orchestrator (``ReconCore``, preset ``sense``), whose observer hands
over exactly what ``reconstruct`` gets for each slice: whitened k-space, mask, calibration lines, seed. The
CPU-only baselines are stored beside them: SENSE (that same core run), BART ``pics -l1`` at its best lambda
and ``pics -l2`` (the benchmark's ``run_bart``), each as ``recon.metrics.evaluate`` against the ground truth.

The format is described in scripts/gpu_common.py; the next steps in scripts/README.md.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_common import (  # noqa: E402
    ALLOWED_TRAINING, PACK_FORMAT, PackError, array_sha256, atomic_write_json,
)

log = logging.getLogger("gpu_pack")
REPO = Path(__file__).resolve().parents[1]
TRAVEL_LIMIT_MIB = 64.0
MIN_FILL = 0.1  # model/data.py load_slices default: what `scoremri train` keeps of a volume


# ------------------------------------------------------------------------------------------ training data
def default_training_files() -> list[Path]:
    """The two allowed training files where this machine has them (nilearn package data, mricron-data)."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise PackError("nilearn is not installed (pip install -e '.[train]'): its MNI152 template is training data")
    mni = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data" / \
        "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
    inia = Path("/usr/share/mricron/templates/inia19-t1-brain.nii.gz")
    for p, how in ((mni, "pip install nilearn"), (inia, "apt-get install mricron-data")):
        if not p.exists():
            raise PackError(f"{p} missing ({how})")
    return [mni, inia]


def read_volume(path: Path) -> np.ndarray:
    """The array of a NIfTI file (as stored: ``dataobj``, as model/data.py reads it) or of a .npy (dry runs)."""
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        import nibabel as nib

        vol = np.asanyarray(nib.load(str(path)).dataobj)
        if vol.ndim == 4 and vol.shape[3] == 1:
            vol = vol[..., 0]
    elif name.endswith(".npy"):
        vol = np.load(path)
    else:
        raise PackError(f"{path}: training volumes are NIfTI (or .npy in a dry run)")
    if vol.ndim != 3:
        raise PackError(f"{path}: expected a 3-D volume, got shape {vol.shape}")
    return vol


def stored_volume(vol: np.ndarray) -> tuple[np.ndarray, str]:
    """(array to store, how): uint8 exactly; anything else float16 of |volume| / max (the slices are scaled by
    their own maximum anyway, so only the relative precision, 2^-11, matters)."""
    if vol.dtype == np.uint8:
        return np.ascontiguousarray(vol), "uint8 as stored in the file"
    v = np.nan_to_num(np.abs(np.asarray(vol, dtype=np.float64)))
    return (v / max(float(v.max()), 1e-30)).astype(np.float16), f"float16 of volume / max (file dtype {vol.dtype})"


def pack_training(files: list[Path], dry_run: bool) -> tuple[list[dict[str, Any]], dict[str, np.ndarray]]:
    from scoremri.model.checkpoint import sha256_file
    from scoremri.model.data import _volume_slices

    entries, arrays = [], {}
    for i, p in enumerate(files):
        sha = sha256_file(p)
        if not dry_run and ALLOWED_TRAINING.get(p.name) != sha:
            raise PackError(f"{p}: not one of the allowed training files (name and sha256 must match "
                            f"{sorted(ALLOWED_TRAINING)}); only a --dry-run pack takes other data")
        vol = read_volume(p)
        arr, how = stored_volume(vol)
        n_file = len(_volume_slices(vol, MIN_FILL))
        n_pack = len(_volume_slices(arr.astype(np.float32), MIN_FILL))
        if n_file != n_pack:
            raise PackError(f"{p}: {n_pack} usable slices from the stored array but {n_file} from the file")
        key = f"vol{i}"
        arrays[key] = arr
        entries.append({"name": p.name, "path": str(p), "sha256": sha, "key": key, "stored": how,
                        "shape": list(arr.shape), "dtype": str(arr.dtype), "array_sha256": array_sha256(arr),
                        "slices": n_pack, "min_fill": MIN_FILL})
        log.info("training %s: %s %s, %d slices, sha256 %s", p.name, arr.dtype, arr.shape, n_pack, sha[:12])
    return entries, arrays


# ------------------------------------------------------------------------------------------ the ruler
def load_benchmark(path: str | Path) -> Any:
    """Issue 11's benchmark module (its case definitions are the one list of cases)."""
    p = Path(path)
    if not p.exists():
        raise PackError(f"{p}: benchmark file missing")
    spec = importlib.util.spec_from_file_location("quality_benchmark", p)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["quality_benchmark"] = mod
    spec.loader.exec_module(mod)
    missing = [n for n in ("make_cases", "write_case", "run_bart", "SOURCES", "SETTINGS") if not hasattr(mod, n)]
    if missing:
        raise PackError(f"{p} lacks {', '.join(missing)}: it is not issue 11's raw-file benchmark (pass --benchmark "
                        "to a version that has it, e.g. `git show quality:benchmarks/quality.py > /tmp/quality.py`)")
    return mod


def chain_records(raw: Path, props: dict[str, str]) -> list[Any]:
    """Replay's chain on a raw file into the slice orchestrator (preset ``sense`` + the pipeline's properties);
    returns the core's SliceRecords (what ``reconstruct`` got, per slice), in slice order."""
    from scoremri.gadget.core import ReconCore
    from scoremri.gadget.files.rawfile import read_raw
    from scoremri.gadget.gadgetron.chain import raw_chain
    from scoremri.gadget.gadgetron.pipeline import read_pipeline
    from scoremri.recon.config import load_config

    spec = read_pipeline(None)
    _, header, acqs = read_raw(raw)
    records: list[Any] = []
    core = ReconCore(header, load_config("sense", props), device="cpu", observer=records.append)
    noise_report: dict[str, Any] = {}
    for rd in raw_chain(acqs, header, spec, source=str(raw), noise_report=noise_report):
        if getattr(core, "noise_std", 0) is None:  # as replay sets it (where the core has it: issue 11)
            from scoremri.gadget.gadgetron import preprocess

            if hasattr(preprocess, "whitened_noise_std"):
                core.noise_std = preprocess.whitened_noise_std(noise_report)
        for _ in core.process(rd):
            pass
    for rec in records:
        rec.noise_std = getattr(core, "noise_std", None)

    def slice_no(rec: Any) -> int:
        m = re.match(r"slice (\d+)", rec.label)
        return int(m.group(1)) if m else 0

    return sorted(records, key=slice_no)


def pipeline_props() -> dict[str, str]:
    """The shipped stream XML's <property> overrides of the recon config, as replay applies them (its runtime
    settings -- preset, device, threads, ... -- are not config names and stay out)."""
    from scoremri.gadget.gadgetron.pipeline import read_pipeline
    from scoremri.recon.config import dotted_names

    names = set(dotted_names())
    return {k: str(v) for k, v in dict(read_pipeline(None).config).items() if k in names}


def _metrics(img: np.ndarray, gt: np.ndarray, fg: np.ndarray) -> dict[str, float]:
    from scoremri.recon.metrics import evaluate

    m = evaluate(img, gt, fg)
    return {k: round(float(m[k]), 4) for k in ("psnr", "ssim", "psnr_fg", "ssim_fg")}


def pack_case(bench: Any, case: Any, work: Path, props: dict[str, str], bart: bool) -> list[tuple[dict, dict]]:
    """One benchmark case -> [(manifest entry, arrays)] per slice."""
    from scoremri.recon.metrics import foreground_mask

    raw = work / "raw.h5"
    gts, accel = bench.write_case(case, raw)
    recs = chain_records(raw, props)
    if len(recs) != len(gts):
        raise PackError(f"{case.name}: the chain gave {len(recs)} slices for {len(gts)} ground truths")
    bart_runs = bench.run_bart(raw, gts, case.acs) if bart else None
    out = []
    for s, (rec, gt_c) in enumerate(zip(recs, gts)):
        if len(rec.kspace) != 1:
            raise PackError(f"{case.name}: {len(rec.kspace)} partitions per slice (3-D) are not packed")
        k, mask = np.asarray(rec.kspace[0], np.complex64), np.asarray(rec.mask, bool)
        probe = rec.crop(np.zeros((1,) + mask.shape, np.complex64))
        if probe.shape[1:] != mask.shape or gt_c.shape != mask.shape:
            raise PackError(f"{case.name}: the chain crops the image ({mask.shape} -> {probe.shape[1:]}, ground "
                            f"truth {gt_c.shape}); cropped cases are not packed")
        gt = np.abs(gt_c).astype(np.float32)
        fg = foreground_mask(gt)
        rows = np.flatnonzero(np.abs(k).sum(axis=(0, 2)) > 0).astype(np.int32)
        if not np.all(mask[np.setdiff1d(np.arange(mask.shape[0]), rows)] == 0) or not mask[rows].any(axis=1).all():
            raise PackError(f"{case.name}: measured rows of the k-space do not match the mask")
        base = {"sense": _metrics(rec.image[0], gt, fg)}
        if bart_runs is not None:
            l1, l2 = bart_runs
            lam = re.search(r"lambda ([0-9.eE+-]+)", l1.note or "")
            base["bart_l1"] = {**_metrics(l1.images[s], gt, fg), "lambda": float(lam.group(1)) if lam else None}
            base["bart_l2"] = _metrics(l2.images[s], gt, fg)
        st = case.setting
        meta = {"case": case.name, "source": case.source, "role": case.role, "anatomy": case.anatomy,
                "setting": st.name, "label": case.labels[s], "shape": list(mask.shape), "coils": int(k.shape[0]),
                "accel": round(float(mask.size / mask.sum()), 3), "mask_kind": st.mask, "acs": case.acs,
                "sigma": st.sigma, "ro_os": st.ro_os, "seed": int(rec.seeds[0]), "noise_std": rec.noise_std,
                "baselines": base}
        arrays = {"k": k[:, rows, :], "rows": rows, "mask": mask, "gt": gt, "fg": fg}
        if rec.calib and rec.calib[0] is not None:
            calib = np.asarray(rec.calib[0], np.complex64)
            n = calib.shape[1]
            at = [r for r in range(k.shape[1] - n + 1) if np.array_equal(k[:, r:r + n], calib)]
            if at and calib.shape[2] == k.shape[2]:  # the ACS lines are imaging lines too: keep where they are
                arrays["calib_at"] = np.array([at[0], n], np.int32)
            else:
                arrays["calib"] = calib
        out.append((meta, arrays))
        log.info("%s %s: %s C%d R%.2f  SENSE %.2f dB%s", case.name, case.labels[s], mask.shape, k.shape[0],
                 meta["accel"], base["sense"]["psnr_fg"],
                 f"  pics-l1 {base['bart_l1']['psnr_fg']:.2f} dB (lambda {base['bart_l1']['lambda']})"
                 if "bart_l1" in base else "")
    return out


_BENCH: dict[str, Any] = {}


def _case_job(args: tuple[str, Any, dict[str, str], bool]) -> list[tuple[dict, dict]]:
    bench_path, case, props, bart = args
    if bench_path not in _BENCH:  # once per (worker) process
        _BENCH[bench_path] = load_benchmark(bench_path)
    bench = _BENCH[bench_path]
    with tempfile.TemporaryDirectory(prefix="scoremri-gpupack-") as tmp:
        return pack_case(bench, case, Path(tmp), props, bart)


# ------------------------------------------------------------------------------------------ sizes
def travelling_mib(repo: Path, extra: list[Path]) -> float:
    """What a device call sends: tracked + untracked-not-ignored files of ``repo``, plus ``extra`` folders."""
    total = 0
    try:
        names = subprocess.run(["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                               check=True, capture_output=True).stdout.split(b"\0")
    except (OSError, subprocess.CalledProcessError):
        return float("nan")
    for n in names:
        p = repo / n.decode()
        if n and p.is_file():
            total += p.stat().st_size
    for d in extra:
        total += sum(f.stat().st_size for f in Path(d).rglob("*") if f.is_file())
    return total / 2**20


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-o", "--out", default=str(REPO / "gpu_pack"), help="pack folder (default: gpu_pack/)")
    ap.add_argument("--benchmark", default=str(REPO / "benchmarks" / "quality.py"),
                    help="issue 11's benchmark file whose cases are packed (default: benchmarks/quality.py)")
    ap.add_argument("--sources", nargs="+", default=None, help="benchmark sources (default: all)")
    ap.add_argument("--settings", nargs="+", default=None, help="benchmark settings (default: all)")
    ap.add_argument("--max-slices", type=int, default=0, help="at most N slices per case (0 = the benchmark's)")
    ap.add_argument("--no-bart", action="store_true", help="no BART baselines (the table shows '-' for them)")
    ap.add_argument("--train-file", action="append", default=[], metavar="PATH",
                    help="training volume (default: the two allowed templates; others only with --dry-run)")
    ap.add_argument("--dry-run", action="store_true", help="a pack for gpu_run.sh --dry-run: any training volume")
    ap.add_argument("--jobs", type=int, default=1, help="worker processes for the cases (one thread each)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    logging.getLogger("scoremri").setLevel(logging.WARNING)
    t0 = time.time()
    try:
        bench = _BENCH[args.benchmark] = load_benchmark(args.benchmark)
        files = [Path(f) for f in args.train_file] or default_training_files()
        if args.dry_run is False and sorted(p.name for p in files) != sorted(ALLOWED_TRAINING):
            raise PackError(f"training files must be exactly {sorted(ALLOWED_TRAINING)}, got "
                            f"{sorted(p.name for p in files)}")
        if not args.no_bart and not shutil.which("bart"):
            raise PackError("bart is not on PATH (apt-get install bart), or pass --no-bart")
        train_entries, train_arrays = pack_training(files, args.dry_run)
        cases = bench.make_cases(args.sources or list(bench.SOURCES), args.settings or list(bench.SETTINGS),
                                 max_slices=args.max_slices)
        if not cases:
            raise PackError("the selection gives no benchmark cases")
        props = pipeline_props()
        jobs = [(args.benchmark, c, props, not args.no_bart) for c in cases]
        if args.jobs > 1:
            from concurrent.futures import ProcessPoolExecutor

            with ProcessPoolExecutor(args.jobs) as ex:
                results = list(ex.map(_case_job, jobs))
        else:
            results = [_case_job(j) for j in jobs]
    except PackError as e:
        print(f"gpu_pack: {e}", file=sys.stderr)
        return 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ruler_meta, ruler_arrays = [], {}
    for res in results:
        for meta, arrays in res:
            i = len(ruler_meta)
            ruler_meta.append({"i": i, **meta})
            ruler_arrays.update({f"{k}{i}": v for k, v in arrays.items()})
    np.savez_compressed(out / "train.npz", **train_arrays)
    np.savez_compressed(out / "ruler.npz", **ruler_arrays)
    bench_path = Path(args.benchmark)
    from scoremri.model.checkpoint import sha256_file

    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    manifest = {
        "format": PACK_FORMAT, "purpose": "dry-run" if args.dry_run else "gpu",
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "commit": commit,
        "benchmark": {"path": str(bench_path), "sha256": sha256_file(bench_path), "sources": args.sources,
                      "settings": args.settings, "max_slices": args.max_slices},
        "pipeline_properties": props, "bart": not args.no_bart,
        "training": train_entries, "ruler": ruler_meta,
    }
    atomic_write_json(out / "manifest.json", manifest)
    size = sum(f.stat().st_size for f in out.iterdir() if f.is_file()) / 2**20
    inside = out.resolve().is_relative_to(REPO)
    ignored = inside and subprocess.run(["git", "-C", str(REPO), "check-ignore", "-q", str(out.resolve())],
                                        capture_output=True).returncode == 0
    travel = travelling_mib(REPO, [out] if ignored or not inside else [])
    print(f"{out}: {len(train_entries)} training volumes ({sum(e['slices'] for e in train_entries)} slices), "
          f"{len(ruler_meta)} ruler slices from {len(cases)} cases; {size:.1f} MiB; the device call would carry "
          f"{travel:.1f} MiB of {TRAVEL_LIMIT_MIB:.0f} MiB; {time.time() - t0:.0f} s")
    if inside and not ignored:
        log.warning("%s is not git-ignored: add it to .gitignore (it must be named in the device call's carry)", out)
    if travel == travel and travel > TRAVEL_LIMIT_MIB - 2:
        print(f"gpu_pack: {travel:.1f} MiB would travel, over the {TRAVEL_LIMIT_MIB:.0f} MiB limit less a margin: "
              "pack fewer slices (--max-slices, --sources, --settings)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
