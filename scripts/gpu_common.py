"""What the GPU run's three scripts share (issue 10): the pack format, the training-data rule, the goals and the
one measurement table.

    scripts/gpu_pack.py    CPU, here: training volumes + the quality benchmark's cases as k-space -> gpu_pack/
    scripts/gpu_run.sh     the lent GPU, one call: train -> publish -> measure -> table, into $OUT
    scripts/gpu_accept.py  CPU, here: read what came back, decide, install model/weights/default.*

The pack (a git-ignored folder, carried to the GPU machine; no ismrmrd, gadgetron, nibabel or BART needed to
read it):

* ``manifest.json``: format, purpose (``gpu`` or ``dry-run``), the training files (name, where they came from,
  file sha256, stored array key/dtype/shape/sha256, usable slices), the ruler slices (case, slice label, set,
  anatomy, setting, shape, coils, true acceleration, seed, CPU baselines: SENSE through the same core, BART
  ``pics -l1`` at its best lambda and ``pics -l2``) and the benchmark file it came from (path, sha256).
* ``train.npz``: one array per training volume, ``vol<i>`` (uint8 exactly as stored in the NIfTI, or float16
  of volume / max for float volumes).
* ``ruler.npz``: per ruler slice ``i``: ``k<i>`` (C, rows, kx) complex64 = the measured rows of the whitened
  k-space the slice orchestrator hands to ``reconstruct`` (zeros elsewhere), ``rows<i>`` (rows,) int32,
  ``mask<i>`` (ky, kx) bool, ``calib<i>`` (C, ky_c, kx) complex64 when the chain gave separate calibration
  lines (or ``calib_at<i>`` = (first row, rows) when they are rows of the k-space, as the ACS lines of
  simulated files are), ``gt<i>`` (ny, nx) float32 |ground truth| and ``fg<i>`` (ny, nx) bool, the benchmark's
  object mask.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

PACK_FORMAT = "scoremri-gpu-pack/1"
MEASURE_FORMAT = "scoremri-gpu-measure/1"

# The data rule (model/weights/default.md): the shipped prior trains on these two files and nothing else; their sha256 are the
# ones on the CPU-trained card. gpu_pack refuses other files (unless --dry-run) and gpu_accept refuses a card
# that names any other.
ALLOWED_TRAINING: dict[str, str] = {
    "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz":
        "421a10e872fd6cadae7f61d358dffbcc1795a497d61ee76c5dda2503e1a1e9e6",
    "inia19-t1-brain.nii.gz": "3f0707f4999a0c6b56d6c9a0145310cba17753e2b4612f577d8dbfe65a89e231",
}

# The acceptance rule of issue 10 item 2: higher mean PSNR inside the object over the subset, and no case
# lower by more than this.
MAX_CASE_DROP_DB = 0.3

# Issue 10 item 3: the figures the closing note puts beside these goals.
GOALS: dict[str, str] = {
    "train_its": "training >= 20 it/s at batch 32, 256x256",
    "fast_320": "`fast` < 0.5 s per 320x320 16-coil slice",
    "paper": "`paper` (N=2000) < 30 s per slice",
    "fast_vs_pics": "default `fast` >= BART pics + 1 dB on every visible brain case",
}


class PackError(ValueError):
    """The pack folder is missing, incomplete or not what the caller needs; the message names the file."""


def sha256_bytes(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def array_sha256(a: np.ndarray) -> str:
    """sha256 of an array's dtype, shape and C-order bytes (what the manifest records for each stored array)."""
    a = np.ascontiguousarray(a)
    h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.tobytes())
    return h.hexdigest()


def read_manifest(pack: str | Path) -> dict[str, Any]:
    p = Path(pack) / "manifest.json"
    if not p.exists():
        raise PackError(f"{p}: no pack here (make one with scripts/gpu_pack.py)")
    m = json.loads(p.read_text())
    if m.get("format") != PACK_FORMAT:
        raise PackError(f"{p}: format {m.get('format')!r}, expected {PACK_FORMAT!r} (re-pack with this version)")
    for f in ("train.npz", "ruler.npz"):
        if not (Path(pack) / f).exists():
            raise PackError(f"{Path(pack) / f} missing: the pack is incomplete (re-run scripts/gpu_pack.py)")
    return m


