"""Shared pieces of the tests that run the real Gadgetron server and client (test_gadgetron_*.py): raw files,
pipeline variants, ``scoremri replay`` of the same file at the same thread count, image comparison by
Gadgetron's integration-test rules."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import ismrmrd
import numpy as np
import torch

from scoremri.gadget.files.rawfile import read_images
from scoremri.gadget.files.simulate import simulate, write_raw
from scoremri.gadget.images import AI_LABEL, CLASSICAL_LABEL
from scoremri.gadget.testing.gadgetron_server import compare_image_headers, pipeline_variant

REPO = Path(__file__).resolve().parents[2]
PIPELINES = REPO / "pipelines"
THREADS = "1"  # OMP_NUM_THREADS of the Gadgetron children and of the reference replay: same pixels
MAX_REL_DIFF = 1e-4  # max |gadgetron - replay| / max |replay| per image


def mags(dipy_t1: np.ndarray, n: int, slices: int) -> np.ndarray:
    """(slices, n, n) distinct magnitude images in [0, 1] from dipy's T1 slice (flipped / rolled copies)."""
    t = torch.nn.functional.interpolate(torch.from_numpy(dipy_t1)[None, None], size=(n, n), mode="area")[0, 0]
    t = (t / t.max()).numpy()
    variants = [t, t[:, ::-1], np.roll(t, n // 8, axis=0), t[::-1], np.roll(t[:, ::-1], -n // 8, axis=1)]
    return np.stack([variants[s % len(variants)] for s in range(slices)]).astype(np.float32)


def simulated(path: Path, m: np.ndarray, **kw) -> dict:
    """A noise-free simulated raw file (Gadgetron runs without a storage server: NoiseAdjust would fail on
    noise scans). Returns simulate()'s dict."""
    opts = dict(coils=4, accel=3.0, mask_kind="random", acs=16, sigma=0.0, seed=5, ro_oversampling=2)
    opts.update(kw)
    sim = simulate(m, **opts)
    write_raw(path, sim)
    return sim


def variant(name: str, dest: Path, *, connect_port: int | None = None, **props: str) -> Path:
    """A copy of pipelines/<name> with ``<external>`` properties set (preset sense, device cpu by default)."""
    properties = {"preset": "sense", "device": "cpu", **{k.replace("__", "."): v for k, v in props.items()}}
    return pipeline_variant(PIPELINES / name, dest, properties=properties, connect_port=connect_port)


def replay(raw: Path, out: Path, xml: Path, *extra: str) -> dict[int, list[ismrmrd.Image]]:
    """``scoremri replay`` in a child with the Gadgetron children's thread count; its images by series."""
    env = dict(os.environ, OMP_NUM_THREADS=THREADS)
    r = subprocess.run([sys.executable, "-m", "scoremri.gadget.cli", "replay", str(raw), "-o", str(out),
                        "--pipeline", str(xml), "--no-progress", *extra],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return read_images(out)


def key(im: ismrmrd.Image) -> tuple[int, ...]:
    """(slice, contrast, phase, repetition, set, average): what identifies an image whatever its number."""
    return (im.slice, im.contrast, im.phase, im.repetition, im.set, im.average)


def by_slice(images: list[ismrmrd.Image]) -> dict[tuple[int, ...], ismrmrd.Image]:
    """{key(image): image} (keys start with the slice)."""
    out = {}
    for im in images:
        assert key(im) not in out, f"two images of {key(im)}"
        out[key(im)] = im
    return out


def assert_images_equal(got: list[ismrmrd.Image], ref: list[ismrmrd.Image], *, skip: tuple[str, ...] = (),
                        pixels: bool = True) -> None:
    """Same slices/counters; pixels within MAX_REL_DIFF; headers by Gadgetron's integration-test rules; labels."""
    g, r = by_slice(got), by_slice(ref)
    assert sorted(g) == sorted(r), (sorted(g), sorted(r))
    for s in sorted(r):
        a, b = g[s], r[s]
        bad = compare_image_headers(a, b, skip=skip)
        assert not bad, f"slice {s}: {bad}"
        if pixels:
            assert a.data.shape == b.data.shape and a.data.dtype == b.data.dtype
            rel = np.abs(a.data - b.data).max() / np.abs(b.data).max()
            assert rel <= MAX_REL_DIFF, f"slice {s}: max relative difference {rel:.2e}"
        assert_labelled(a)


def assert_labelled(im: ismrmrd.Image) -> None:
    """The labels of gadget/images.py survived the chain: AI-generated exactly when a learned method made it."""
    meta = im.meta
    comment, seq = str(meta.get("GADGETRON_ImageComment", "")), str(meta.get("GADGETRON_SeqDescription", ""))
    learned = meta.get("AIGenerated") == "1"
    assert (AI_LABEL if learned else CLASSICAL_LABEL) in comment, dict(meta)
    assert seq.startswith("_SCOREMRI_AI" if learned else "_SCOREMRI_"), dict(meta)
    assert meta.get("SCOREMRI_Method") and f"sampler {meta['SCOREMRI_Method']}" in comment, dict(meta)


def autoscale_ushort(mag: np.ndarray, max_value: float = 2048.0, bins: int = 100) -> np.ndarray:
    """Gadgetron's AutoScaleGadget (99th-percentile histogram scale) then FloatToUShortGadget (clamp 0..4095,
    lround), as in gadgets/mri_core/AutoScaleGadget.cpp and FloatToFixPointGadget.cpp."""
    d = mag.astype(np.float32).ravel()
    top = d.max()
    b = np.minimum(np.floor(d / top * bins).astype(np.int64), bins - 1)
    hist = np.bincount(b, minlength=bins)
    cum, counter = 0, 0
    while cum < 0.99 * d.size:
        cum += hist[counter]
        counter += 1
    scale = max_value / ((counter + 1) * (top / bins))
    return np.rint(np.clip(mag * np.float32(scale), 0, 4095)).astype(np.uint16)
