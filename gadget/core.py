"""The shared slice orchestrator: buffered k-space (Gadgetron ReconData) in, ISMRMRD images out.

Every wing calls it (the Gadgetron gadget and its connect-mode server, offline replay, the MRD server), so
every path gives the same pixels. It holds no math: it finds mask and calibration, caches coil maps per slice
location, derives per-slice seeds, calls only :func:`scoremri.recon.api.reconstruct_batch`, falls back to
SENSE where a learned method fails or runs out of time, crops to the recon matrix and builds the images
(:mod:`.images`). The data flow of one slice is in ARCHITECTURE.md.

Batches: :meth:`ReconCore.process_many` takes every ReconData that is ready (all slices of a buffer, or the
window of a series that arrived while the previous batch ran) and reconstructs up to ``max_batch`` slices in
one sampler run; images come out slice by slice, in order, as their batch finishes. A slice's image does not
depend on the batch it ran in (per-slice seeds, maps and scales). Time limits, both WARNINGs and labelled
SENSE fallbacks: ``sampler.slice_deadline_s`` (per slice, checked inside the sampler between network calls;
a batch of B slices gets B times it) and ``sampler.time_budget_s`` (per series, checked before each batch).

Buffer layout (Gadgetron): ``data`` (RO, E1, E2, CHA, N, S, LOC) complex64, ``headers`` (E1, E2, N, S, LOC)
AcquisitionHeaders (acquired lines have ``number_of_samples > 0``), optional ``ref`` of the same layout.
Our layout: k-space (C, ky=E1, kx=RO).
"""
from __future__ import annotations

import copy
import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import ismrmrd
import numpy as np
import torch

from scoremri.recon.api import ReconError, Result, SliceDeadlineExceeded, reconstruct_batch, resolve_device
from scoremri.recon.config import ReconConfig
from scoremri.recon.fft import fft1c, ifft1c
from scoremri.recon.methods import needs_prior

from .images import (IMTYPE_COMPLEX, IMTYPE_MAGNITUDE, ROLE_STD, Label, is_ai_generated, magnitude_pixels,
                     make_image, scoremri_version)

log = logging.getLogger(__name__)

MIN_CENTRE_LINES = 4  # without ref: fewer contiguous acquired lines around the k-space centre -> no calibration
# slices per sampler run when max_batch = 0: on CPU a run of 2 or 4 slices costs the same per slice as one
# (benchmarks/throughput.py: 6.16 / 6.18 / 6.11 CPU s per 256x256 8-coil slice), so one by one, which gives
# the first images sooner; on CUDA a batch fills the GPU
AUTO_BATCH = {"cpu": 1, "cuda": 16}


def auto_batch(device: torch.device) -> int:
    """Slices per sampler run for ``max_batch = 0`` on this device."""
    return AUTO_BATCH.get(device.type, 1)


def load_prior(config: ReconConfig, device: torch.device) -> Any:
    """Load the score model of ``config.model`` once; any failure -> ReconError naming the file."""
    from scoremri.model.score import load_score_model

    path = config.model.path or "<default model>"
    try:
        return load_score_model(config.model, device)
    except ReconError:
        raise
    except Exception as e:
        raise ReconError(f"cannot load the score model '{path}': {type(e).__name__}: {e}") from e


def slice_seed(base: int, slice_: int, contrast: int, phase: int, repetition: int, set_: int) -> int:
    """Deterministic per-slice seed from the base seed and the slice counters (order of arrival irrelevant)."""
    ss = np.random.SeedSequence([int(base) & 0xFFFFFFFF, slice_, contrast, phase, repetition, set_])
    # int() first: under numpy 1.x, uint64 & a Python int has no common integer type (TypeError)
    return int(ss.generate_state(1, dtype=np.uint64)[0]) & 0x7FFFFFFFFFFFFFFF


@dataclass
class SliceRecord:
    """What the core knows about one reconstructed slice, handed to an optional observer (replay's
    ``--compare`` runs the classical methods on the very same data). Arrays per z partition p:

    kspace[p] (C, ky, kx) complex64 whitened and masked, mask (ky, kx) bool, calib[p] (C, ky_c, kx) or None,
    maps[p] (C, ky, kx); image (z, ny, nx) complex64 and std (z, ny, nx) float32 or None after cropping;
    images: the ismrmrd images sent; crop(x) maps (z, ky, kx) encoded-size arrays to the sent matrix."""

    label: str
    kspace: list[np.ndarray]
    mask: np.ndarray
    calib: list[np.ndarray | None]
    maps: list[np.ndarray]
    seeds: list[int]
    image: np.ndarray
    std: np.ndarray | None
    method: str
    nfe: int
    images: list[ismrmrd.Image]
    crop: Any


