"""Image quality through raw files on visible real anatomy, beside SENSE and BART; prints one table.

Every case is a raw file: ``scoremri simulate``'s functions (``simulate`` + ``write_raw``: smooth random phase,
birdcage coils, a line mask, complex noise, a noise scan, readout oversampling) write it, and ``scoremri
replay``'s function (``replay``: noise prewhitening, RemoveROOversampling, Gadgetron's buffering, ESPIRiT maps,
the slice orchestrator, images written and read back) reconstructs it, so the whole chain is in the loop.
BART runs on exactly the k-space replay reconstructs (the same chain functions: ``read_raw`` ->
``noise_prewhitener`` -> ``preprocess`` -> ``iter_recon_data``), with its own maps:
``ecalib -m1 -r 24`` (the ACS width when smaller), ``pics -d0 -S -l1 -r LAMBDA`` at its best LAMBDA of
{0.003, 0.01, 0.03} (best by PSNR inside the object) and ``pics -d0 -S -l2 -r 0.01``; OMP_NUM_THREADS=1.

Data (evaluation only, never trained on). TUNE set (defaults are chosen on it): dipy ``t1_coronal_slice.npy``
(256x256), nibabel ``example4d.nii.gz`` volume 0, axial slices 9/12/15 (128x96). REPORT set (reported only):
insighttoolkit5-examples ``KmeansTest_T1UCharRaw.nii.gz`` (a real T1 head, 2x2x3 mm: two axial slices
128x128, two coronal and two sagittal slices resampled to ~2 mm, 128x94), ``BrainMidSagittalSlice.png``
(180x216) and ``FatMRISlice.png`` (abdomen, out of distribution: reported, not a target).

Settings, one factor at a time around ``base`` (1-D random x4, 8 coils, 24 ACS lines -- 12 below 192 lines,
where 24 would not leave room for x8 --, readout oversampling 2, noise sigma 0.005 per part relative to the
image maximum 1): ``x8``, ``equi3`` (equispaced x3), ``c16`` (16 coils), ``os1`` (no oversampling),
``noise`` (sigma 0.02). ``base`` on every slice, the others on one slice per source (``VARIANT_SLICES``).

Methods: ``zero_filled``, ``sense`` (the project's), ``bart_l1``, ``bart_l2``, ``fast`` (the default preset),
``uncertainty`` (its mean of K samples), and any ``--provider`` column. Metrics: ``recon.metrics.evaluate``
(one least-squares scale on magnitude, both divided by max|gt|; PSNR/SSIM on the whole image and inside
the object). Seconds per slice are CPU seconds (process time, one thread; BART's child processes
included), which a busy shared machine distorts far less than wall time. ``fb`` counts slices the
sanity fallback (recon/sanity.py) sent as SENSE. Targets (issue 11), with the fallback off: ``fast`` >=
``sense`` + 1 dB on every case, >= ``bart_l1`` on every brain case (PSNR inside the object).

``--ablate`` runs variants of ``fast`` (starting sigma, warm start, DC weight and iterations, scale
percentile, final estimate, eta, posterior mean of K samples, steps) on the TUNE set only and prints the
mean PSNR inside the object per variant: the defaults of recon/config.py are chosen from it.

Extension point: ``--provider MODULE:NAME`` (or ``path/to/file.py:NAME``) adds a column from any callable
``provider(raw: Path, workdir: Path) -> ProviderOutput`` (images (S, ny, nx) in slice order, CPU seconds,
a note); its attribute ``name`` (default NAME) titles the column. (Gadgetron's GRAPPA chain is not one: it
needs a regular pattern with flagged calibration lines, so benchmarks/grappa.py runs it on its own files.)

    OMP_NUM_THREADS=1 nice python benchmarks/quality.py --quick          # TUNE subset, <= 5 min on 2 cores
    OMP_NUM_THREADS=1 nice python benchmarks/quality.py --jobs 2         # the full table, <= 60 min
                                                  # (REPORT set: scripts/system-deps.sh --bench first)
    OMP_NUM_THREADS=1 nice python benchmarks/quality.py --ablate --quick # ablations on the quick subset
"""
from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.util
import logging
import os
import resource
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Protocol

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

log = logging.getLogger("benchmarks.quality")