def training_volumes(pack: str | Path, manifest: dict[str, Any] | None = None) -> list[tuple[dict[str, Any], np.ndarray]]:
    """[(manifest entry, volume as stored)], each checked against its recorded array sha256."""
    m = manifest or read_manifest(pack)
    out = []
    with np.load(Path(pack) / "train.npz") as z:
        for f in m["training"]:
            vol = z[f["key"]]
            if array_sha256(vol) != f["array_sha256"]:
                raise PackError(f"{pack}/train.npz: array {f['key']} ({f['name']}) does not match its sha256 in "
                                "the manifest (corrupted copy?)")
            out.append((f, vol))
    return out


@dataclass
class RulerSlice:
    """One slice of the measurement subset: what ``reconstruct`` gets and what it is scored against."""

    meta: dict[str, Any]
    kspace: np.ndarray  # (C, ky, kx) complex64, zeros where not measured
    mask: np.ndarray  # (ky, kx) bool
    calib: np.ndarray | None  # (C, ky_c, kx) complex64 or None
    gt: np.ndarray  # (ny, nx) float32 |ground truth|
    fg: np.ndarray  # (ny, nx) bool

    @property
    def name(self) -> str:
        return f"{self.meta['case']}/{self.meta['label']}"


def ruler_slices(pack: str | Path, manifest: dict[str, Any] | None = None) -> Iterator[RulerSlice]:
    """The ruler slices of a pack in manifest order, k-space expanded to the full grid."""
    m = manifest or read_manifest(pack)
    with np.load(Path(pack) / "ruler.npz") as z:
        for i, meta in enumerate(m["ruler"]):
            rows = z[f"rows{i}"]
            mask = z[f"mask{i}"]
            kr = z[f"k{i}"]
            k = np.zeros((kr.shape[0],) + mask.shape, np.complex64)
            k[:, rows, :] = kr
            calib = z[f"calib{i}"] if f"calib{i}" in z.files else None
            if f"calib_at{i}" in z.files:
                r0, n = (int(v) for v in z[f"calib_at{i}"])
                calib = np.ascontiguousarray(k[:, r0:r0 + n])
            yield RulerSlice(meta, k, mask, calib, z[f"gt{i}"], z[f"fg{i}"])


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Write JSON through a temporary file and a rename: a run killed mid-write leaves the previous version."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=_json_default) + "\n")
    tmp.replace(path)


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


# ------------------------------------------------------------------------------------------- the table
def _f(v: Any, fmt: str = "{:.2f}") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return fmt.format(v)


def case_psnr(row: dict[str, Any], method: str, prior: str) -> float | None:
    """PSNR inside the object of one ruler row's ``method`` (fast | uncertainty) with ``prior`` (new | shipped)."""
    r = row.get(method, {}).get(prior)
    return None if not r or "psnr_fg" not in r else float(r["psnr_fg"])


def decision(measure: dict[str, Any]) -> dict[str, Any]:
    """Issue 10's rule on the ``fast`` rows measured with both priors: accept when the new prior's mean PSNR
    inside the object is higher and no case drops by more than MAX_CASE_DROP_DB. Rows missing either prior
    make the decision 'incomplete' (never accept on a partial subset)."""
    rows = measure.get("ruler", [])
    pairs = [(r, case_psnr(r, "fast", "new"), case_psnr(r, "fast", "shipped")) for r in rows]
    done = [(r, a, b) for r, a, b in pairs if a is not None and b is not None]
    out: dict[str, Any] = {"slices": len(rows), "compared": len(done)}
    if not rows or len(done) < len(rows):
        out.update(accept=False, verdict=f"incomplete: {len(done)} of {len(rows)} ruler slices measured with both "
                                         "priors")
        return out
    d = np.array([a - b for _, a, b in done])
    worst = int(np.argmin(d))
    out.update(mean_new=float(np.mean([a for _, a, _ in done])), mean_shipped=float(np.mean([b for _, _, b in done])),
               mean_delta=float(d.mean()), worst_delta=float(d[worst]),
               worst_case=f"{done[worst][0]['case']}/{done[worst][0]['label']}")
    ok_mean = out["mean_new"] > out["mean_shipped"]
    ok_drop = out["worst_delta"] >= -MAX_CASE_DROP_DB
    out["accept"] = bool(ok_mean and ok_drop)
    out["verdict"] = ("ACCEPT" if out["accept"] else "REJECT") + (
        f": mean PSNR fg {out['mean_new']:.2f} vs {out['mean_shipped']:.2f} dB ({out['mean_delta']:+.2f}); "
        f"worst case {out['worst_case']} {out['worst_delta']:+.2f} dB (limit -{MAX_CASE_DROP_DB})")
    return out


