"""``replay --compare DIR``: one picture per slice that shows what the learned prior did.

Panels, left to right: zero-filled | SENSE | the image sent (the configured method, e.g. ``fast``) | its
pixel-wise std map (blank without ``output.uncertainty``) | |sent - SENSE| x5. The zero-filled and SENSE images
are reconstructed by :func:`scoremri.recon.api.reconstruct` from the very k-space, mask and coil maps the
core used for the slice (handed over as a :class:`scoremri.gadget.core.SliceRecord`), with the scan's own
configuration and only ``sampler.method`` changed, and cropped like the sent image. SENSE and the sent image
share one window (the 99.5th percentile of SENSE), so their difference is the prior's doing; the zero-filled
image and the std map have their own.
"""
from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import numpy as np

from ..images import AI_LABEL, CLASSICAL_LABEL, image_label, short_label
from .geometry import edge_letters, planes
from .preview import AI_FG, FG, compose, enlarge_factors, panel, window

log = logging.getLogger(__name__)

DIFF_GAIN = 5.0
PERCENTILE = 99.5


class CompareWriter:
    """An observer for :class:`scoremri.gadget.core.ReconCore`: writes ``<prefix>_compare_<index>.png``
    (``_p<partition>`` for 3-D) into ``directory`` for every slice."""

    def __init__(self, directory: str | Path, config: Any, device: Any = None, prefix: str = "image") -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.device = device
        self.prefix = prefix
        self.configs = {}
        for method in ("zero_filled", "sense"):
            cfg = copy.deepcopy(config)
            cfg.sampler.method = method
            self.configs[method] = cfg
        self.paths: list[Path] = []

    def _classical(self, rec: Any, method: str) -> np.ndarray:
        from scoremri.recon.api import reconstruct

        out = [reconstruct(k, rec.mask, self.configs[method], maps=m, device=self.device, seed=s).image
               for k, m, s in zip(rec.kspace, rec.maps, rec.seeds)]
        return np.asarray(rec.crop(np.stack(out)))

    def __call__(self, rec: Any) -> None:
        zf = self._classical(rec, "zero_filled")
        sense = self._classical(rec, "sense") if rec.method != "sense" else np.asarray(rec.image)
        main = rec.images[0]
        lab = image_label(main)
        index = int(main.getHead().image_index)
        for p, plane in enumerate(planes(main.getHead())):
            path = self.directory / (f"{self.prefix}_compare_{index:03d}" + (f"_p{p}" if zf.shape[0] > 1 else "")
                                     + ".png")
            self._picture(rec, lab, plane, zf[p], sense[p], np.asarray(rec.image)[p],
                          None if rec.std is None else np.asarray(rec.std)[p]).save(path)
            self.paths.append(path)

    def _picture(self, rec: Any, lab: Any, plane: Any, zf: np.ndarray, sense: np.ndarray, sent: np.ndarray,
                 std: np.ndarray | None) -> Any:
        size = enlarge_factors(sent.shape, plane.spacing, min_side=192)
        top = float(np.percentile(np.abs(sense), PERCENTILE)) or float(np.abs(sense).max()) or 1.0
        zf_top = float(np.percentile(np.abs(zf), PERCENTILE))
        diff = np.abs(np.abs(sent) - np.abs(sense))
        edges = None if plane.guessed else edge_letters(plane)
        sent_colour = AI_FG if lab.learned else FG
        blank = np.zeros(sent.shape, np.uint8)
        panels = [
            panel(window(zf, zf_top), [("zero-filled", FG), ("own window", FG)], edges, plane.spacing, size),
            panel(window(sense, top), [("SENSE", FG), ("window W", FG)], edges, plane.spacing, size),
            panel(window(sent, top), [(f"{rec.method} | NFE {rec.nfe}", sent_colour),
                                      ("AI-generated, window W" if lab.learned else "window W", sent_colour)],
                  edges, plane.spacing, size),
            (panel(window(std, float(np.percentile(std, PERCENTILE))),
                   [("std map", sent_colour), (f"0..{np.percentile(std, PERCENTILE) / top:.2g} W", FG)],
                   edges, plane.spacing, size) if std is not None
             else panel(blank, [("std map: none", FG), ("(--preset uncertainty)", FG)], edges, plane.spacing, size)),
            panel(window(diff, top / DIFF_GAIN), [(f"|{rec.method} - SENSE|", FG), (f"x{DIFF_GAIN:g}, window W/{DIFF_GAIN:g}", FG)],
                  edges, plane.spacing, size),
        ]
        header = [(f"{rec.label} | {short_label(lab)}", sent_colour),
                  (AI_LABEL if lab.learned else CLASSICAL_LABEL, sent_colour)]
        return compose(panels, header)


__all__ = ["CompareWriter"]