ITK_DATA = Path("/usr/share/doc/insighttoolkit5-examples/examples/Data")
METHODS = ("zero_filled", "sense", "bart_l1", "bart_l2", "fast", "uncertainty")
BART_L1_LAMBDAS = (0.003, 0.01, 0.03)
SMALL_ACS = 12  # ACS lines below 192 phase-encoding lines (BART ecalib needs > 10; 24 leave no room for x8)


# ------------------------------------------------------------------------------------------------- data
@dataclass(frozen=True)
class Setting:
    """One acquisition: mask kind and true acceleration, coils, readout oversampling, noise per part."""

    name: str
    mask: str = "random"
    accel: float = 4.0
    coils: int = 8
    ro_os: int = 2
    sigma: float = 0.005


BASE = Setting("base")
SETTINGS = {s.name: s for s in (
    BASE,
    replace(BASE, name="x8", accel=8.0),
    replace(BASE, name="equi3", mask="equispaced", accel=3.0),
    replace(BASE, name="c16", coils=16),
    replace(BASE, name="os1", ro_os=1),
    replace(BASE, name="noise", sigma=0.02),
)}


@dataclass
class Source:
    """Slices of one visible image source: name, set (TUNE | REPORT), anatomy, [(label, magnitude (ny, nx))]."""

    name: str
    role: str
    anatomy: str
    slices: list[tuple[str, np.ndarray]]


def _norm(mag: np.ndarray) -> np.ndarray:
    mag = np.abs(np.asarray(mag, dtype=np.float64))
    return (mag / mag.max()).astype(np.float32)


def _nifti(path: Path) -> np.ndarray:
    import nibabel

    return np.asarray(nibabel.load(str(path)).dataobj, dtype=np.float64)


def _dipy() -> list[tuple[str, np.ndarray]]:
    from scoremri.model.publish import dipy_slice

    return [("cor", dipy_slice())]


def _example4d() -> list[tuple[str, np.ndarray]]:
    import nibabel

    vol = _nifti(Path(nibabel.__file__).parent / "tests" / "data" / "example4d.nii.gz")[..., 0]  # volume 0
    return [(f"ax{z}", _norm(vol[:, :, z])) for z in (9, 12, 15)]  # (128, 96)


def _itk_t1(orientation: str) -> list[tuple[str, np.ndarray]]:
    """KmeansTest_T1UCharRaw (128, 128, 62) at 2 x 2 x 3 mm: axial slices as they are, coronal/sagittal with the
    3 mm axis resampled (linear) to 94 pixels of 1.98 mm, so the pixels are about square and the readout even
    (an odd matrix puts BART's k-space centre elsewhere than ours: scanners acquire even matrices)."""
    from scipy.ndimage import zoom

    vol = _nifti(ITK_DATA / "KmeansTest_T1UCharRaw.nii.gz")
    if orientation == "ax":
        return [(f"ax{k}", _norm(vol[:, :, k])) for k in (28, 38)]
    axis = 1 if orientation == "cor" else 0
    out = []
    for k in (56, 72) if orientation == "cor" else (50, 70):
        sl = np.take(vol, k, axis=axis)  # (128, 62)
        out.append((f"{orientation}{k}", _norm(np.clip(zoom(sl, (1.0, 94 / 62), order=1), 0, None))))
    return out


def _png(name: str, crop_x: int | None = None) -> list[tuple[str, np.ndarray]]:
    from PIL import Image

    img = np.asarray(Image.open(ITK_DATA / name).convert("F"), dtype=np.float64)
    if crop_x is not None:
        x0 = (img.shape[1] - crop_x) // 2
        img = img[:, x0:x0 + crop_x]
    return [("png", _norm(img))]