def goal_rows(measure: dict[str, Any], card: dict[str, Any] | None, prior: str = "new") -> list[tuple[str, str, str]]:
    """[(goal, figure reached, met | MISSED | not measured)] for issue 10 item 3, with ``prior``'s numbers."""
    out = []
    t = (card or {}).get("training", {})
    its, batch, crop = t.get("it_per_s"), t.get("batch"), t.get("crop")
    if its is None:
        out.append((GOALS["train_its"], "-", "not measured"))
    else:
        fig = f"{its:.1f} it/s at batch {batch}, crop {crop}"
        same = batch is not None and int(batch) >= 32 and str(crop) in ("256", "256-256")
        out.append((GOALS["train_its"], fig, ("met" if its >= 20 else "MISSED") if same else "not comparable"))
    sp = [r for r in measure.get("fast_speed", []) if r.get("prior") == prior and r.get("shape") == [320, 320]
          and r.get("coils") == 16]
    if sp:
        s = sp[0]["s_per_slice"]
        out.append((GOALS["fast_320"], f"{s:.3f} s per slice", "met" if s < 0.5 else "MISSED"))
    else:
        out.append((GOALS["fast_320"], "-", "not measured"))
    pp = [p for p in measure.get("paper", []) if p.get("prior") == prior and "seconds" in p]
    if pp:
        p = pp[0]
        tag = "met" if p["seconds"] < 30 and p.get("steps") == 2000 else ("MISSED" if p.get("steps") == 2000 else
                                                                         "not comparable")
        out.append((GOALS["paper"], f"{p['seconds']:.1f} s (N={p.get('steps')}, {p.get('case')})", tag))
    else:
        out.append((GOALS["paper"], "-", "not measured"))
    margins = []
    brain = [r for r in measure.get("ruler", []) if r.get("anatomy") == "brain"]
    for r in brain:
        a = case_psnr(r, "fast", prior)
        pics = (r.get("baselines") or {}).get("bart_l1", {}).get("psnr_fg")
        if a is not None and pics is not None:
            margins.append((a - pics, f"{r['case']}/{r['label']}"))
    if margins:
        worst = min(margins)
        n_ok = sum(m >= 1.0 for m, _ in margins)
        part = "" if len(margins) == len(brain) else f" (measured: {len(margins)} of {len(brain)})"
        out.append((GOALS["fast_vs_pics"], f"{n_ok}/{len(margins)} brain slices{part}; worst {worst[0]:+.2f} dB "
                    f"({worst[1]})", ("met" if n_ok == len(margins) else "MISSED") if not part or n_ok < len(margins)
                    else "incomplete"))
    else:
        out.append((GOALS["fast_vs_pics"], "-", "not measured (no BART baselines in the pack?)"))
    return out