@dataclass
class SeriesReport:
    """Per-series bookkeeping (returned by ``ReconCore.finish``)."""

    slices: int = 0
    images: int = 0
    seconds: float = 0.0
    nfe: int = 0
    fallbacks: list[dict[str, Any]] = field(default_factory=list)
    methods: dict[str, int] = field(default_factory=dict)
    stages: dict[str, float] = field(default_factory=dict)  # wall seconds by stage, summed over slices
    stages_cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds by stage
    batches: list[int] = field(default_factory=list)  # slices per sampler run
    sanity: list[dict[str, Any]] = field(default_factory=list)  # per learned slice: recon/sanity.py's verdict


@dataclass
class _Part:
    """One 2-D problem of a slice (3-D data: one per E2 partition): k-space (C, ky, kx), mask (ky, kx),
    calibration lines (C, ky_c, kx) or None, the maps-cache key (slice, partition) and the seed."""

    kspace: np.ndarray
    mask: np.ndarray
    calib: np.ndarray | None
    key: tuple[int, int]
    seed: int
    label: str
    result: Result | None = None


@dataclass
class _Slice:
    """A decoded slice waiting for its parts' results: label, centre header, sampling description."""

    label: str
    centre: Any
    sampling: Any
    parts: list[_Part]


class ReconCore:
    """Turns ReconData into images. One instance per scan (serve reuses the prior across instances).

    header: the scan's ismrmrd.xsd.ismrmrdHeader. config: a validated ReconConfig. device: auto|cpu|cuda.
    prior: an already loaded ScoreModel (serve mode); loaded here once when the method needs one.
    max_batch: most slices (2-D problems) per sampler run; 0 = :func:`auto_batch` for the device, 1 = one by one.
    observer: called with a :class:`SliceRecord` after each slice (before its images are yielded).
    noise_std: std per real/imaginary part of the whitened noise where the caller whitened the data itself
    (replay and the MRD server: ``preprocess.whitened_noise_std``, set once the prewhitener is known); None =
    unknown (inside Gadgetron): the sanity check then uses the sampler's estimate from the calibration data.
    """

    def __init__(self, header: Any, config: ReconConfig, *, device: str = "auto", prior: Any = None,
                 max_batch: int = 0, observer: Any = None, noise_std: float | None = None) -> None:
        self.header = header
        self.noise_std = noise_std
        self.observer = observer  # callable(SliceRecord) after each slice's images are made, or None
        self.config = config
        self.device = resolve_device(device)
        if max_batch < 0:
            raise ReconError(f"max_batch must be >= 0, got {max_batch}")
        self.max_batch = int(max_batch) or auto_batch(self.device)
        self.method = config.sampler.method
        self.prior = prior
        self.learned = needs_prior(self.method)
        if self.prior is None and self.learned:
            self.prior = load_prior(config, self.device)
        self.version = scoremri_version()
        self._maps: dict[tuple[int, int], np.ndarray] = {}
        self._image_index: dict[int, int] = {}
        self.report = SeriesReport()
        self._fallback_config = copy.deepcopy(config)
        self._fallback_config.sampler.method = "sense"

    # ------------------------------------------------------------------------------------------ public
    def process(self, recon_data: Any) -> Iterator[ismrmrd.Image]:
        """Yield the images of every ReconBit of one ReconData, slice by slice (earlier ones first)."""
        return self.process_many([recon_data])

    def process_many(self, items: Iterable[Any]) -> Iterator[ismrmrd.Image]:
        """Yield the images of several ReconData (those ready now), slice by slice in order, reconstructing
        up to ``max_batch`` slices per sampler run. Unusable input in a later slice raises only after the
        images of the earlier ones were yielded."""
        pending: list[_Slice] = []
        try:
            for recon_data in items:
                bits = list(getattr(recon_data, "bits", recon_data))
                if not bits:
                    raise ReconError("ReconData contains no ReconBit")
                for b, bit in enumerate(bits):
                    for sl in self._decode_bit(bit, b):
                        pending.append(sl)
        except Exception:
            yield from self._run(pending)  # what was received before the bad buffer is not lost
            raise
        yield from self._run(pending)

    def finish(self) -> dict[str, Any]:
        """Per-series report: slices, images, seconds, nfe, fallbacks (list of {slice, reason}), methods,
        stages / stages_cpu (wall / CPU seconds by stage), batches (slices per sampler run), sanity (per learned
        slice: {slice, residual_ratio, outside_fraction, ..., failed})."""
        r = self.report
        out = {
            "slices": r.slices,
            "images": r.images,
            "seconds": round(r.seconds, 4),
            "nfe": r.nfe,
            "fallbacks": list(r.fallbacks),
            "methods": dict(r.methods),
            "method": self.method,
            "device": str(self.device),
            "stages": {k: round(v, 4) for k, v in r.stages.items()},
            "stages_cpu": {k: round(v, 4) for k, v in r.stages_cpu.items()},
            "batches": list(r.batches),
            "sanity": list(r.sanity),
        }
        log.info(
            "series done: %d slices, %d images, %.2f s, NFE %d, %d fallbacks, %d sampler runs (%s s by stage)",
            r.slices, r.images, r.seconds, r.nfe, len(r.fallbacks), len(r.batches),
            ", ".join(f"{k} {v:.2f}" for k, v in r.stages.items()) or "no",
        )
        return out

    # ------------------------------------------------------------------------------------------ per bit
    def _decode_bit(self, bit: Any, b: int) -> Iterator[_Slice]:
        buf = getattr(bit, "data", None)
        if buf is None or getattr(buf, "data", None) is None:
            raise ReconError(f"ReconBit {b} has no data buffer")
        data = np.asarray(buf.data)
        if data.ndim != 7:
            raise ReconError(
                f"ReconBit {b}: data must have 7 dimensions (RO, E1, E2, CHA, N, S, LOC), got shape {data.shape}"
            )
        if not np.iscomplexobj(data):
            raise ReconError(f"ReconBit {b}: data must be complex, got {data.dtype}")
        nro, ne1, ne2, ncha, nn, ns, nloc = data.shape
        if min(data.shape) == 0:
            raise ReconError(f"ReconBit {b}: data has an empty dimension, shape {data.shape}")
        headers = np.asarray(buf.headers, dtype=object)
        if headers.shape != (ne1, ne2, nn, ns, nloc):
            raise ReconError(
                f"ReconBit {b}: headers shape {headers.shape} does not match data (E1, E2, N, S, LOC) "
                f"{(ne1, ne2, nn, ns, nloc)}"
            )
        ref = getattr(bit, "ref", None)
        ref_data = None if ref is None or getattr(ref, "data", None) is None else np.asarray(ref.data)
        if ref_data is not None:
            if ref_data.ndim != 7:
                raise ReconError(f"ReconBit {b}: ref must have 7 dimensions, got shape {ref_data.shape}")
            if ref_data.shape[3] != ncha:
                raise ReconError(f"ReconBit {b}: ref has {ref_data.shape[3]} coils but data has {ncha}")
        if ns > 1 and _s_is_average(headers):
            data, headers = _combine_averages(data, headers)
            ns = 1
        for loc in range(nloc):
            for s in range(ns):
                for n in range(nn):
                    yield self._decode_slice(buf, data, headers, ref, ref_data, n, s, loc)

    def _decode_slice(
        self, buf: Any, data: np.ndarray, headers: np.ndarray, ref: Any, ref_data: np.ndarray | None,
        n: int, s: int, loc: int,
    ) -> _Slice:
        hdr = headers[:, :, n, s, loc]  # (E1, E2)
        acquired = np.vectorize(_acquired, otypes=[bool])(hdr)
        if not acquired.any():
            raise ReconError(f"buffer (N={n}, S={s}, LOC={loc}) contains no acquired lines")
        sampling = buf.sampling
        centre = self._centre_header(hdr, acquired, sampling)
        label = (
            f"slice {centre.idx.slice} contrast {centre.idx.contrast} phase {centre.idx.phase} "
            f"repetition {centre.idx.repetition} set {centre.idx.set}"
        )
        # (RO, E1, E2, CHA) -> (CHA, E2, E1, RO)
        k = np.ascontiguousarray(data[:, :, :, :, n, s, loc].transpose(3, 2, 1, 0)).astype(np.complex64)
        acq_lines = k[:, acquired.T]  # (CHA, lines, RO)
        if not np.isfinite(acq_lines.view(np.float32)).all():
            raise ReconError(f"{label}: k-space data contain NaN or Inf values")
        ne2 = k.shape[1]
        ro_mask = self._readout_mask(sampling, k.shape[-1])
        # calibration (ref) lines on the same grid count as measured data
        calib_lines = None
        if ref_data is not None:
            calib_lines = self._merge_ref(k, acquired, ref, ref_data, n, s, loc, label)
        acq_e1 = acquired.any(axis=1)  # (E1,)
        if ne2 > 1:
            if not (acquired == acquired[:, :1]).all() or not acquired.any(axis=0).all():
                raise ReconError("3-D acquisitions undersampled along E2 are not supported yet")
            k = ifft1c(torch.from_numpy(k), dim=1).numpy()
        mask = np.zeros(k.shape[-2:], dtype=bool)
        mask[acq_e1, :] = ro_mask[None, :]
        if calib_lines is not None:
            mask[calib_lines[0], :] |= ro_mask[None, :]
        else:
            self._check_centre(mask, sampling, label)
        calib = None if calib_lines is None else calib_lines[1]  # (CHA, E2, lines, RO)
        if calib is not None and ne2 > 1:
            calib = ifft1c(torch.from_numpy(calib), dim=1).numpy() if calib.shape[1] == ne2 else None
        seed = slice_seed(
            self.config.sampler.seed, centre.idx.slice, centre.idx.contrast, centre.idx.phase,
            centre.idx.repetition, centre.idx.set,
        )
        parts = [
            _Part(k[:, p] * mask[None], mask, None if calib is None else calib[:, p], (int(centre.idx.slice), p),
                  seed + p, label)
            for p in range(ne2)
        ]
        return _Slice(label, centre, sampling, parts)

    # ------------------------------------------------------------------------------------------ batches
    def _run(self, slices: list[_Slice]) -> Iterator[ismrmrd.Image]:
        """Reconstruct the parts of ``slices`` in runs of at most ``max_batch``; yield each slice's images as
        soon as all its parts are done."""
        parts = [p for sl in slices for p in sl.parts]
        done = 0
        for i in range(0, len(parts), self.max_batch):
            self._reconstruct(parts[i : i + self.max_batch])
            while done < len(slices) and all(p.result is not None for p in slices[done].parts):
                yield from self._emit(slices[done])
                slices[done].parts = []  # k-space no longer needed
                done += 1

    def _emit(self, sl: _Slice) -> Iterator[ismrmrd.Image]:
        """The images of one reconstructed slice (its parts stacked along z), and the series bookkeeping."""
        results = [p.result for p in sl.parts]
        assert all(r is not None for r in results)
        sampling = sl.sampling
        image = self._crop(np.stack([r.image for r in results]), sampling)  # (z, ny, nx)
        std = None
        if self.config.output.uncertainty and all(r.std is not None for r in results):
            std = np.abs(self._crop(np.stack([r.std for r in results]).astype(np.complex64), sampling)).astype(np.float32)
        reports = [r.report for r in results]
        nfe = int(sum(int(r.get("nfe", 0)) for r in reports))
        self.report.slices += 1
        self.report.nfe += nfe
        self.report.seconds += float(sum(float(r.get("seconds", 0.0)) for r in reports))
        for r in reports:
            for total, part in ((self.report.stages, r.get("stages", {})), (self.report.stages_cpu, r.get("stages_cpu", {}))):
                for k, v in part.items():
                    total[k] = total.get(k, 0.0) + float(v)
        # the label covers every z partition: AI-generated when any partition came from a learned method
        used_all = [str(r.get("method", self.method)) for r in reports]
        used = next((m for m in used_all if is_ai_generated(m)), used_all[0])
        self.report.methods[used] = self.report.methods.get(used, 0) + 1
        fallback = "; ".join(dict.fromkeys(str(r["fallback_reason"]) for r in reports if r.get("fallback_reason")))
        fallback = fallback or None
        if fallback:
            self.report.fallbacks.append({"slice": sl.label, "reason": fallback})
        sha = getattr(self.prior, "sha256", "") if self.prior is not None else ""
        lab = Label(method=used, requested=self.method, nfe=nfe, model_sha256=sha,
                    version=self.version, fallback=fallback)
        out = self.config.output
        series = out.series
        imgs = []
        if out.complex:
            imgs.append(self._image(image.astype(np.complex64), sl.centre, sampling, series, IMTYPE_COMPLEX, lab))
        if std is not None:
            std_lab = dataclasses.replace(lab, role=ROLE_STD)
            imgs.append(self._image(std, sl.centre, sampling, series + 1, IMTYPE_MAGNITUDE, std_lab))
        if out.magnitude != "none":
            pixels, scale = magnitude_pixels(image, out.magnitude, out.ushort_scale)
            extra = {"ScaleFactor": f"{scale:.6g}"} if out.magnitude == "ushort" else None
            imgs.append(self._image(pixels, sl.centre, sampling, series + 2, IMTYPE_MAGNITUDE, lab, extra))
        if self.observer is not None and imgs:
            self.observer(SliceRecord(
                label=sl.label, kspace=[p.kspace for p in sl.parts], mask=sl.parts[0].mask,
                calib=[p.calib for p in sl.parts], maps=[np.asarray(r.maps) for r in results],
                seeds=[p.seed for p in sl.parts], image=image, std=std, method=used, nfe=nfe, images=imgs,
                crop=lambda a: self._crop(np.asarray(a), sampling),
            ))
        for img in imgs:
            yield img
            self.report.images += 1

    # ------------------------------------------------------------------------------------------ helpers
    def _reconstruct(self, parts: list[_Part]) -> None:
        """One sampler run over ``parts`` (sets each part's ``result``): the learned method, or the labelled
        SENSE image where the series budget is spent, the run passed its deadline or the method failed. A run
        of several slices that fails otherwise is retried slice by slice, so one bad slice does not take the
        others' learned images (and an error names its slice)."""
        from scoremri.gadget import threads

        threads.rebalance()  # other scans may have started or ended
        maps = [self._cached_maps(p) for p in parts]
        budget = self.config.sampler.time_budget_s
        if self.learned and budget > 0 and self.report.seconds > budget:
            reason = (f"time budget of {budget:g} s for the series exceeded ({self.report.seconds:.1f} s used; "
                      "sampler.time_budget_s)")
            return self._fallback(parts, maps, reason)
        try:
            results = reconstruct_batch(
                [p.kspace for p in parts], [p.mask for p in parts], self.config, maps=maps,
                calib=[p.calib for p in parts], device=self.device, seeds=[p.seed for p in parts], prior=self.prior,
                noise_std=[self.noise_std] * len(parts),
            )
        except SliceDeadlineExceeded as e:
            if not self.learned:
                raise
            return self._fallback(parts, maps, str(e))
        except Exception as e:
            if len(parts) > 1:
                log.info("a run of %d slices failed (%s: %s): retrying them one by one", len(parts),
                         type(e).__name__, e)
                for p in parts:
                    self._reconstruct([p])
                return
            if not self.learned:
                if isinstance(e, ReconError):
                    raise ReconError(f"{parts[0].label}: {e}") from e
                raise
            return self._fallback(parts, maps, f"{self.method} failed: {type(e).__name__}: {e}")
        self.report.batches.append(len(parts))
        for p, mp, res in zip(parts, maps, results):
            sanity = res.report.get("sanity")
            if sanity is not None:
                self.report.sanity.append({"slice": p.label, **sanity})
                if sanity.get("failed") and self.config.sampler.sanity:  # recon/sanity.py: the data deny it
                    self._fallback([p], [mp if mp is not None else res.maps], f"sanity check: {sanity['failed']}")
                    continue
            self._store(p, res)

    def _fallback(self, parts: list[_Part], maps: list[np.ndarray | None], reason: str) -> None:
        """The SENSE image of each part, labelled with ``reason`` (a WARNING per slice)."""
        for p, mp in zip(parts, maps):
            log.warning("%s: %s -> SENSE fallback", p.label, reason)
            try:
                res = reconstruct_batch([p.kspace], [p.mask], self._fallback_config, maps=[mp], calib=[p.calib],
                                        device=self.device, seeds=[p.seed])[0]
            except ReconError as e:
                raise ReconError(f"{p.label}: {e}") from e
            res.report["fallback_reason"] = reason
            res.report["method"] = "sense"
            self._store(p, res)

    def _cached_maps(self, p: _Part) -> np.ndarray | None:
        maps = self._maps.get(p.key) if self.config.coils.cache else None
        return None if maps is None or maps.shape != p.kspace.shape else maps

    def _store(self, p: _Part, res: Result) -> None:
        p.result = res
        if self.config.coils.cache and p.key not in self._maps:
            self._maps[p.key] = res.maps

    def _image(self, array: np.ndarray, centre: Any, sampling: Any, series: int, image_type: int,
               label: Label, extra: dict[str, str] | None = None) -> ismrmrd.Image:
        idx = self._image_index.get(series, 0) + 1
        self._image_index[series] = idx
        return make_image(array, centre, sampling, series, idx, image_type, label, extra_meta=extra)

    @staticmethod
    def _centre_header(hdr: np.ndarray, acquired: np.ndarray, sampling: Any) -> Any:
        """The header of the acquired line closest to the (E1, E2) sampling centre."""
        c1 = int(sampling.sampling_limits[1].center)
        c2 = int(sampling.sampling_limits[2].center)
        e1, e2 = np.nonzero(acquired)
        i = int(np.argmin((e1 - c1) ** 2 * 1000 + (e2 - c2) ** 2))
        return hdr[e1[i], e2[i]]

    @staticmethod
    def _readout_mask(sampling: Any, nro: int) -> np.ndarray:
        lim = sampling.sampling_limits[0]
        lo, hi = int(lim.min), int(lim.max)
        m = np.zeros(nro, dtype=bool)
        if hi <= lo or hi >= nro:  # limits absent or inconsistent with the buffer: whole readout
            lo, hi = 0, nro - 1
        m[lo : hi + 1] = True
        return m

    @staticmethod
    def _check_centre(mask: np.ndarray, sampling: Any, label: str) -> None:
        rows = mask.any(axis=1)
        c = int(sampling.sampling_limits[1].center)
        if not 0 <= c < rows.size:
            c = rows.size // 2
        lo = c
        while lo - 1 >= 0 and rows[lo - 1]:
            lo -= 1
        hi = c
        while hi + 1 < rows.size and rows[hi + 1]:
            hi += 1
        width = (hi - lo + 1) if rows[c] else 0
        if width < MIN_CENTRE_LINES:
            raise ReconError(
                f"{label}: no calibration data: no ref lines and no fully sampled k-space centre "
                f"({width} contiguous centre lines, at least {MIN_CENTRE_LINES} needed)"
            )

    @staticmethod
    def _merge_ref(
        k: np.ndarray, acquired: np.ndarray, ref: Any, ref_data: np.ndarray, n: int, s: int, loc: int, label: str
    ) -> tuple[np.ndarray, np.ndarray] | None:
        """Put the ref lines on the data grid (they are measured data) and return (E1 rows, calib lines).

        calib: (CHA, E2, lines, RO) contiguous block of ref lines (largest run), or None when no ref lines."""
        rn, rs, rl = min(n, ref_data.shape[4] - 1), min(s, ref_data.shape[5] - 1), min(loc, ref_data.shape[6] - 1)
        r = np.ascontiguousarray(ref_data[:, :, :, :, rn, rs, rl].transpose(3, 2, 1, 0)).astype(np.complex64)
        rh = np.asarray(ref.headers, dtype=object)
        if rh.ndim == 5:
            racq = np.vectorize(_acquired, otypes=[bool])(rh[:, :, rn, rs, rl])
        else:
            racq = np.abs(r).sum(axis=(0, 3)).T > 0
        rows = np.nonzero(racq.any(axis=1))[0]
        if rows.size == 0:
            return None
        if r.shape[-1] != k.shape[-1]:
            raise ReconError(f"{label}: ref readout length {r.shape[-1]} differs from data {k.shape[-1]}")
        if not np.isfinite(r[:, :, rows].view(np.float32)).all():
            raise ReconError(f"{label}: calibration (ref) data contain NaN or Inf values")
        # largest contiguous run of ref rows -> calibration block
        runs = np.split(rows, np.nonzero(np.diff(rows) != 1)[0] + 1)
        run = max(runs, key=len)
        calib = r[:, :, run, :]
        on_grid = r.shape[2] == k.shape[2] and r.shape[1] == k.shape[1]
        if on_grid:
            fill = np.zeros(k.shape[2], dtype=bool)
            fill[rows] = True
            fill &= ~acquired.any(axis=1)
            k[:, :, fill, :] = r[:, :, fill, :]
            return rows, calib
        return np.zeros(0, dtype=np.int64), calib

    def _crop(self, image: np.ndarray, sampling: Any) -> np.ndarray:
        """(z, ny, nx) at the encoded size -> recon FOV and matrix (phase/readout oversampling, resolution)."""
        if not self.config.output.crop_to_recon:
            return image
        enc_fov = [float(v) for v in sampling.encoded_FOV]
        rec_fov = [float(v) for v in sampling.recon_FOV]
        rec_mat = [int(v) for v in sampling.recon_matrix]
        out = image
        # axis order of `image`: (z, y, x) <-> sampling index (2, 1, 0)
        for ax, si in ((2, 0), (1, 1)):
            nenc = out.shape[ax]
            if enc_fov[si] > 0 and 0 < rec_fov[si] < enc_fov[si]:
                nfov = int(round(nenc * rec_fov[si] / enc_fov[si]))
                out = _centre_crop(out, ax, max(1, nfov))
            target = rec_mat[si]
            if target > 0 and target != out.shape[ax]:
                out = _resample(out, ax, target)
        if rec_mat[2] > 0 and out.shape[0] > rec_mat[2]:
            out = _centre_crop(out, 0, rec_mat[2])
        return out