SOURCES: dict[str, tuple[str, str, Callable[[], list[tuple[str, np.ndarray]]]]] = {
    "dipy": ("TUNE", "brain", _dipy),
    "ex4d": ("TUNE", "brain", _example4d),
    "itk_ax": ("REPORT", "brain", lambda: _itk_t1("ax")),
    "itk_cor": ("REPORT", "brain", lambda: _itk_t1("cor")),
    "itk_sag": ("REPORT", "brain", lambda: _itk_t1("sag")),
    "itk_midsag": ("REPORT", "brain", lambda: _png("BrainMidSagittalSlice.png", crop_x=216)),  # even readout
    "itk_fat": ("REPORT", "abdomen", lambda: _png("FatMRISlice.png")),
}
VARIANT_SLICES = {"dipy": 0, "ex4d": 1, "itk_ax": 0, "itk_sag": 0, "itk_midsag": 0, "itk_fat": 0}
QUICK = [("dipy", "base"), ("ex4d", "base"), ("dipy", "x8")]  # --quick: TUNE only
QUICK_SLICES = {"ex4d": [1]}


def load_source(name: str) -> Source:
    role, anatomy, loader = SOURCES[name]
    if name.startswith("itk_") and not ITK_DATA.is_dir():
        raise SystemExit(f"source {name}: {ITK_DATA} is missing (scripts/system-deps.sh --bench installs "
                         "insighttoolkit5-examples), "
                         "or leave it out with --sources / --set-role TUNE")
    return Source(name, role, anatomy, loader())


@dataclass
class Case:
    """One raw file: a source's slices under one setting."""

    source: str
    role: str
    anatomy: str
    setting: Setting
    labels: list[str]
    mags: np.ndarray  # (S, ny, nx) float32, each slice max 1
    seed: int

    @property
    def name(self) -> str:
        return f"{self.source}/{self.setting.name}"

    @property
    def acs(self) -> int:
        return 24 if self.mags.shape[1] >= 192 else SMALL_ACS


def make_cases(sources: list[str], settings: list[str], quick: bool = False, max_slices: int = 0) -> list[Case]:
    """The cases of the table: ``base`` on every slice, the other settings on VARIANT_SLICES (``--quick``:
    QUICK); at most ``max_slices`` slices per case when > 0."""
    out = []
    pairs = QUICK if quick else [(s, g) for s in sources for g in settings]
    loaded: dict[str, Source] = {}
    for src, setting in pairs:
        if src not in sources or setting not in settings:
            continue
        if src not in loaded:
            loaded[src] = load_source(src)
        s = loaded[src]
        idx = list(range(len(s.slices)))
        if quick and src in QUICK_SLICES:
            idx = QUICK_SLICES[src]
        if setting != "base":
            if src not in VARIANT_SLICES:
                continue
            idx = [VARIANT_SLICES[src]] if not quick else idx[:1]
        if max_slices > 0:
            idx = idx[:max_slices]
        seed = int(hashlib.sha256(f"{src}/{setting}".encode()).hexdigest()[:8], 16)
        out.append(Case(src, s.role, s.anatomy, SETTINGS[setting], [s.slices[i][0] for i in idx],
                        np.stack([s.slices[i][1] for i in idx]), seed))
    return out


def write_case(case: Case, path: Path) -> tuple[np.ndarray, float]:
    """Simulate the case's raw file; returns the ground truth (S, ny, nx) complex64 in whitened units (as
    ``read_ground_truth`` reads it back) and the mask's true acceleration."""
    from scoremri.gadget.files.simulate import simulate, write_raw

    st = case.setting
    sim = simulate(case.mags, coils=st.coils, accel=st.accel, mask_kind=st.mask, acs=case.acs, sigma=st.sigma,
                   seed=case.seed, ro_oversampling=st.ro_os)
    write_raw(path, sim, attrs={"source_image": case.name})
    return sim["phantom"], float(sim["mask"].size / sim["mask"].sum())


# ------------------------------------------------------------------------------------------- the chain
def chain_kspace(raw: Path) -> tuple[list[tuple[int, np.ndarray]], dict[str, Any]]:
    """The k-space replay reconstructs, from the same chain functions: [(slice, kspace (C, ky, kx))] whitened,
    readout oversampling removed, zeros where not measured; and the noise report (its ``scale`` s gives the
    whitened noise: complex variance s^2)."""
    from scoremri.gadget.files.rawfile import read_raw
    from scoremri.gadget.gadgetron.buffers import iter_recon_data
    from scoremri.gadget.gadgetron.pipeline import read_pipeline
    from scoremri.gadget.gadgetron.preprocess import noise_prewhitener, preprocess

    spec = read_pipeline(None)
    _, header, acqs = read_raw(raw)
    W, noise = noise_prewhitener(acqs, header, source=str(raw))
    lines = preprocess(acqs, header, W, remove_oversampling=spec.remove_ro_oversampling)
    out = []
    for rd in iter_recon_data(lines, header, spec):
        for bit in rd.bits:
            data = np.asarray(bit.data.data)  # (RO, E1, E2, CHA, N, S, LOC)
            heads = np.asarray(bit.data.headers, dtype=object)
            first = next(h for h in heads.flat if h is not None and int(h.number_of_samples) > 0)
            out.append((int(first.idx.slice), np.ascontiguousarray(data[:, :, 0, :, 0, 0, 0].transpose(2, 1, 0))))
    return sorted(out, key=lambda t: t[0]), noise


