"""What Gadgetron runs on every acquisition before the buffering: NoiseAdjustGadget and
RemoveROOversamplingGadget, reproduced exactly (replay and the MRD server run them; inside Gadgetron the
real gadgets do).

- :func:`noise_prewhitener`: the prewhitening matrix of NoiseAdjustGadget from noise scans (flag
  ACQ_IS_NOISE_MEASUREMENT, 19) of the scan or of a separate noise measurement (Siemens dependent measurement).
- :func:`preprocess_stream`: NoiseAdjustGadget (drop noise scans, whiten with the prewhitener of the noise
  scans that came first) then RemoveROOversamplingGadget (inverse FFT along RO, keep the centre
  ``N * reconFOV.x / encodedFOV.x`` samples, FFT back; ``number_of_samples``, ``center_sample``,
  ``discard_pre/post`` divided by the FOV ratio), lazily, acquisition by acquisition as they arrive
  (:func:`preprocess`: the same on a list with a given prewhitener).

Units: whitened data follow NoiseAdjustGadget exactly (:mod:`scoremri.recon.noise`): ``y_w = W @ y`` per
sample vector (coil first), ``W = s * inv(chol(Cov))``, ``Cov = D D^H / (N - 1)`` over all noise samples,
``s = sqrt(2 * dt_acq / dt_noise * bw)`` (bw = relativeReceiverNoiseBandwidth, default 0.793). For white
noise of std sigma in each of real and imaginary part (Cov = 2 sigma^2 I) whitening multiplies the data by
``s / (sigma * sqrt(2))`` and the whitened noise has complex variance ``s^2``.
"""
from __future__ import annotations

import logging
from typing import Any, Iterable, Iterator, Sequence

import ismrmrd
import numpy as np

log = logging.getLogger(__name__)

FLAG_NOISE = 19  # ACQ_IS_NOISE_MEASUREMENT
DEFAULT_NOISE_BANDWIDTH = 0.793  # NoiseAdjustGadget's default relativeReceiverNoiseBandwidth


class PreprocessError(ValueError):
    """Noise scans or acquisitions that NoiseAdjust / RemoveROOversampling cannot use; the message names them."""


def is_noise(acq: ismrmrd.Acquisition) -> bool:
    return bool(acq.is_flag_set(FLAG_NOISE))


def imaging_dwell_time_us(acqs: Iterable[ismrmrd.Acquisition]) -> float | None:
    """``sample_time_us`` of the first imaging (non-noise) acquisition; None when there is none."""
    first = next((a for a in acqs if not is_noise(a)), None)
    return float(first.sample_time_us) if first is not None else None


def receiver_noise_bandwidth(header: Any) -> float:
    """relativeReceiverNoiseBandwidth of the header (NoiseAdjustGadget's default 0.793 when absent)."""
    asi = getattr(header, "acquisitionSystemInformation", None)
    bw = getattr(asi, "relativeReceiverNoiseBandwidth", None) if asi is not None else None
    return float(bw) if bw is not None else DEFAULT_NOISE_BANDWIDTH


