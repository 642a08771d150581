"""Acquisitions -> ``gadgetron.types.ReconData``, as AcquisitionAccumulateTrigger + BucketToBuffer build them.

The same objects go over the wire with ``gadgetron.types.recon_data.write_recon_data`` (harness) or straight
into ``ReconCore.process`` (replay), so both paths see identical buffers.

AcquisitionAccumulateTrigger (Gadgetron 4): noise scans are skipped; a change of the ``trigger_dimension``
counter between consecutive acquisitions sends all open buckets (in ascending ``sorting_dimension`` order),
the end of the scan sends the rest. PARALLEL_CALIBRATION (20) lines go to ``ref`` only,
PARALLEL_CALIBRATION_AND_IMAGING (21) lines to ``ref`` and ``data``, PHASECORR (24) lines nowhere.

BucketToBuffer (Gadgetron 4): one ReconData per key (average, slice, contrast, phase, repetition, set,
segment), with the N and S dimensions cleared from the key, slice cleared unless ``split_slices`` and segment
cleared when ``ignore_segment``; one ReconBit per encoding space. Buffers ``data`` (RO, E1, E2, CHA, N, S,
LOC) complex64 and ``headers`` (E1, E2, N, S, LOC); unacquired positions keep a zeroed AcquisitionHeader
(``number_of_samples == 0``) and zero data. Cartesian lines land at
``e1 = kspace_encode_step_1 + matrix.y // 2 - encodingLimits.e1.center`` (partial Fourier in E1 and E2 follow
from the limits); separate/external ``ref`` buffers are as tall as the calibration block. N/S positions are
the raw counter values clamped to size-1, as in Gadgetron. A later line at an occupied position overwrites
the earlier one: averages that are neither the N nor the S dimension become separate ReconData (separate
images), as in Gadgetron; with ``S_dimension=average`` they are stacked along S for the consumer to combine.

Readout: Gadgetron's buffer is ``number_of_samples`` long, placed by ``center_sample``; an asymmetric echo
(``number_of_samples`` < the readout matrix, ``center_sample != number_of_samples / 2``) needs
AsymmetricEchoAdjustROGadget upstream in Gadgetron. Here that step is built in: the buffer is
``max(number_of_samples, readout matrix)`` long (readout matrix = reconSpace x for Cartesian data whose
oversampling was removed, as Gadgetron's SamplingDescription assumes), and sample ``j`` lands at
``RO // 2 - center_sample + j`` (so k-space centre at RO // 2); the RO sampling limits (min, center, max) give
the sampled range, which for symmetric echoes equals Gadgetron's (discard_pre, N/2, N - discard_post - 1).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import ismrmrd
import numpy as np
from gadgetron.types.recon_data import ReconBit, ReconBuffer, ReconData, SamplingDescription

from .pipeline import PipelineSpec

log = logging.getLogger(__name__)

FLAG_NOISE = 19
FLAG_PARALLEL_CALIBRATION = 20
FLAG_PARALLEL_CALIBRATION_AND_IMAGING = 21
FLAG_PHASECORR = 24
KEY_FIELDS = ("average", "slice", "contrast", "phase", "repetition", "set", "segment")
STAT_FIELDS = ("kspace_encode_step_1", "kspace_encode_step_2", "average", "slice", "contrast", "phase",
               "repetition", "set", "segment")


class BufferLayoutError(ValueError):
    """An acquisition does not fit the buffer the header describes; the message names the line."""


def counter(acq_or_head: Any, dim: str) -> int:
    """The value of an encoding counter ('' -> 0; user_0..user_7 supported)."""
    if not dim:
        return 0
    head = acq_or_head
    idx = head.idx
    if dim.startswith("user_"):
        return int(idx.user[int(dim[5:])])
    return int(getattr(idx, dim))


def _flag(head: Any, bit: int) -> bool:
    return bool(int(head.flags) & (1 << (bit - 1)))


@dataclass
class Stats:
    """AcquisitionBucketStats: the set of values seen per counter."""

    values: dict[str, set[int]] = field(default_factory=lambda: {f: set() for f in STAT_FIELDS})

    def add(self, head: Any) -> None:
        for f in STAT_FIELDS:
            self.values[f].add(int(getattr(head.idx, f)))

    def span(self, f: str) -> int:
        v = self.values[f]
        return (max(v) - min(v) + 1) if v else 1

    def min(self, f: str) -> int:
        v = self.values[f]
        return min(v) if v else 0


@dataclass
class Bucket:
    """AcquisitionBucket: data and ref acquisitions and their per-encoding-space statistics."""

    data: list[ismrmrd.Acquisition] = field(default_factory=list)
    ref: list[ismrmrd.Acquisition] = field(default_factory=list)
    datastats: dict[int, Stats] = field(default_factory=dict)
    refstats: dict[int, Stats] = field(default_factory=dict)

    def add(self, acq: ismrmrd.Acquisition) -> None:
        head = acq.getHead()
        espace = int(head.encoding_space_ref)
        calib = _flag(head, FLAG_PARALLEL_CALIBRATION)
        if calib or _flag(head, FLAG_PARALLEL_CALIBRATION_AND_IMAGING):
            self.ref.append(acq)
            self.refstats.setdefault(espace, Stats()).add(head)
        if not (calib or _flag(head, FLAG_PHASECORR)):
            self.data.append(acq)
            self.datastats.setdefault(espace, Stats()).add(head)


def accumulate(acqs: Iterable[ismrmrd.Acquisition], spec: PipelineSpec) -> Iterator[Bucket]:
    """AcquisitionAccumulateTrigger: buckets in the order Gadgetron sends them."""
    buckets: dict[int, Bucket] = {}
    prev: int | None = None
    for acq in acqs:
        head = acq.getHead()
        if _flag(head, FLAG_NOISE):
            continue
        if spec.trigger_dimension:
            value = counter(head, spec.trigger_dimension)
            if prev is not None and value != prev:
                for k in sorted(buckets):
                    yield buckets[k]
                buckets = {}
            prev = value
        key = counter(head, spec.sorting_dimension)
        buckets.setdefault(key, Bucket()).add(acq)
    for k in sorted(buckets):
        yield buckets[k]


# --------------------------------------------------------------------------------------- BucketToBuffer


def _limit(limits: Any, name: str) -> tuple[int, int, int] | None:
    lim = getattr(limits, name, None) if limits is not None else None
    if lim is None:
        return None
    return int(lim.minimum), int(lim.center), int(lim.maximum)


def _calib_mode(enc: Any) -> str:
    pi = getattr(enc, "parallelImaging", None)
    mode = getattr(pi, "calibrationMode", None) if pi is not None else None
    return _enum_str(mode) if mode is not None else ""


def _enum_str(v: Any) -> str:
    """xsd enum members (ismrmrd 1.15) or plain strings -> the XML string ('cartesian', 'embedded')."""
    return str(getattr(v, "value", v))


def _trajectory(enc: Any) -> str:
    return _enum_str(enc.trajectory)


def _size_from_dimension(dim: str, stats: Stats) -> int:
    """Gadgetron's getSizeFromDimension (note: 'segment' falls through to the average span there)."""
    if not dim:
        return 1
    return stats.span("average" if dim == "segment" else dim)