def _cpu() -> float:
    """CPU seconds of this process and its waited-for children (BART)."""
    ch = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + ch.ru_utime + ch.ru_stime


@dataclass
class Run:
    """One method on one case: images (S, ny, nx), CPU seconds per slice, fallbacks, notes."""

    method: str
    images: list[np.ndarray]
    seconds: float
    fallbacks: int = 0
    note: str = ""
    stds: list[np.ndarray] | None = None
    rho: list[float | None] | None = None  # sanity residual ratio per slice (recon/sanity.py)


def run_replay(raw: Path, work: Path, tag: str, preset: str, overrides: dict[str, str] | None = None,
               device: str = "cpu") -> Run:
    """``scoremri replay`` of the raw file (the Python function), images read back from the written file."""
    from scoremri.gadget.files.rawfile import read_images
    from scoremri.gadget.files.replay import replay

    out = work / f"{tag}.h5"
    if out.exists():
        out.unlink()
    t0 = _cpu()
    res = replay(raw, out, preset=preset, overrides=overrides, device=device, progress=False)
    secs = _cpu() - t0
    series = read_images(out)
    imgs = sorted(series[1], key=lambda im: int(im.slice))
    stds = sorted(series[2], key=lambda im: int(im.slice)) if 2 in series else None
    rep = res["report"]
    out.unlink()
    rho = {int(s["slice"].split()[1]): s.get("residual_ratio") for s in rep.get("sanity", [])}
    return Run(tag, [np.asarray(im.data)[0, 0] for im in imgs], secs / max(len(imgs), 1),
               len(rep["fallbacks"]), "; ".join(sorted({f["reason"][:80] for f in rep["fallbacks"]})),
               None if stds is None else [np.asarray(im.data)[0, 0].real for im in stds],
               [rho.get(int(im.slice)) for im in imgs] if rho else None)


def run_bart(raw: Path, gts: np.ndarray, acs: int) -> tuple[Run, Run]:
    """BART l1 at its best lambda (by PSNR inside the object, summed over slices) and BART l2, each with its
    own ``ecalib -m1 -r ACS`` maps; seconds = ecalib + one pics call."""
    from scoremri.gadget.testing.bart import ecalib, pics_l1, pics_sense
    from scoremri.recon.metrics import evaluate, foreground_mask

    ks, _ = chain_kspace(raw)
    l1: dict[float, list[np.ndarray]] = {lam: [] for lam in BART_L1_LAMBDAS}
    l2, t_cal, t_l1, t_l2 = [], 0.0, dict.fromkeys(BART_L1_LAMBDAS, 0.0), 0.0
    for _, k in ks:
        t0 = _cpu()
        maps = ecalib(k, calib=min(24, acs))
        t_cal += _cpu() - t0
        for lam in BART_L1_LAMBDAS:
            t0 = _cpu()
            l1[lam].append(pics_l1(k, maps, lam))
            t_l1[lam] += _cpu() - t0
        t0 = _cpu()
        l2.append(pics_sense(k, maps, 0.01))
        t_l2 += _cpu() - t0
    score = {lam: sum(evaluate(x, g, foreground_mask(g))["psnr_fg"] for x, g in zip(l1[lam], gts))
             for lam in BART_L1_LAMBDAS}
    best = max(score, key=score.get)
    n = max(len(ks), 1)
    return (Run("bart_l1", l1[best], (t_cal + t_l1[best]) / n, note=f"lambda {best}"),
            Run("bart_l2", l2, (t_cal + t_l2) / n))