def _acquired(h: Any) -> bool:
    return h is not None and int(h.number_of_samples) > 0


def _s_is_average(headers: np.ndarray) -> bool:
    """True when the buffer's S dimension holds averages (BucketToBuffer S_dimension=average): every S index
    carries one average counter and they differ between S indices."""
    per_s = []
    for s in range(headers.shape[3]):
        vals = {int(h.idx.average) for h in headers[:, :, :, s, :].flat if _acquired(h)}
        if len(vals) != 1:
            return False
        per_s.append(vals.pop())
    return len(set(per_s)) == len(per_s)


def _combine_averages(data: np.ndarray, headers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Average the measured samples over S (averages) line by line: (RO, E1, E2, CHA, N, S, LOC) ->
    S = 1; a line is measured when any average measured it. Headers: the first average's line."""
    acq = np.vectorize(_acquired, otypes=[bool])(headers)  # (E1, E2, N, S, LOC)
    w = acq.astype(np.float32)[None, :, :, None]  # (1, E1, E2, 1, N, S, LOC)
    count = w.sum(axis=5, keepdims=True)
    out = (np.asarray(data) * w).sum(axis=5, keepdims=True) / np.maximum(count, 1.0)
    heads = np.empty(headers.shape[:3] + (1,) + headers.shape[4:], dtype=object)
    for idx in np.ndindex(heads.shape):
        e1, e2, n, _, loc = idx
        cands = [headers[e1, e2, n, s, loc] for s in range(headers.shape[3]) if acq[e1, e2, n, s, loc]]
        heads[idx] = cands[0] if cands else headers[e1, e2, n, 0, loc]
    return out.astype(np.complex64), heads


def _centre_crop(a: np.ndarray, axis: int, n: int) -> np.ndarray:
    size = a.shape[axis]
    if n >= size:
        return a
    start = size // 2 - n // 2
    return np.take(a, np.arange(start, start + n), axis=axis)


def _resample(a: np.ndarray, axis: int, n: int) -> np.ndarray:
    """Change the matrix along one image axis by centred k-space crop / zero-pad (same FOV)."""
    size = a.shape[axis]
    t = torch.from_numpy(np.ascontiguousarray(np.moveaxis(a, axis, -1)).astype(np.complex64))
    k = fft1c(t, dim=-1)
    if n < size:
        s = size // 2 - n // 2
        k = k[..., s : s + n]
    else:
        pad = torch.zeros(k.shape[:-1] + (n,), dtype=k.dtype)
        s = n // 2 - size // 2
        pad[..., s : s + size] = k
        k = pad
    out = ifft1c(k, dim=-1) * float(np.sqrt(n / size))
    return np.moveaxis(out.numpy(), -1, axis)


__all__ = ["ReconCore", "SliceRecord", "load_prior", "slice_seed"]