class _Layout:
    """Sizes and offsets of one buffer (data or ref) of one encoding space."""

    def __init__(self, header: Any, espace: int, stats: Stats, first: Any, forref: bool, spec: PipelineSpec,
                 ro_len: int) -> None:
        if espace >= len(header.encoding):
            raise BufferLayoutError(f"acquisition refers to encoding space {espace}, the header has {len(header.encoding)}")
        enc = header.encoding[espace]
        self.enc = enc
        traj = _trajectory(enc)
        self.cartesian = traj in ("cartesian", "epi")
        mode = _calib_mode(enc)
        self.separate = forref and mode in ("separate", "external")
        # Gadgetron shifts E1/E2 by the matrix/limits centre offset only for imaging data and embedded ref
        self.shift = self.cartesian and (not forref or mode == "embedded")
        self.shift_limits = self.shift and not (traj == "epi" and forref)
        pi = getattr(enc, "parallelImaging", None) is not None
        lim = enc.encodingLimits
        e1l, e2l = _limit(lim, "kspace_encoding_step_1"), _limit(lim, "kspace_encoding_step_2")
        esz = enc.encodedSpace.matrixSize
        # E1/E2 sizes (getNE1/getNE2)
        if self.cartesian:
            if pi:
                self.ne1 = stats.span("kspace_encode_step_1") if self.separate else int(esz.y)
                if self.separate:
                    self.ne2 = (e2l[2] - e2l[0] + 1) if e2l else int(esz.z)
                else:
                    self.ne2 = int(esz.z)
            else:
                self.ne1 = (e1l[2] - e1l[0] + 1) if e1l else int(esz.y)
                self.ne2 = (e2l[2] - e2l[0] + 1) if e2l else int(esz.z)
        else:
            self.ne1 = (e1l[2] - e1l[0] + 1) if e1l else stats.span("kspace_encode_step_1")
            self.ne2 = (e2l[2] - e2l[0] + 1) if e2l else stats.span("kspace_encode_step_2")
        self.ne0 = ro_len
        self.ncha = int(first.active_channels)
        self.nn = _size_from_dimension(spec.n_dimension, stats)
        self.ns = _size_from_dimension(spec.s_dimension, stats)
        if spec.split_slices:
            self.nloc = 1
        else:
            sl = _limit(lim, "slice")
            self.nloc = (sl[2] - sl[0] + 1) if sl else 1
            self.nloc = min(self.nloc, stats.span("slice"))
        # E1/E2 offsets of embedded/data buffers (space_matrix_offset_E1/E2)
        self.off_e1 = (int(esz.y) // 2 - e1l[1]) if e1l else 0
        self.off_e2 = (int(esz.z) // 2 - e2l[1]) if (e2l and int(esz.z) > 1) else 0
        self.e1_min = stats.min("kspace_encode_step_1")
        self.e2_min = stats.min("kspace_encode_step_2")
        self.sampling = self._sampling(first, e1l, e2l)

    def _sampling(self, first: Any, e1l: Any, e2l: Any) -> SamplingDescription:
        enc = self.enc
        sd = SamplingDescription()
        ef, rf = enc.encodedSpace.fieldOfView_mm, enc.reconSpace.fieldOfView_mm
        em, rm = enc.encodedSpace.matrixSize, enc.reconSpace.matrixSize
        sd.encoded_FOV[:] = (float(ef.x), float(ef.y), float(ef.z))
        sd.recon_FOV[:] = (float(rf.x), float(rf.y), float(rf.z))
        sd.encoded_matrix[:] = (int(em.x), int(em.y), int(em.z))
        sd.recon_matrix[:] = (int(rm.x), int(rm.y), int(rm.z))
        if _trajectory(enc) == "cartesian":  # oversampling assumed removed
            sd.encoded_FOV[0] = float(rf.x)
            sd.encoded_matrix[0] = int(rm.x)
        n, pre, post = int(first.number_of_samples), int(first.discard_pre), int(first.discard_post)
        if self.cartesian:
            off = self.ro_offset(first)
            sd.sampling_limits[0].min = off
            sd.sampling_limits[0].max = off + n - pre - post - 1
            sd.sampling_limits[0].center = self.ne0 // 2
        else:
            sd.sampling_limits[0].min = 0
            sd.sampling_limits[0].max = int(em.x) - 1
            sd.sampling_limits[0].center = int(em.x) // 2
        e1l = e1l or (0, 0, 0)
        e2l = e2l or (0, 0, 0)
        if self.shift_limits:
            sd.sampling_limits[1].min = e1l[0] + self.off_e1
            sd.sampling_limits[1].max = e1l[2] + self.off_e1
            sd.sampling_limits[1].center = int(sd.encoded_matrix[1]) // 2
            sd.sampling_limits[2].min = e2l[0] + self.off_e2
            sd.sampling_limits[2].max = e2l[2] + self.off_e2
            sd.sampling_limits[2].center = int(sd.encoded_matrix[2]) // 2
            lo, ce, hi = tuple(sd.sampling_limits[1])
            if not (lo < int(em.y) and hi >= lo and lo <= ce <= hi):
                raise BufferLayoutError(
                    f"E1 encoding limits (min {e1l[0]}, center {e1l[1]}, max {e1l[2]}) do not fit the encoded "
                    f"matrix y = {int(em.y)}"
                )
        else:
            sd.sampling_limits[1].min, sd.sampling_limits[1].center, sd.sampling_limits[1].max = e1l
            sd.sampling_limits[2].min, sd.sampling_limits[2].center, sd.sampling_limits[2].max = e2l
        return sd

    def ro_offset(self, head: Any) -> int:
        """Where sample ``discard_pre`` of this line lands in the RO axis of the buffer."""
        n, c, pre = int(head.number_of_samples), int(head.center_sample), int(head.discard_pre)
        if not self.cartesian:
            return 0
        if n == self.ne0 and (2 * c == n or c >= n):  # already centred (or no centre given)
            return pre
        return self.ne0 // 2 - c + pre

    def position(self, head: Any, spec: PipelineSpec) -> tuple[int, int, int, int, int] | None:
        """(e1, e2, n, s, loc) of a line, or None when it lies inside the limits but outside the matrix."""
        idx = head.idx
        e1, e2 = int(idx.kspace_encode_step_1), int(idx.kspace_encode_step_2)
        if self.cartesian:
            if self.shift:
                e1 += self.off_e1
                e2 += self.off_e2
            if self.separate:
                if self.e1_min > 0:
                    e1 = int(idx.kspace_encode_step_1) - self.e1_min
                if self.e2_min > 0:
                    e2 = int(idx.kspace_encode_step_2) - self.e2_min
            for name, e, ne, lname, raw in (("kspace_encode_step_1", e1, self.ne1, "kspace_encoding_step_1",
                                              idx.kspace_encode_step_1),
                                             ("kspace_encode_step_2", e2, self.ne2, "kspace_encoding_step_2",
                                              idx.kspace_encode_step_2)):
                if e < 0 or e >= ne:
                    lim = _limit(self.enc.encodingLimits, lname)
                    if lim is None or not (lim[0] <= raw <= lim[2]):
                        raise BufferLayoutError(
                            f"line {head.scan_counter}: {name} = {raw} is outside the encoding limits "
                            f"{lim if lim else '(none)'} and the encoded matrix ({ne})"
                        )
                    log.warning("line %d: %s = %d inside the limits but outside the encoded matrix: dropped",
                                head.scan_counter, name, raw)
                    return None
        n = min(counter(head, spec.n_dimension) if spec.n_dimension != "slice" else 0, self.nn - 1)
        s = min(counter(head, spec.s_dimension) if spec.s_dimension != "slice" else 0, self.ns - 1)
        loc = 0 if (spec.split_slices or self.nloc == 1) else int(idx.slice)
        if loc >= self.nloc:
            raise BufferLayoutError(f"line {head.scan_counter}: slice {idx.slice} outside the {self.nloc} buffered slices")
        return e1, e2, n, s, loc


def _ro_length(header: Any, espace: int, first: Any) -> int:
    """Gadgetron's NE0 (number_of_samples, or minus discards without parallel imaging), widened to the
    readout matrix for asymmetric echoes (AsymmetricEchoAdjustRO built in)."""
    enc = header.encoding[espace]
    n, pre, post = int(first.number_of_samples), int(first.discard_pre), int(first.discard_post)
    cart = _trajectory(enc) in ("cartesian", "epi")
    pi = getattr(enc, "parallelImaging", None) is not None
    ne0 = n if (cart and pi) else n - pre - post
    if cart:
        ro_matrix = int(enc.reconSpace.matrixSize.x) if _trajectory(enc) == "cartesian" else int(enc.encodedSpace.matrixSize.x)
        c = int(first.center_sample)
        if n < ro_matrix and 2 * c != n:  # asymmetric echo: pad to the readout matrix
            ne0 = ro_matrix
    return ne0


class _Buffer:
    def __init__(self, layout: _Layout) -> None:
        self.layout = layout
        L = layout
        shape = (L.ne0, L.ne1, L.ne2, L.ncha, L.nn, L.ns, L.nloc)
        self.data = np.zeros(shape, dtype=np.complex64)
        self.headers = np.empty((L.ne1, L.ne2, L.nn, L.ns, L.nloc), dtype=object)
        for i in np.ndindex(self.headers.shape):
            self.headers[i] = ismrmrd.AcquisitionHeader()
        self.lo = int(L.sampling.sampling_limits[0].min)
        self.hi = int(L.sampling.sampling_limits[0].max)

    def add(self, acq: ismrmrd.Acquisition, spec: PipelineSpec) -> None:
        L = self.layout
        head = acq.getHead()
        if int(head.active_channels) != L.ncha:
            raise BufferLayoutError(f"line {head.scan_counter}: {head.active_channels} channels, buffer has {L.ncha}")
        pos = L.position(head, spec)
        if pos is None:
            return
        e1, e2, n, s, loc = pos
        pre, post = int(head.discard_pre), int(head.discard_post)
        npts = int(head.number_of_samples) - pre - post
        off = L.ro_offset(head)
        if off < 0 or L.ne0 - npts - off < 0:
            raise BufferLayoutError(
                f"line {head.scan_counter}: {head.number_of_samples} samples with center_sample "
                f"{head.center_sample} do not fit the {L.ne0}-sample readout buffer"
            )
        self.data[off : off + npts, e1, e2, :, n, s, loc] = acq.data[:, pre : pre + npts].T
        self.headers[e1, e2, n, s, loc] = head
        self.lo = min(self.lo, off)
        self.hi = max(self.hi, off + npts - 1)

    def finish(self) -> ReconBuffer:
        sd = self.layout.sampling
        if self.layout.cartesian:
            sd.sampling_limits[0].min = self.lo
            sd.sampling_limits[0].max = self.hi
        return ReconBuffer(self.data, None, None, self.headers, sd)


def bucket_to_buffer(bucket: Bucket, header: Any, spec: PipelineSpec) -> Iterator[ReconData]:
    """BucketToBuffer: one ReconData per buffer key, in Gadgetron's key order."""
    # key -> espace -> {"data": _Buffer, "ref": _Buffer}
    bufs: dict[tuple[int, ...], dict[int, dict[str, _Buffer]]] = {}

    def key_of(head: Any) -> tuple[int, ...]:
        k = {f: int(getattr(head.idx, f)) for f in KEY_FIELDS}
        for dim in (spec.n_dimension, spec.s_dimension):
            if dim in k and dim != "slice":
                k[dim] = 0
        if not spec.split_slices:
            k["slice"] = 0
        if spec.ignore_segment:
            k["segment"] = 0
        return tuple(k[f] for f in KEY_FIELDS)

    for kind, acqs, stats in (("ref", bucket.ref, bucket.refstats), ("data", bucket.data, bucket.datastats)):
        for acq in acqs:
            head = acq.getHead()
            espace = int(head.encoding_space_ref)
            slot = bufs.setdefault(key_of(head), {}).setdefault(espace, {})
            if kind not in slot:
                layout = _Layout(header, espace, stats[espace], head, kind == "ref", spec,
                                 _ro_length(header, espace, head))
                slot[kind] = _Buffer(layout)
            slot[kind].add(acq, spec)
    for key in sorted(bufs):
        bits = []
        for espace in range(max(bufs[key]) + 1):
            slot = bufs[key].get(espace, {})
            if "data" not in slot:
                if "ref" in slot:
                    log.warning("buffer %s encoding space %d has calibration lines but no imaging data", key, espace)
                continue
            ref = slot["ref"].finish() if "ref" in slot else None
            bits.append(ReconBit(slot["data"].finish(), ref))
        if bits:
            yield ReconData(bits)


def iter_recon_data(acqs: Iterable[ismrmrd.Acquisition], header: Any, spec: PipelineSpec) -> Iterator[ReconData]:
    """Group (preprocessed) acquisitions into ReconData exactly as the spec's Gadgetron chain would."""
    for group in iter_triggers(acqs, header, spec):
        yield from group


def iter_triggers(acqs: Iterable[ismrmrd.Acquisition], header: Any, spec: PipelineSpec) -> Iterator[list[ReconData]]:
    """As :func:`iter_recon_data`, the ReconData of one trigger (one bucket) as one list: what Gadgetron sends
    at once, and what a consumer can reconstruct as one batch."""
    for bucket in accumulate(acqs, spec):
        group = list(bucket_to_buffer(bucket, header, spec))
        if group:
            yield group