class ProviderOutput(Protocol):
    images: Any  # (S, ny, nx) in slice order, any units (the metric fits one scale)
    seconds: float  # CPU seconds per slice
    note: str


class RowProvider(Protocol):
    """An external column: ``provider(raw, workdir) -> ProviderOutput``; optional attribute ``name``."""

    def __call__(self, raw: Path, workdir: Path) -> ProviderOutput: ...


def load_provider(spec: str) -> tuple[str, RowProvider]:
    """``module:NAME`` or ``path/to/file.py:NAME`` -> (column name, callable)."""
    target, _, attr = spec.rpartition(":")
    if not target or not attr:
        raise SystemExit(f"--provider {spec}: expected MODULE:NAME or path/to/file.py:NAME")
    if target.endswith(".py"):
        p = Path(target)
        sys.path.insert(0, str(p.resolve().parent))
        mod_spec = importlib.util.spec_from_file_location(p.stem, p)
        if mod_spec is None or mod_spec.loader is None:
            raise SystemExit(f"--provider {spec}: cannot import {p}")
        mod = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(mod)
    else:
        mod = importlib.import_module(target)
    fn = getattr(mod, attr)
    return str(getattr(fn, "name", attr)), fn


# ----------------------------------------------------------------------------------------------- scoring
@dataclass
class Row:
    case: str
    role: str
    anatomy: str
    setting: str
    slice: str
    shape: tuple[int, int]
    accel: float
    method: str
    psnr: float
    ssim: float
    psnr_fg: float
    ssim_fg: float
    seconds: float
    fallbacks: int = 0
    note: str = ""
    extra: dict[str, float] = field(default_factory=dict)


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel() - a.mean(), b.ravel() - b.mean()
    return float((a @ b) / max(np.sqrt((a @ a) * (b @ b)), 1e-30))


def score(case: Case, gts: np.ndarray, run: Run, accel: float) -> list[Row]:
    from scoremri.recon.metrics import evaluate, foreground_mask, scale_to

    rows = []
    if len(run.images) != len(gts):
        raise RuntimeError(f"{case.name} {run.method}: {len(run.images)} images for {len(gts)} slices")
    for s, (img, gt) in enumerate(zip(run.images, gts)):
        fg = foreground_mask(gt)
        m = evaluate(img, gt, fg)
        note, extra = run.note, {}
        if run.rho is not None and run.rho[s] is not None:
            extra["rho"] = run.rho[s]
            note = (note + " " if note else "") + f"rho {run.rho[s]:.2f}"
        if run.stds is not None:  # does the std map say where the error is?
            xs, gs, a = scale_to(img, gt)
            err, sd = np.abs(xs - gs), a * run.stds[s] / np.abs(gt).max()
            extra = {"r_std_err_fg": pearson(err[fg], sd[fg])}
            note = (note + " " if note else "") + f"r(std,err) fg {extra['r_std_err_fg']:.2f}"
        rows.append(Row(case.name, case.role, case.anatomy, case.setting.name, case.labels[s], gt.shape, accel,
                        run.method, m["psnr"], m["ssim"], m["psnr_fg"], m["ssim_fg"], run.seconds,
                        run.fallbacks if s == 0 else 0, note, extra))
    return rows


# ------------------------------------------------------------------------------------------------ running
@dataclass
class Job:
    case: Case
    methods: list[str]
    variants: dict[str, dict[str, str]]  # fast variants (--ablate): name -> overrides
    overrides: dict[str, str]  # for the learned methods (e.g. model.path)
    providers: list[str]
    device: str
    keep: str | None