def format_table(measure: dict[str, Any], card: dict[str, Any] | None) -> str:
    """The one table of the GPU run (printed last by gpu_run.sh, again by gpu_accept.py)."""
    L: list[str] = []
    dev = measure.get("device", "?")
    L.append(f"# scoremri GPU run (issue 10): {dev}, torch {measure.get('torch', '?')}")
    t = (card or {}).get("training", {})
    if card:
        L.append(f"prior trained: size {card.get('size')} ({card.get('parameters', 0) / 1e6:.2f} M parameters, "
                 f"{card.get('weights_bytes', 0) / 2**20:.1f} MiB fp16), {t.get('steps')} iterations in "
                 f"{_f(t.get('seconds', 0) / 60, '{:.1f}')} min ({_f(t.get('compile_s'), '{:.0f}')} s compile), "
                 f"{_f(t.get('it_per_s'), '{:.1f}')} it/s at batch {t.get('batch')} crop {t.get('crop')}, seed "
                 f"{t.get('seed')}, final loss {_f(t.get('final_loss'), '{:.4f}')}")
    else:
        L.append("prior trained: none came back (training failed or was cut before its first save)")
    rows = measure.get("ruler", [])
    if rows:
        L += ["", "PSNR inside the object (dB); sense / bart on CPU in the pack, learned on this GPU with the same "
              "k-space, mask and seed:",
              "| case / slice | set | R | C | sense | bart l1 (lambda) | fast shipped | fast new | delta | "
              "K=8 shipped | K=8 new |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in rows:
            b = r.get("baselines") or {}
            l1 = b.get("bart_l1", {})
            fs, fn = case_psnr(r, "fast", "shipped"), case_psnr(r, "fast", "new")
            us, un = case_psnr(r, "uncertainty", "shipped"), case_psnr(r, "uncertainty", "new")
            delta = None if fs is None or fn is None else fn - fs
            lam = f" ({l1['lambda']})" if "lambda" in l1 else ""
            L.append(f"| {r['case']}/{r['label']} | {r['role'][0]} | {r['accel']:.1f} | {r['coils']} | "
                     f"{_f(b.get('sense', {}).get('psnr_fg'))} | {_f(l1.get('psnr_fg'))}{lam} | {_f(fs)} | {_f(fn)} | "
                     f"{_f(delta, '{:+.2f}')} | {_f(us)} | {_f(un)} |")
        for method in ("fast", "uncertainty"):
            for prior in ("shipped", "new"):
                v = [case_psnr(r, method, prior) for r in rows]
                v = [x for x in v if x is not None]
                if v:
                    L.append(f"mean {method} {prior}: {np.mean(v):.2f} dB over {len(v)} of {len(rows)} slices")
        fb = {p: sum(bool((r.get("fast") or {}).get(p, {}).get("sanity_failed")) for r in rows)
              for p in ("shipped", "new")}
        if any(fb.values()):
            L.append(f"the sanity check (recon/sanity.py) would send SENSE instead on {fb['shipped']} (shipped) and "
                     f"{fb['new']} (new) of {len(rows)} slices; the PSNRs above are the learned images (fallback off)")
        failed = [f"{r['case']}/{r['label']} {m} {p}" for r in rows for m in ("fast", "uncertainty")
                  for p, v in (r.get(m) or {}).items() if "error" in v]
        if failed:
            L.append(f"FAILED reconstructions ({len(failed)}, errors in measure.json): {', '.join(failed[:8])}")
        d = decision(measure)
        L.append(f"decision (issue 10 item 2): {d['verdict']}")
    net = measure.get("network", [])
    if net:
        L += ["", "Network ms per forward (batch 2 = real + imaginary of one slice; median, CUDA events on a GPU):",
              "| prior | res | fp32 | bf16 | compiled bf16 |", "| --- | --- | --- | --- | --- |"]
        keys = sorted({(n["prior"], n["res"]) for n in net}, key=lambda k: (k[0] != "new", k[1]))
        for prior, res in keys:
            cell = {n["mode"]: n.get("ms") for n in net if n["prior"] == prior and n["res"] == res}
            L.append(f"| {prior} | {res}x{res} | {_f(cell.get('fp32'), '{:.2f}')} | {_f(cell.get('bf16'), '{:.2f}')} | "
                     f"{_f(cell.get('compiled'), '{:.2f}')} |")
    sp = measure.get("fast_speed", [])
    if sp:
        L += ["", "`fast` seconds per slice (reconstruct with maps=None: ESPIRiT + SENSE + sampler; median of 3 after "
              "a warm-up):", "| prior | matrix | coils | s / slice | NFE |", "| --- | --- | --- | --- | --- |"]
        for s in sp:
            L.append(f"| {s['prior']} | {s['shape'][0]}x{s['shape'][1]} | {s['coils']} | {s['s_per_slice']:.3f} | "
                     f"{s.get('nfe', '-')} |")
    for p in measure.get("paper", []):
        if "seconds" in p:
            L.append(f"`paper` N={p.get('steps')} on {p.get('case')} with the {p['prior']} prior: {p['seconds']:.1f} s, "
                     f"PSNR fg {_f(p.get('psnr_fg'))} dB")
    bt = measure.get("batched")
    if bt:
        L.append(f"batched series: {bt['slices']} slices {bt['shape'][0]}x{bt['shape'][1]} {bt['coils']} coils in "
                 f"{bt['seconds']:.2f} s = {bt['slices_per_s']:.1f} slices/s (one by one: "
                 f"{_f(bt.get('one_by_one_slices_per_s'), '{:.1f}')} slices/s)")
    elif measure.get("batched_note"):
        L.append(f"batched series: {measure['batched_note']}")
    L += ["", "Goals (issue 10 item 3), new prior:", "| goal | figure reached | verdict |", "| --- | --- | --- |"]
    for g, fig, verdict in goal_rows(measure, card, "new"):
        L.append(f"| {g} | {fig} | {verdict} |")
    for s in measure.get("skipped", []):
        L.append(f"skipped: {s['stage']}: {s['reason']}")
    for e in measure.get("errors", []):
        L.append(f"ERROR in {e['stage']}: {e['error']}")
    return "\n".join(L)
