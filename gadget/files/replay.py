"""``scoremri replay``: reconstruct an ISMRMRD raw ``.h5`` offline through the same core as the gadget.

read_raw -> :func:`scoremri.gadget.gadgetron.chain.raw_chain`, the chain the MRD server runs too (NoiseAdjust
with the noise scans that come first, or ``--noise FILE``; none -> a warning, no whitening; RemoveROOversampling;
AcquisitionAccumulateTrigger + BucketToBuffer with the properties of the pipeline XML) -> ReconCore.process
-> write_images (``<group>/image_<series>``, as gadgetron_ismrmrd_client) and optional PNG previews.

Configuration: the preset and dotted properties of the XML's ``<external><configuration>``, overridden by
``--preset`` and ``--set name=value``; the device from ``--device`` or the XML's ``device`` property.
Images are written as soon as each slice is done, so earlier slices survive a later error.
``-G`` names the output group and ``-d`` the input group, as for gadgetron_ismrmrd_client.

Averages are buffered as Gadgetron's BucketToBuffer does (see :mod:`scoremri.gadget.gadgetron.buffers`): with the shipped
XML (``S_dimension=average``) they are stacked along S of one buffer and the core receives them together;
without an N/S dimension for them each average is its own buffer and image.
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

import h5py

from scoremri.model.checkpoint import ModelLoadError
from scoremri.recon.api import ReconError

from ..cli import keep, uninterrupted
from ..gadgetron.buffers import BufferLayoutError
from ..gadgetron.pipeline import PipelineError, read_pipeline
from ..gadgetron.preprocess import PreprocessError, imaging_dwell_time_us, noise_prewhitener
from .preview import write_png
from .rawfile import RawFileError, read_noise, read_raw, write_images

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from scoremri.recon.config import preset_descriptions

    presets = "; ".join(f"{k}: {v}" for k, v in preset_descriptions().items())
    parser.add_argument("raw", help="ISMRMRD raw .h5 (acquisitions + XML header)")
    parser.add_argument("-o", "--output", required=True, help="output ISMRMRD image .h5 (appended to if it exists)")
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
    parser.add_argument("--png", default=None, metavar="DIR", help="write magnitude PNG previews into DIR")
    parser.add_argument("--pipeline", default=None, metavar="XML",
                        help="Gadgetron stream XML whose buffering replay mirrors (default pipelines/scoremri.xml)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


DATA_ERRORS = (RawFileError, PipelineError, PreprocessError, BufferLayoutError, ReconError, ModelLoadError)


def replay(
    raw: str | Path,
    output: str | Path,
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
) -> dict[str, Any]:
    """Replay one raw file; returns {"images": {series: count}, "report": ReconCore.finish(), "noise": ...,
    "png": [paths], "seconds"}."""
    from tqdm import tqdm

    from scoremri.recon.config import load_config

    from ..core import ReconCore
    from ..gadgetron.chain import raw_chain

    t0 = time.perf_counter()
    spec = read_pipeline(pipeline)
    props = dict(spec.config)
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
    buffers = raw_chain(acqs, header, spec, prewhitener=W, source=str(raw), noise_report=noise_report)
    out = Path(output)
    if out.exists():
        with h5py.File(str(out), "a") as f:
            if group in f:
                log.warning("%s: replacing existing group '%s'", out, group)
                del f[group]
    core = ReconCore(header, config, device=device)
    counts: dict[int, int] = {}
    pngs: list[Path] = []
    for rd in tqdm(buffers, desc="buffers", unit="buffer", disable=not progress):
        for img in core.process(rd):  # each image written at once: a later failure keeps it (PNG included)
            with uninterrupted():  # Ctrl-C / SIGTERM wait until this image is whole on disk
                for s, c in write_images(out, [img], group).items():
                    counts[s] = counts.get(s, 0) + c
                if png is not None:
                    pngs += write_png(png, [img], prefix=out.name.split(".")[0])
            keep(f"{sum(counts.values())} images in {out}" + (f" and {len(pngs)} PNG previews" if pngs else ""))
    report = core.finish()
    if png is not None:
        log.info("wrote %d PNG previews to %s", len(pngs), png)
    secs = time.perf_counter() - t0
    log.info("replay %s -> %s: %s images per series in %.1f s", raw, out, counts, secs)
    return {"images": counts, "report": report, "noise": noise_report, "png": pngs, "seconds": secs}


def run(args: argparse.Namespace) -> int:
    from scoremri.recon.config import parse_overrides

    replay(args.raw, args.output, group=args.group, in_group=args.in_group, preset=args.preset,
           overrides=parse_overrides(args.overrides), device=args.device, noise=args.noise, png=args.png,
           pipeline=args.pipeline, progress=not args.no_progress)
    return 0