def run_job(job: Job) -> list[Row]:
    """Simulate one case, run every method / variant on it, score; runs in a worker process."""
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    logging.getLogger("scoremri").setLevel(logging.WARNING)
    case = job.case
    with tempfile.TemporaryDirectory(prefix="scoremri-quality-") as tmp:
        work = Path(tmp)
        raw = work / "raw.h5"
        gts, accel = write_case(case, raw)
        if job.keep:
            Path(job.keep).mkdir(parents=True, exist_ok=True)
            shutil.copy(raw, Path(job.keep) / f"{case.source}_{case.setting.name}.h5")
        runs: list[Run] = []
        for meth in job.methods:
            t0 = time.time()
            if meth in ("bart_l1", "bart_l2"):
                if meth == "bart_l1" or "bart_l1" not in job.methods:
                    runs += [r for r in run_bart(raw, gts, case.acs) if r.method in job.methods]
            elif meth in ("zero_filled", "sense"):
                runs.append(run_replay(raw, work, meth, meth, device=job.device))
            elif meth in ("fast", "uncertainty"):
                runs.append(run_replay(raw, work, meth, meth, dict(job.overrides), device=job.device))
                if runs[-1].fallbacks:  # targets are measured with the fallback off
                    off = run_replay(raw, work, meth, meth, {**job.overrides, "sampler.sanity": "false"},
                                     device=job.device)
                    runs.append(replace(off, method=f"{meth} (no fb)"))
            elif meth == "pc":
                runs.append(run_replay(raw, work, "pc", "paper", dict(job.overrides), device=job.device))
            else:
                raise SystemExit(f"unknown method {meth}")
            log.info("%s %s: %.1f s wall", case.name, meth, time.time() - t0)
        for name, over in job.variants.items():
            t0 = time.time()
            runs.append(run_replay(raw, work, name, "fast", {**job.overrides, **over}, device=job.device))
            log.info("%s %s: %.1f s wall", case.name, name, time.time() - t0)
        for spec in job.providers:
            pname, fn = load_provider(spec)
            out = fn(raw, work)
            runs.append(Run(pname, [np.asarray(x) for x in out.images], float(out.seconds), note=str(out.note)))
    rows = []
    for r in runs:
        rows += score(case, gts, r, accel)
    return rows


ABLATIONS: dict[str, dict[str, str]] = {
    # starting point: sigma of the CCDF warm start from SENSE (prior units), or pure noise from sigma_max
    "start_sigma=0.05": {"sampler.start_sigma": "0.05"},
    "start_sigma=0.2": {"sampler.start_sigma": "0.2"},
    "start_sigma=0.4": {"sampler.start_sigma": "0.4"},
    "start=noise,steps=50": {"sampler.start": "noise", "sampler.start_sigma": "1.0", "sampler.steps": "50"},
    # data consistency: the fixed proximal weight of before (dc_rho 0 -> dc_lam), the noise-aware weight's
    # rho, floor and cap, and the CG steps per call
    "dc_rho=0 (dc_lam 0.5)": {"sampler.dc_rho": "0"},
    "dc_rho=0,dc_lam=0.1": {"sampler.dc_rho": "0", "sampler.dc_lam": "0.1"},
    "dc_rho=0.35": {"sampler.dc_rho": "0.35"},
    "dc_rho=0.7": {"sampler.dc_rho": "0.7"},
    "dc_lam_min=0": {"sampler.dc_lam_min": "0"},
    "dc_lam_max=16": {"sampler.dc_lam_max": "16"},
    "dc_iters=2": {"sampler.dc_iters": "2"},
    "dc_iters=10": {"sampler.dc_iters": "10"},
    # the prior's scale: percentile of |SENSE| (a noisy background pulls it)
    "scale_percentile=99": {"sampler.scale_percentile": "99"},
    "scale_percentile=100": {"sampler.scale_percentile": "100"},
    # the last estimate: data-consistent x0 (default) or the plain Tweedie denoise
    "final=denoise": {"sampler.final": "denoise"},
    # stochasticity (eta 1 = ancestral, 0 = deterministic) and the posterior mean of K samples
    "eta=0": {"sampler.eta": "0"},
    "eta=0.5": {"sampler.eta": "0.5"},
    "samples=4 (mean)": {"sampler.samples": "4"},
    "steps=12": {"sampler.steps": "12"},
    "steps=30": {"sampler.steps": "30"},
}