def noise_prewhitener(
    acqs: Sequence[ismrmrd.Acquisition],
    header: Any,
    *,
    acq_dwell_time_us: float | None = None,
    source: str = "scan",
) -> tuple[np.ndarray | None, dict[str, Any]]:
    """NoiseAdjustGadget's prewhitening matrix ``W`` (C, C) complex64, or None without noise scans.

    acqs: acquisitions whose noise scans are used (the scan itself, or a separate noise measurement).
    header: the imaging header (its relativeReceiverNoiseBandwidth). acq_dwell_time_us: imaging dwell time;
    default: ``sample_time_us`` of the first non-noise acquisition of ``acqs`` (pass it for a separate noise
    measurement). source: names the noise data in messages.
    report: {"noise_scans", "noise_samples", "noise_dwell_time_us", "acq_dwell_time_us", "bandwidth", "scale",
    "source"}.
    """
    from scoremri.recon import noise as rnoise

    acqs = list(acqs)
    noise = [a for a in acqs if is_noise(a)]
    if acq_dwell_time_us is None:
        acq_dwell_time_us = imaging_dwell_time_us(acqs)
    report: dict[str, Any] = {"source": source, "noise_scans": len(noise)}
    if not noise:
        log.warning("no noise scans in %s: the data are NOT prewhitened (images in raw receiver units)", source)
        return None, report
    chans = {a.active_channels for a in noise}
    if len(chans) != 1:
        raise PreprocessError(f"{source}: noise scans have different channel counts {sorted(chans)}")
    samples = np.concatenate([a.data for a in noise], axis=1)  # (C, N)
    noise_dt = float(noise[0].sample_time_us)
    bw = receiver_noise_bandwidth(header)
    try:
        cov = rnoise.noise_covariance(samples)
        W = rnoise.prewhitening_matrix(cov, noise_dt, float(acq_dwell_time_us or 0.0), bw)
    except ValueError as e:
        raise PreprocessError(f"{source}: unusable noise scans: {e}") from e
    scale = rnoise.noise_bw_scale_factor(noise_dt, float(acq_dwell_time_us or 0.0), bw)
    report.update(
        {
            "noise_samples": int(samples.shape[1]),
            "noise_dwell_time_us": noise_dt,
            "acq_dwell_time_us": acq_dwell_time_us,
            "bandwidth": bw,
            "scale": scale,
            "noise_std": float(np.sqrt(np.real(np.trace(cov)) / (2 * cov.shape[0]))),
        }
    )
    log.info("noise prewhitening from %d noise scans (%d samples, %d coils) of %s", len(noise),
             samples.shape[1], samples.shape[0], source)
    return np.asarray(W, dtype=np.complex64), report


def whitened_noise_std(report: dict[str, Any]) -> float | None:
    """Std of each of the real and imaginary parts of the noise after :func:`noise_prewhitener`'s ``W``:
    ``scale / sqrt(2)`` (whitened complex variance ``scale^2``); None without noise scans (no whitening)."""
    if not report.get("noise_scans") or "scale" not in report:
        return None
    return float(report["scale"]) / float(np.sqrt(2.0))


# -------------------------------------------------------------------------------------------- preprocess


def _with_data(acq: ismrmrd.Acquisition, data: np.ndarray, **fields: int) -> ismrmrd.Acquisition:
    """A new Acquisition with acq's header, ``fields`` changed, and ``data`` (C, N) complex64."""
    head = acq.getHead()
    for k, v in fields.items():
        setattr(head, k, v)
    head.number_of_samples = data.shape[1]
    head.active_channels = data.shape[0]
    head.trajectory_dimensions = 0 if data.shape[1] != acq.number_of_samples else acq.trajectory_dimensions
    out = ismrmrd.Acquisition(head)
    out.data[:] = data
    if head.trajectory_dimensions:
        out.traj[:] = acq.traj
    return out


def ro_oversampling_ratio(header: Any) -> float:
    """encodedSpace.fieldOfView_mm.x / reconSpace.fieldOfView_mm.x when RemoveROOversamplingGadget works
    (encoded and recon x matrix or FOV differ), else 1."""
    enc = header.encoding[0]
    e_nx, r_nx = int(enc.encodedSpace.matrixSize.x), int(enc.reconSpace.matrixSize.x)
    e_fov, r_fov = float(enc.encodedSpace.fieldOfView_mm.x), float(enc.reconSpace.fieldOfView_mm.x)
    if e_nx == r_nx and e_fov == r_fov:
        return 1.0
    if r_fov <= 0:
        raise PreprocessError(f"reconSpace fieldOfView_mm.x must be > 0, got {r_fov}")
    return e_fov / r_fov


def remove_ro_oversampling(acq: ismrmrd.Acquisition, ratio: float) -> ismrmrd.Acquisition:
    """RemoveROOversamplingGadget on one acquisition: centred unitary iFFT along RO, keep the centre
    ``int(N / ratio)`` samples (start ``(N - M) // 2``), centred unitary FFT back; counters divided by ratio."""
    n = acq.number_of_samples
    m = int(n / ratio)
    if m < 1:
        raise PreprocessError(f"acquisition {acq.scan_counter}: {n} samples cannot lose RO oversampling x{ratio}")
    x = np.fft.fftshift(np.fft.ifft(np.fft.ifftshift(acq.data, axes=-1), axis=-1, norm="ortho"), axes=-1)
    start = (n - m) // 2
    x = x[:, start : start + m]
    k = np.fft.fftshift(np.fft.fft(np.fft.ifftshift(x, axes=-1), axis=-1, norm="ortho"), axes=-1)
    return _with_data(
        acq,
        k.astype(np.complex64),
        center_sample=int(acq.center_sample / ratio),
        discard_pre=int(acq.discard_pre / ratio),
        discard_post=int(acq.discard_post / ratio),
    )


