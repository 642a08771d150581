"""PNG pictures of ISMRMRD images that say what they show.

- :func:`preview`: the magnitude windowed at its 99.5th percentile, (ny, nx) uint8.
- :func:`write_png`: one labelled picture per image (``<prefix>_s<series>_<index>.png``): a title bar with the
  method, NFE and "AI-generated" where a learned method made the image (:func:`scoremri.gadget.images.short_label`),
  the series, slice and plane, and the patient-orientation letters (R/L, A/P, S/I) beside each edge, from the
  image header's geometry (:mod:`.geometry`). Small images are enlarged (nearest neighbour, physical aspect
  ratio kept) so the text stays readable; the image pixels themselves are never drawn over.
  The label is also stored as PNG text (``Description``, ``Comment``, ``AIGenerated``).
- :func:`panel` / :func:`compose`: the building blocks of ``replay --compare`` (:mod:`.compare`).
Text is rendered with Pillow's built-in font (a scalable one from Pillow 10.1 on).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable, Sequence

import ismrmrd
import numpy as np

from ..images import image_label, short_label
from .geometry import Plane, edge_letters, plane_name, planes

MIN_SIDE = 256  # pictures smaller than this are enlarged
FONT_PX = 14
BG = (0, 0, 0)
FG = (235, 235, 235)
AI_FG = (255, 190, 60)  # the AI label stands out
LETTER_FG = (120, 200, 255)


def preview(data: np.ndarray, percentile: float = 99.5) -> np.ndarray:
    """Magnitude preview (ny, nx) uint8 of an image array (cha, z, y, x) or (y, x): RSS over channels, first
    z, window [0, percentile]."""
    a = np.asarray(data)
    if a.ndim == 4:
        a = np.sqrt(np.sum(np.abs(a[:, 0]) ** 2, axis=0))
    a = np.abs(a).astype(np.float64)
    if a.ndim != 2:
        raise ValueError(f"preview needs (cha, z, y, x) or (y, x), got shape {np.shape(data)}")
    a = np.nan_to_num(a)
    return window(a, float(np.percentile(a, percentile)) if a.size else 0.0)


def window(a: np.ndarray, top: float) -> np.ndarray:
    """|a| scaled so that ``top`` -> 255 (clipped), uint8; ``top`` <= 0 -> the maximum."""
    a = np.nan_to_num(np.abs(np.asarray(a)).astype(np.float64))
    if top <= 0:
        top = float(a.max()) or 1.0
    return (np.clip(a / top, 0, 1) * 255 + 0.5).astype(np.uint8)


def font(size: int = FONT_PX) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        return ImageFont.load_default()


def _text_size(draw: Any, text: str, f: Any) -> tuple[int, int]:
    if not text:
        return 0, 0
    x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=f)
    return int(x1 - x0), int(y1 - y0)


def enlarge_factors(shape: tuple[int, int], spacing: tuple[float, float] = (1.0, 1.0),
                    min_side: int = MIN_SIDE) -> tuple[int, int]:
    """(height, width) in display pixels of an (ny, nx) image with pixel ``spacing`` (dy, dx) mm: enlarged by
    an integer factor until its longer side reaches ``min_side``, with the physical aspect ratio."""
    ny, nx = shape
    dy, dx = (float(spacing[0]) or 1.0), (float(spacing[1]) or 1.0)
    unit = min(dy, dx)
    h, w = ny * dy / unit, nx * dx / unit
    f = max(1, math.ceil(min_side / max(h, w)))
    return max(1, round(h * f)), max(1, round(w * f))


def panel(gray: np.ndarray, title: Sequence[tuple[str, tuple[int, int, int]]], edges: dict[str, str] | None,
          spacing: tuple[float, float] = (1.0, 1.0), size: tuple[int, int] | None = None) -> Any:
    """One labelled picture (PIL RGB image): ``gray`` (ny, nx) uint8 enlarged to ``size`` (height, width; default
    :func:`enlarge_factors`), ``title`` lines (text, colour) above it, orientation letters ``edges`` in a margin
    around it (none when ``edges`` is None)."""
    from PIL import Image, ImageDraw

    h, w = size or enlarge_factors(gray.shape, spacing)
    pic = Image.fromarray(np.ascontiguousarray(gray)).resize((w, h), Image.NEAREST).convert("RGB")
    f = font()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = max(_text_size(probe, "Ag", f)[1], 8) + 6
    m = line_h if edges else 0  # top and bottom margins
    side = max(_text_size(probe, edges[k], f)[0] for k in ("left", "right")) + 12 if edges else 0
    title_h = line_h * len(title) + 4
    width = max(w + 2 * side, max((_text_size(probe, t, f)[0] + 8 for t, _ in title), default=0))
    canvas = Image.new("RGB", (width, title_h + h + 2 * m), BG)
    x0, y0 = (width - w) // 2, title_h + m
    canvas.paste(pic, (x0, y0))
    canvas.info["image_box"] = (x0, y0, w, h)
    d = ImageDraw.Draw(canvas)
    for i, (text, colour) in enumerate(title):
        d.text((4, 2 + i * line_h), text, fill=colour, font=f)
    if edges:
        for key, (cx, cy) in {
            "top": (x0 + w / 2, y0 - m / 2), "bottom": (x0 + w / 2, y0 + h + m / 2),
            "left": (x0 - side / 2, y0 + h / 2), "right": (x0 + w + side / 2, y0 + h / 2),
        }.items():
            tw, th = _text_size(d, edges[key], f)
            d.text((cx - tw / 2, cy - th / 2 - 2), edges[key], fill=LETTER_FG, font=f)
    return canvas


def compose(panels: Sequence[Any], header: Sequence[tuple[str, tuple[int, int, int]]] = ()) -> Any:
    """Panels side by side under ``header`` lines (PIL RGB image)."""
    from PIL import Image, ImageDraw

    f = font()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = max(_text_size(probe, "Ag", f)[1], 8) + 6
    head_h = line_h * len(header) + (4 if header else 0)
    width = max(sum(p.width for p in panels), max((_text_size(probe, t, f)[0] + 8 for t, _ in header), default=0))
    height = head_h + max(p.height for p in panels)
    out = Image.new("RGB", (width, height), BG)
    d = ImageDraw.Draw(out)
    for i, (text, colour) in enumerate(header):
        d.text((4, 2 + i * line_h), text, fill=colour, font=f)
    x = 0
    for i, p in enumerate(panels):
        out.paste(p, (x, head_h))
        x += p.width
        if i < len(panels) - 1:
            d.line([(x - 1, head_h), (x - 1, height)], fill=(60, 60, 60))  # a thin rule between panels
    return out


def describe(img: ismrmrd.Image, plane: Plane, partition: int = 0) -> list[tuple[str, tuple[int, int, int]]]:
    """Title lines of one image: its label (AI colour where a learned method made it), then series, index,
    slice counter, plane and partition."""
    lab = image_label(img)
    head = img.getHead()
    where = (f"series {head.image_series_index} image {head.image_index} | slice {head.slice} | "
             + ("geometry absent" if plane.guessed else plane_name(plane))
             + (f" | partition {partition}" if int(head.matrix_size[2]) > 1 else ""))
    return [(short_label(lab), AI_FG if lab.learned else FG), (where, FG)]


def png_text(img: ismrmrd.Image, box: tuple[int, int, int, int]) -> Any:
    """PNG text chunks: the label (``Description``, ``Comment`` = ImageComment, ``AIGenerated``) and where
    the image lies in the picture (``scoremri:image_box`` = x0,y0,width,height)."""
    from PIL.PngImagePlugin import PngInfo

    lab = image_label(img)
    info = PngInfo()
    info.add_itxt("Description", short_label(lab))
    info.add_itxt("Comment", lab.comment)
    info.add_text("AIGenerated", "true" if lab.learned else "false")
    info.add_text("Software", "scoremri")
    info.add_text("scoremri:image_box", ",".join(str(int(v)) for v in box))
    return info


def write_png(directory: str | Path, images: Iterable[ismrmrd.Image], prefix: str = "image") -> list[Path]:
    """One labelled magnitude PNG per image (per z partition for 3-D): ``<prefix>_s<series>_<index>.png``
    (``..._p<partition>`` for 3-D); std maps land in their own series."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for n, img in enumerate(images):
        series = int(img.image_series_index)
        index = int(img.image_index) or n + 1
        data = np.asarray(img.data)
        mag = np.sqrt(np.sum(np.abs(data) ** 2, axis=0))  # (z, y, x)
        ps = planes(img.getHead())
        for p, plane in enumerate(ps):
            name = f"{prefix}_s{series}_{index:03d}" + (f"_p{p}" if len(ps) > 1 else "") + ".png"
            edges = None if plane.guessed else edge_letters(plane)
            pic = panel(preview(mag[p]), describe(img, plane, p), edges, plane.spacing)
            pic.save(d / name, pnginfo=png_text(img, pic.info["image_box"]))
            paths.append(d / name)
    return paths


__all__ = ["compose", "describe", "enlarge_factors", "font", "panel", "png_text", "preview", "window", "write_png"]