# ------------------------------------------------------------------------------------------------ output
def fmt_table(rows: list[Row]) -> str:
    out = [f"| {'case':20s} | set | {'slice':8s} | {'size':7s} | {'R':4s} | {'method':22s} | PSNR  | SSIM  | "
           "PSNR fg | SSIM fg | s/slice | fb | notes", "|" + "|".join("-" * w for w in (
               22, 5, 10, 9, 6, 24, 7, 7, 9, 9, 9, 4, 7))]
    for r in rows:
        out.append(f"| {r.case:20s} | {r.role[0]:3s} | {r.slice:8s} | {r.shape[0]:3d}x{r.shape[1]:<3d} | "
                   f"{r.accel:4.1f} | {r.method:22s} | {r.psnr:5.2f} | {r.ssim:.3f} | {r.psnr_fg:7.2f} | "
                   f"{r.ssim_fg:.3f} | {r.seconds:7.2f} | {r.fallbacks:2d} | {r.note}")
    return "\n".join(out)


def summary(rows: list[Row], methods: list[str]) -> str:
    """PSNR inside the object per case and method side by side, the target verdicts, and means per set."""
    cols = [m for m in dict.fromkeys(r.method for r in rows)]
    key = lambda r: (r.case, r.slice)  # noqa: E731
    cases: dict[tuple[str, str], dict[str, Row]] = {}
    for r in rows:
        cases.setdefault(key(r), {})[r.method] = r
    head = "| case / slice (set, anatomy)           | " + " | ".join(f"{c[:13]:>13s}" for c in cols) + " | targets"
    out = ["PSNR inside the object (dB):", head, "|" + "-" * 40 + "|" + "|".join("-" * 15 for _ in cols) + "|-----"]
    verdict = {"sense+1": [], "bart_l1": []}
    for (case, sl), by in cases.items():
        r0 = next(iter(by.values()))
        fast = by.get("fast (no fb)", by.get("fast"))
        marks = []
        if fast is not None and "sense" in by:
            d = fast.psnr_fg - by["sense"].psnr_fg - 1.0
            verdict["sense+1"].append((d, f"{case}/{sl}"))
            marks.append(f"S+1 {'ok' if d >= 0 else 'MISS'} ({d:+.2f})")
        if fast is not None and "bart_l1" in by and r0.anatomy == "brain":
            d = fast.psnr_fg - by["bart_l1"].psnr_fg
            verdict["bart_l1"].append((d, f"{case}/{sl}"))
            marks.append(f"pics {'ok' if d >= 0 else 'MISS'} ({d:+.2f})")
        cells = " | ".join(f"{by[c].psnr_fg:13.2f}" if c in by else f"{'':13s}" for c in cols)
        out.append(f"| {case + '/' + sl + f' ({r0.role}, {r0.anatomy})':38s} | {cells} | {', '.join(marks)}")
    for role in ("TUNE", "REPORT"):
        sel = [by for by in cases.values() if next(iter(by.values())).role == role]
        if not sel:
            continue
        means = []
        for c in cols:
            v = [by[c].psnr_fg for by in sel if c in by]
            means.append(f"{np.mean(v):13.2f}" if len(v) == len(sel) else f"{'':13s}")
        out.append(f"| {'mean ' + role + f' ({len(sel)} slices)':38s} | " + " | ".join(means) + " |")
    out.append("")
    for name, vals in verdict.items():
        if vals:
            miss = [f"{n} {d:+.2f}" for d, n in sorted(vals) if d < 0]
            what = "fast >= SENSE + 1 dB (every case)" if name == "sense+1" else "fast >= BART pics l1 (brain cases)"
            out.append(f"target {what}: {len(vals) - len(miss)}/{len(vals)} met; worst margin "
                       f"{min(vals)[0]:+.2f} dB" + (f"; missed: {', '.join(miss)}" if miss else ""))
    fb = [r for r in rows if r.method in ("fast", "uncertainty")]
    if fb:
        out.append(f"sanity fallback fired on {sum(r.fallbacks for r in fb)} of {len(fb)} learned slices "
                   f"(fast + uncertainty)")
    return "\n".join(out)