def whiten(acq: ismrmrd.Acquisition, W: np.ndarray) -> ismrmrd.Acquisition:
    """NoiseAdjustGadget on one acquisition: ``W @ data`` on (C, N) data (= Gadgetron's (N, C) data times P)."""
    if W.shape != (acq.active_channels, acq.active_channels):
        raise PreprocessError(
            f"acquisition {acq.scan_counter}: {acq.active_channels} channels but the noise prewhitener is "
            f"{W.shape[0]}x{W.shape[1]} (noise scans from a different coil set?)"
        )
    from scoremri.recon.noise import prewhiten

    return _with_data(acq, prewhiten(acq.data, W))


def preprocess_stream(
    acqs: Iterable[ismrmrd.Acquisition],
    header: Any,
    *,
    noise_adjust: bool = True,
    prewhitener: np.ndarray | None = None,
    remove_oversampling: bool = True,
    source: str = "scan",
    report: dict[str, Any] | None = None,
) -> Iterator[ismrmrd.Acquisition]:
    """NoiseAdjustGadget then RemoveROOversamplingGadget, one acquisition at a time (arrival order kept).

    Noise scans are dropped. With ``noise_adjust`` and no ``prewhitener`` given, the prewhitener comes from the
    noise scans that arrive before the first imaging line (NoiseAdjustGadget's rule: computed when the first
    imaging line arrives, with that line's ``sample_time_us`` as the imaging dwell time); noise scans after it
    are ignored with a warning. ``prewhitener`` (C, C): a matrix from a separate noise measurement (replay
    ``--noise``); the scan's own noise scans are then dropped unused. ``noise_adjust=False``: no whitening
    (a chain without NoiseAdjustGadget). ``report`` (filled in place): :func:`noise_prewhitener`'s report.
    Raises PreprocessError when no imaging line arrives at all (only noise scans).
    """
    ratio = ro_oversampling_ratio(header) if remove_oversampling else 1.0
    noise: list[ismrmrd.Acquisition] = []
    W = prewhitener
    started = False
    late_noise = 0
    if report is not None and prewhitener is not None:
        report.setdefault("source", source)
    for acq in acqs:
        if is_noise(acq):
            if started:
                late_noise += 1
                if late_noise == 1:
                    log.warning("%s: noise scan %d arrived after the first imaging line: ignored (NoiseAdjust "
                                "uses the noise scans that come first)", source, acq.scan_counter)
            elif prewhitener is None:
                noise.append(acq)
            continue
        if not started:
            started = True
            if noise_adjust and prewhitener is None:
                W, rep = noise_prewhitener(noise, header, acq_dwell_time_us=float(acq.sample_time_us), source=source)
                if report is not None:
                    report.update(rep)
            elif not noise_adjust and report is not None:
                report.update({"source": source, "noise_scans": 0})
            noise = []
        if not np.all(np.isfinite(acq.data.view(np.float32))):
            log.warning("acquisition %d contains NaN/Inf samples", acq.scan_counter)
        if W is not None and noise_adjust:
            acq = whiten(acq, W)
        if ratio != 1.0:
            acq = remove_ro_oversampling(acq, ratio)
        yield acq
    if late_noise > 1:
        log.warning("%s: %d noise scans after the first imaging line were ignored", source, late_noise)
    if not started:
        raise PreprocessError(f"{source}: no imaging acquisitions (only noise scans)" if noise else
                              f"{source}: no acquisitions")


def preprocess(
    acqs: Iterable[ismrmrd.Acquisition], header: Any, W: np.ndarray | None, *, remove_oversampling: bool = True
) -> list[ismrmrd.Acquisition]:
    """NoiseAdjust (drop noise scans; whiten with W unless None) then RemoveROOversampling (unless the chain
    has none: ``remove_oversampling=False``); file order kept. :func:`preprocess_stream` with a given W."""
    return list(preprocess_stream(acqs, header, noise_adjust=W is not None, prewhitener=W,
                                  remove_oversampling=remove_oversampling))
