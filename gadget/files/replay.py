"""``scoremri replay``: reconstruct an ISMRMRD raw ``.h5`` offline through the same core as the gadget.

read_raw -> :func:`scoremri.gadget.gadgetron.chain.raw_chain`, the chain the MRD server runs too (NoiseAdjust
with the noise scans that come first, or ``--noise FILE``; none -> a warning, no whitening; RemoveROOversampling;
AcquisitionAccumulateTrigger + BucketToBuffer with the properties of the pipeline XML) -> ReconCore.process_many
(the buffers of one trigger, ready together as in Gadgetron, in batches of ``slice_batch``) -> write_images (``<group>/image_<series>``, as gadgetron_ismrmrd_client) and optional PNG previews.

Configuration: the preset and dotted properties of the XML's ``<external><configuration>``, overridden by
``--preset`` and ``--set name=value``; the runtime settings (device, CPU threads, slices per sampler run) from
``--device`` / ``--threads`` / ``--slice-batch`` or the XML's ``device`` / ``threads`` / ``slice_batch``.
Images are written as soon as each slice is done, so earlier slices survive a later error.
``-G`` names the output group and ``-d`` the input group, as for gadgetron_ismrmrd_client.

Averages are buffered as Gadgetron's BucketToBuffer does (see :mod:`scoremri.gadget.gadgetron.buffers`): with the shipped
XML (``S_dimension=average``) they are stacked along S of one buffer and the core receives them together;
without an N/S dimension for them each average is its own buffer and image.

Outputs (any of them, at least one): ``-o`` ISMRMRD images, ``--dicom DIR`` (:mod:`.dicom`, one folder per
series, ``--anonymise`` strips patient identity), ``--nifti FILE`` (:mod:`.nifti`, written at the end: a
volume needs all its slices), ``--png DIR`` labelled previews (:mod:`.preview`), ``--compare DIR`` one
zero-filled | SENSE | sent | std | difference picture per slice (:mod:`.compare`).

Replay never writes into its input: an output that names the raw file (or the noise file), through any path
or link, is refused before anything is read (exit 2), and so is ``-o`` naming a file whose output group
holds raw data. Adding a group to the raw file instead would open it for writing, and an HDF5 file that
dies open for writing (Ctrl-C at the wrong moment, a full disk, a killed job) can lose everything in it,
the raw data included.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import h5py

from scoremri.model.checkpoint import ModelLoadError
from scoremri.recon.api import ReconError

from ..cli import UsageError, add_runtime_arguments, keep, uninterrupted
from ..gadgetron.buffers import BufferLayoutError
from ..gadgetron.pipeline import PipelineError, read_pipeline
from ..gadgetron.preprocess import PreprocessError, imaging_dwell_time_us, noise_prewhitener, whitened_noise_std
from .dicom import DicomError
from .nifti import NiftiError
from .preview import write_png
from .rawfile import RawFileError, holds_raw_data, read_noise, read_raw, same_file, write_images

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from scoremri.recon.config import preset_descriptions

    presets = "; ".join(f"{k}: {v}" for k, v in preset_descriptions().items())
    parser.add_argument("raw", help="ISMRMRD raw .h5 (acquisitions + XML header)")
    parser.add_argument("-o", "--output", default=None,
                        help="output ISMRMRD image .h5 (appended to if it exists; never the raw input)")
    parser.add_argument("-G", "--group", default="dataset",
                        help="output HDF5 group for the images (default dataset; gadgetron_ismrmrd_client's -G)")
    parser.add_argument("-d", "--in-group", default="dataset",
                        help="input HDF5 group of the raw data (default dataset; gadgetron_ismrmrd_client's -d)")
    parser.add_argument("--preset", default=None, metavar="PRESET",
                        help=f"recon preset or a YAML file (default: the pipeline's, else fast). Presets: {presets}")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="NAME=VALUE",
                        help="override a dotted config name, e.g. --set sampler.steps=50 (repeatable)")
    parser.add_argument("--device", default=None, choices=("auto", "cpu", "cuda"),
                        help="compute device (default: the pipeline's, else auto)")
    parser.add_argument("--noise", default=None, metavar="FILE",
                        help="separate noise raw file (e.g. a Siemens noise prescan); default: the file's own noise scans")
    parser.add_argument("--dicom", default=None, metavar="DIR",
                        help="write DICOM MR images into DIR, one folder per series (series_<N>_<method>/)")
    parser.add_argument("--anonymise", "--anonymize", action="store_true",
                        help="--dicom: leave out patient and study identity (names, IDs, dates, institution; "
                             "UIDs re-derived)")
    parser.add_argument("--nifti", default=None, metavar="FILE",
                        help="write a NIfTI volume (.nii or .nii.gz) per series: FILE, FILE_std for std maps")
    parser.add_argument("--png", default=None, metavar="DIR",
                        help="write labelled magnitude PNG previews into DIR")
    parser.add_argument("--compare", default=None, metavar="DIR",
                        help="write one picture per slice into DIR: zero-filled | SENSE | sent | std | |sent - SENSE|")
    parser.add_argument("--pipeline", default=None, metavar="XML",
                        help="Gadgetron stream XML whose buffering replay mirrors (default pipelines/scoremri.xml)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_runtime_arguments(parser)


DATA_ERRORS = (RawFileError, PipelineError, PreprocessError, BufferLayoutError, ReconError, ModelLoadError,
               DicomError, NiftiError)


def check_outputs(raw: str | Path, output: str | Path | None, group: str, noise: str | Path | None = None,
                  **others: str | Path | None) -> None:
    """Refuse (UsageError, exit 2) outputs that would write into an input file or replace raw data; ``others``
    are the remaining outputs by option name (dicom=..., nifti=..., ...)."""
    named = {"-o": output, **{f"--{k}": v for k, v in others.items()}}
    if not any(v is not None for v in named.values()):
        raise UsageError("nothing to write: give -o FILE, --dicom DIR, --nifti FILE, --png DIR or --compare DIR")
    for opt, path in named.items():
        if path is None:
            continue
        for what, src in (("raw input", raw), ("noise file", noise)):
            if src is not None and same_file(src, path):
                raise UsageError(f"{opt} {path} is the {what} {src}: replay never writes into its input "
                                 f"(an interrupted HDF5 write could lose the raw data); choose another file, "
                                 f"e.g. -o {Path(src).with_suffix('').name}_recon.h5")
    for opt in ("--dicom", "--png", "--compare"):
        path = named.get(opt)
        if path is not None and Path(path).exists() and not Path(path).is_dir():
            raise UsageError(f"{opt} {path} is a file; it needs a directory")
    nifti = named.get("--nifti")
    if nifti is not None and not str(nifti).endswith((".nii", ".nii.gz")):
        raise UsageError(f"--nifti {nifti}: the name must end in .nii or .nii.gz")
    if output is not None and holds_raw_data(output, group):
        raise UsageError(f"-o {output}: its group '{group}' holds raw data (acquisitions or an ISMRMRD header) "
                         f"that writing images there would replace; choose another file or -G GROUP")


def recon_id(config: Any, preset: str) -> str:
    """A short fingerprint of the reconstruction settings (part of the DICOM Series UIDs)."""
    text = json.dumps({"preset": str(preset), "config": config.to_dict()}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def replay(
    raw: str | Path,
    output: str | Path | None = None,
    *,
    group: str = "dataset",
    in_group: str = "dataset",
    preset: str | None = None,
    overrides: dict[str, str] | None = None,
    device: str | None = None,
    noise: str | Path | None = None,
    png: str | Path | None = None,
    pipeline: str | Path | None = None,
    progress: bool = True,
    dicom: str | Path | None = None,
    nifti: str | Path | None = None,
    compare: str | Path | None = None,
    anonymise: bool = False,
    threads: int | str | None = None,
    configure_threads: bool = False,
    slice_batch: int | None = None,
) -> dict[str, Any]:
    """Replay one raw file; returns {"images": {series: count}, "report": ReconCore.finish(), "noise": ...,
    "png": [paths], "dicom": {series: [paths]}, "nifti": [paths], "compare": [paths], "seconds"}.

    threads: CPU threads (None: the XML's ``threads`` property, else auto); applied only when given or with
    ``configure_threads`` (the CLI), so a library caller's own setting is left alone. slice_batch: most
    slices per sampler run (None: the XML's ``slice_batch``, else 0 = auto)."""
    from tqdm import tqdm

    from scoremri.recon.config import load_config

    from .. import threads as cpu_threads
    from ..core import ReconCore
    from ..gadgetron.chain import raw_chain
    from ..gadgetron.external import RUNTIME_PROPERTIES, runtime_from_properties

    t0 = time.perf_counter()
    check_outputs(raw, output, group, noise, dicom=dicom, nifti=nifti, png=png, compare=compare)
    if anonymise and dicom is None:
        raise UsageError("--anonymise applies to --dicom output (the other outputs carry no patient identity)")
    spec = read_pipeline(pipeline)
    props = dict(spec.config)
    xml_threads, xml_batch = runtime_from_properties(props)
    for k in RUNTIME_PROPERTIES:
        props.pop(k, None)
    xml_preset, xml_device = props.pop("preset", None), props.pop("device", None)
    preset = preset or xml_preset or "fast"
    device = device or xml_device or "auto"
    props.update(overrides or {})
    config = load_config(preset, props)
    xml, header, acqs = read_raw(raw, in_group)
    W, noise_report = None, {"noise_scans": 0}
    if spec.noise_adjust and noise is not None:
        W, noise_report = noise_prewhitener(read_noise(noise, in_group), header, source=str(noise),
                                            acq_dwell_time_us=imaging_dwell_time_us(acqs))
    elif not spec.noise_adjust:
        log.info("pipeline %s has no NoiseAdjustGadget: no prewhitening", spec.source)
    # the one chain the MRD server runs too: NoiseAdjust -> RemoveROOversampling -> AccTrig -> BucketToBuffer
    # (grouped: the buffers of one trigger, which Gadgetron sends together, as one list: one batch)
    triggers = raw_chain(acqs, header, spec, prewhitener=W, source=str(raw), noise_report=noise_report,
                         grouped=True)
    out = None if output is None else Path(output)
    if out is not None and out.exists():
        with h5py.File(str(out), "a") as f:
            if group in f:
                log.warning("%s: replacing the images in group '%s'", out, group)
                del f[group]
    prefix = (out or Path(raw)).name.split(".")[0]
    from .compare import CompareWriter
    from .dicom import DicomWriter
    from .nifti import NiftiWriter

    slot = cpu_threads.ScanSlot().__enter__()  # counted among concurrent scans while it runs
    try:
        if threads is not None or configure_threads:
            cpu_threads.configure(threads if threads is not None else xml_threads)
        core = ReconCore(header, config, device=device,
                         max_batch=(slice_batch if slice_batch is not None else xml_batch) or 0)
    except BaseException:
        slot.__exit__(None, None, None)
        raise
    observer = None if compare is None else CompareWriter(compare, config, device=core.device, prefix=prefix)
    core.observer = observer
    dcm = None if dicom is None else DicomWriter(dicom, header, anonymise=anonymise, recon_id=recon_id(config, preset))
    nii = None if nifti is None else NiftiWriter(nifti)
    counts: dict[int, int] = {}
    pngs: list[Path] = []
    ndicom = 0
    dicom_files: dict[int, list[Path]] = {}
    try:
        bar = tqdm(desc="buffers", unit="buffer", disable=not progress)
        for rds in triggers:
            if core.noise_std is None:  # known once the first imaging line met the prewhitener (sanity check)
                core.noise_std = whitened_noise_std(noise_report)
            for img in core.process_many(rds):  # each image written at once: a later failure keeps it
                with uninterrupted():  # Ctrl-C / SIGTERM wait until this image is whole on disk (every output)
                    if out is not None:
                        for s, c in write_images(out, [img], group).items():
                            counts[s] = counts.get(s, 0) + c
                    else:
                        counts[int(img.image_series_index)] = counts.get(int(img.image_series_index), 0) + 1
                    if png is not None:
                        pngs += write_png(png, [img], prefix=prefix)
                    if dcm is not None:
                        ndicom += len(dcm.add(img))
                    if nii is not None:
                        nii.add(img)
                    # inside the block: a signal held while writing is raised at its end, after this is said
                    keep(_kept(out, counts, pngs, ndicom, dicom, observer))
            bar.update(len(rds))
        bar.close()
        report = core.finish()
    except BaseException:
        if dcm is not None:  # after an error or Ctrl-C too: the DICOM series written so far are made consistent
            try:
                with uninterrupted():
                    dcm.close()
            except Exception as e:
                log.error("the DICOM series in %s could not be finalised: %s: %s", dicom, type(e).__name__, e)
        raise
    finally:
        slot.__exit__(None, None, None)
    if dcm is not None:
        with uninterrupted():
            dicom_files = dcm.close()
    nifti_files = nii.close() if nii is not None else []
    if png is not None:
        log.info("wrote %d PNG previews to %s", len(pngs), png)
    if observer is not None:
        log.info("wrote %d comparison pictures to %s", len(observer.paths), compare)
    secs = time.perf_counter() - t0
    log.info("replay %s -> %s: %s images per series in %.1f s", raw, out or "(no ISMRMRD file)", counts, secs)
    return {"images": counts, "report": report, "noise": noise_report, "png": pngs, "dicom": dicom_files,
            "nifti": nifti_files, "compare": [] if observer is None else observer.paths, "seconds": secs}


def _kept(out: Path | None, counts: dict[int, int], pngs: list[Path], ndicom: int, dicom: Any, observer: Any) -> str:
    """What is safely written so far (said on Ctrl-C / errors)."""
    parts = []
    if out is not None:
        parts.append(f"{sum(counts.values())} images in {out}")
    if ndicom:
        parts.append(f"{ndicom} DICOM files in {dicom}")
    if pngs:
        parts.append(f"{len(pngs)} PNG previews")
    if observer is not None and observer.paths:
        parts.append(f"{len(observer.paths)} comparison pictures")
    return ", ".join(parts) or "nothing"


def run(args: argparse.Namespace) -> int:
    from scoremri.recon.config import parse_overrides

    replay(args.raw, args.output, group=args.group, in_group=args.in_group, preset=args.preset,
           overrides=parse_overrides(args.overrides), device=args.device, noise=args.noise, png=args.png,
           pipeline=args.pipeline, progress=not args.no_progress, dicom=args.dicom, nifti=args.nifti,
           compare=args.compare, anonymise=args.anonymise, threads=args.threads, configure_threads=True,
           slice_batch=args.slice_batch)
    return 0

