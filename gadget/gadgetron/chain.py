"""Gadgetron's chain for raw readouts, as one lazy generator: what replay and the MRD server both run.

``raw_chain(acquisitions, header, spec)``: NoiseAdjustGadget -> RemoveROOversamplingGadget
(:func:`scoremri.gadget.gadgetron.preprocess.preprocess_stream`) -> AcquisitionAccumulateTriggerGadget ->
BucketToBufferGadget (:func:`scoremri.gadget.gadgetron.buffers.iter_recon_data`), with the gadgets the
stream XML ``spec`` has and the properties it sets (``pipelines/scoremri.xml`` by default).

Lazy end to end: it pulls one acquisition at a time from ``acquisitions`` (a list read from a file, or a
generator that reads a socket) and yields each ReconData as soon as Gadgetron would send it, i.e. when its
trigger fires (a change of the trigger dimension's counter) or when the acquisitions end. A server therefore
reconstructs repetition 1 while repetition 2 is still being acquired, and replay gives the same buffers in
the same order as the server because both call this one function.
"""
from __future__ import annotations

from typing import Any, Iterable, Iterator

import ismrmrd
import numpy as np
from gadgetron.types.recon_data import ReconData

from .buffers import iter_recon_data, iter_triggers
from .pipeline import PipelineSpec
from .preprocess import preprocess_stream


def raw_chain(
    acquisitions: Iterable[ismrmrd.Acquisition],
    header: Any,
    spec: PipelineSpec,
    *,
    prewhitener: np.ndarray | None = None,
    source: str = "scan",
    noise_report: dict[str, Any] | None = None,
    grouped: bool = False,
) -> Iterator[ReconData] | Iterator[list[ReconData]]:
    """Acquisitions (noise scans included, arrival order) -> ReconData, as the chain ``spec`` would build them.

    prewhitener: (C, C) from a separate noise measurement (replay ``--noise``); default: from the noise scans
    that arrive before the first imaging line. source: names the data in messages. noise_report: filled with
    the prewhitener's report (noise scans, samples, dwell times, scale) once the first imaging line arrived.
    grouped: yield the ReconData of one trigger as one list (they are ready together: one batch).
    Raises PreprocessError (no imaging lines), BufferLayoutError (a line that does not fit the header).
    """
    lines = preprocess_stream(
        acquisitions, header, noise_adjust=spec.noise_adjust, prewhitener=prewhitener,
        remove_oversampling=spec.remove_ro_oversampling, source=source, report=noise_report,
    )
    yield from (iter_triggers if grouped else iter_recon_data)(lines, header, spec)


__all__ = ["raw_chain"]