def ablation_table(rows: list[Row], variants: list[str]) -> str:
    base = [r for r in rows if r.method == "fast"]
    by_var: dict[str, list[Row]] = {v: [r for r in rows if r.method == v] for v in ["fast", *variants]}
    labels = [f"{r.case}/{r.slice}" for r in base]
    out = ["Ablations of fast on the TUNE set (PSNR inside the object, dB; delta = mean difference to the "
           "defaults):", "| variant                   | mean  | delta | min delta | " + " | ".join(
               f"{x[:16]:>16s}" for x in labels), "|" + "-" * 27 + "|-------|-------|-----------|" +
           "|".join("-" * 18 for _ in labels)]
    b = np.array([r.psnr_fg for r in base])
    for v, rs in by_var.items():
        if len(rs) != len(base):
            continue
        p = np.array([r.psnr_fg for r in rs])
        out.append(f"| {('defaults' if v == 'fast' else v):25s} | {p.mean():5.2f} | {(p - b).mean():+5.2f} | "
                   f"{(p - b).min():+9.2f} | " + " | ".join(f"{x:16.2f}" for x in p))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="TUNE subset: dipy base and x8, one example4d slice")
    ap.add_argument("--sources", nargs="+", default=list(SOURCES), choices=list(SOURCES))
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--set-role", default=None, choices=("TUNE", "REPORT"), help="only the cases of one set")
    ap.add_argument("--methods", nargs="+", default=list(METHODS),
                    help=f"columns (default: {' '.join(METHODS)}; 'pc' adds the paper preset)")
    ap.add_argument("--ablate", action="store_true", help="fast variants on the TUNE set (see ABLATIONS)")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME:K=V,K=V",
                    help="a fast variant of your own (repeatable), e.g. 'mine:sampler.eta=0,sampler.steps=30'")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                    help="override for the learned methods, e.g. model.path=runs/x/model.safetensors")
    ap.add_argument("--provider", action="append", default=[], metavar="MODULE:NAME",
                    help="an external column (see the module doc): path/to/file.py:NAME or MODULE:NAME")
    ap.add_argument("--max-slices", type=int, default=0, help="at most N slices per case (0 = all)")
    ap.add_argument("--jobs", type=int, default=1, help="worker processes (one thread each)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--keep", default=None, metavar="DIR", help="keep the simulated raw files in DIR")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    logging.getLogger("scoremri").setLevel(logging.WARNING)
    from scoremri.recon.config import parse_overrides

    over = parse_overrides(args.set)
    variants: dict[str, dict[str, str]] = {}
    if args.ablate:
        variants.update(ABLATIONS)
        args.set_role = "TUNE"
        args.methods = [m for m in args.methods if m in ("fast",)] or ["fast"]
    for v in args.variant:
        name, _, kv = v.partition(":")
        variants[name] = parse_overrides(kv.split(",")) if kv else {}
    t0 = time.time()
    cases = make_cases(args.sources, args.settings, args.quick, args.max_slices)
    if args.set_role:
        cases = [c for c in cases if c.role == args.set_role]
    jobs = [Job(c, args.methods, variants, over, args.provider, args.device, args.keep) for c in cases]
    # biggest first so two workers finish together
    jobs.sort(key=lambda j: -j.case.mags.size * j.case.setting.coils)
    rows: list[Row] = []
    log.info("%d cases (%d slices), %d worker(s)", len(jobs), sum(len(j.case.labels) for j in jobs), args.jobs)
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs) as ex:
            for job, res in zip(jobs, ex.map(run_job, jobs)):
                rows += res
                log.info("done %s (%.0f s so far)", job.case.name, time.time() - t0)
    else:
        for job in jobs:
            rows += run_job(job)
            log.info("done %s (%.0f s so far)", job.case.name, time.time() - t0)
    order = {c.name: i for i, c in enumerate(cases)}
    pos = {(c.name, lab): i for c in cases for i, lab in enumerate(c.labels)}
    rows.sort(key=lambda r: (order[r.case], pos[(r.case, r.slice)]))  # stable: methods keep their order
    import torch

    print(f"# scoremri quality benchmark (issue 11): raw files -> replay; {len(cases)} cases, "
          f"{len({(r.case, r.slice) for r in rows})} slices; device {args.device}, "
          f"{os.environ.get('OMP_NUM_THREADS')} thread(s) per worker, {args.jobs} worker(s); "
          f"{(time.time() - t0) / 60:.1f} min wall; torch {torch.__version__}")
    if over:
        print(f"# learned methods with {over}")
    print()
    main_rows = [r for r in rows if r.method not in variants]
    print(fmt_table(main_rows))
    print()
    print(summary(main_rows, args.methods))
    if variants:
        print()
        print(ablation_table(rows, list(variants)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
