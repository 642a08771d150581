"""Training images: magnitude slices from NIfTI volumes (all three axes), .npy, PNG/DICOM folders and
fastMRI-style .h5 (``reconstruction_rss``), .npz slice bundles (a run folder's ``slices.npz``: carry it to
a machine without nibabel), and on-device augmentation.

Every slice is scaled to [0, 1] by its own maximum. Near-empty slices (less than ``min_fill`` of the pixels
above 10 % of the slice max, or a max below 5 % of the volume max) are skipped.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

IMAGE_EXT = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


def _keep(sl: np.ndarray, vmax: float, min_fill: float) -> bool:
    m = float(sl.max())
    if not np.isfinite(m) or m <= 0.05 * vmax:
        return False
    return float((sl > 0.1 * m).mean()) >= min_fill


def _volume_slices(vol: np.ndarray, min_fill: float, axes: tuple[int, ...] = (0, 1, 2)) -> list[np.ndarray]:
    vol = np.nan_to_num(np.abs(np.asarray(vol, dtype=np.float32)))
    if vol.ndim == 2:
        vol = vol[None]
        axes = (0,)
    if vol.ndim != 3:
        raise ValueError(f"expected a 2-D image or 3-D volume, got shape {vol.shape}")
    vmax = float(vol.max())
    out = []
    for ax in axes:
        for i in range(vol.shape[ax]):
            sl = np.take(vol, i, axis=ax)
            if _keep(sl, vmax, min_fill):
                out.append((sl / sl.max()).astype(np.float32))
    return out


def load_slices(path: str | Path, min_fill: float = 0.1, volume: int | None = None) -> list[np.ndarray]:
    """All usable 2-D magnitude slices (float32 in [0, 1]) of one training source.

    volume: which volume of a 4-D NIfTI to use; a 4-D file with more than one volume and no ``volume`` is a
    ValueError naming ``--volume`` (silently taking volume 0 hides the choice)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"training data not found: {p}")
    name = p.name.lower()
    if p.is_dir():
        out: list[np.ndarray] = []
        for q in sorted(p.iterdir()):
            if q.suffix.lower() in IMAGE_EXT + (".dcm",) or q.suffix == "":
                if q.is_file():
                    try:
                        out += load_slices(q, min_fill, volume)
                    except ValueError as e:
                        log.warning("skipping %s: %s", q, e)
        return out
    if name.endswith((".nii", ".nii.gz")):
        import nibabel as nib

        vol = np.asanyarray(nib.load(str(p)).dataobj)
        if vol.ndim == 4 and vol.shape[3] == 1:
            vol = vol[..., 0]
        elif vol.ndim == 4:
            if volume is None:
                raise ValueError(f"{p} holds {vol.shape[3]} volumes: choose one with --volume N (0..{vol.shape[3] - 1})")
            if not 0 <= volume < vol.shape[3]:
                raise ValueError(f"--volume {volume} is outside the {vol.shape[3]} volumes of {p}")
            vol = vol[..., volume]
        return _volume_slices(vol, min_fill)
    if name.endswith(".npy"):
        arr = np.load(p)
        if arr.ndim == 3:  # a stack of 2-D slices (n, H, W): no re-slicing
            return [s for s in (_volume_slices(a, min_fill) for a in arr) for s in s]
        return _volume_slices(arr, min_fill)
    if name.endswith(".npz"):  # a slice bundle (e.g. a run folder's slices.npz): every 2-D array a slice
        with np.load(p) as z:
            return [s for k in z.files if z[k].ndim >= 2 for s in _volume_slices(z[k], min_fill)]
    if name.endswith((".h5", ".hdf5")):
        import h5py

        with h5py.File(p, "r") as f:
            if "reconstruction_rss" not in f:
                raise ValueError(f"{p}: no 'reconstruction_rss' dataset (fastMRI layout expected)")
            arr = np.asarray(f["reconstruction_rss"])
        return [s for a in arr for s in _volume_slices(a, min_fill)]
    if name.endswith(IMAGE_EXT):
        from PIL import Image

        img = np.asarray(Image.open(p).convert("F"), dtype=np.float32)
        return _volume_slices(img, min_fill)
    if name.endswith(".dcm") or p.suffix == "":
        try:
            import pydicom
        except ImportError as e:
            raise ValueError(f"{p}: reading DICOM needs pydicom (pip install pydicom)") from e
        ds = pydicom.dcmread(str(p))
        return _volume_slices(ds.pixel_array.astype(np.float32), min_fill)
    raise ValueError(f"{p}: unsupported training file type (NIfTI, .npy, .h5, PNG/DICOM folder)")


@dataclass
class SliceBank:
    """All slices zero-padded (centred) into one tensor (N, 1, Hm, Wm) plus each slice's content box
    (centre and half extent in normalised [-1, 1] coordinates, (N, 2) each, x then y)."""

    images: torch.Tensor
    centre: torch.Tensor
    half: torch.Tensor

    @classmethod
    def from_slices(cls, slices: list[np.ndarray], device: torch.device | str = "cpu") -> "SliceBank":
        if not slices:
            raise ValueError("no usable training slices")
        hm = max(s.shape[0] for s in slices)
        wm = max(s.shape[1] for s in slices)
        imgs = np.zeros((len(slices), 1, hm, wm), np.float32)
        centre = np.zeros((len(slices), 2), np.float32)
        half = np.zeros((len(slices), 2), np.float32)
        for n, s in enumerate(slices):
            y0 = (hm - s.shape[0]) // 2
            x0 = (wm - s.shape[1]) // 2
            imgs[n, 0, y0:y0 + s.shape[0], x0:x0 + s.shape[1]] = s
            ys, xs = np.nonzero(imgs[n, 0] > 0.1)
            cy, cx = (ys.min() + ys.max() + 1) / 2, (xs.min() + xs.max() + 1) / 2
            centre[n] = (2 * cx / wm - 1, 2 * cy / hm - 1)
            half[n] = ((xs.max() - xs.min() + 1) / wm, (ys.max() - ys.min() + 1) / hm)
        t = lambda a: torch.from_numpy(a).to(device)  # noqa: E731
        return cls(t(imgs), t(centre), t(half))

    def __len__(self) -> int:
        return self.images.shape[0]


@dataclass
class Augment:
    """Augmentation parameters (all on the training device, one grid_sample per batch)."""

    zoom: tuple[float, float] = (0.8, 1.25)  # crop field of view scale, log-uniform
    gamma: tuple[float, float] = (0.7, 1.4)  # intensity gamma, log-uniform
    intensity: tuple[float, float] = (0.8, 1.0)  # global scale
    p_complex: float = 0.5  # probability of real/imag part of image x random smooth phase
    max_phase: float = math.pi  # amplitude of the smooth phase field (rad)


def sample_batch(bank: SliceBank, batch: int, crop: int, aug: Augment,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """A batch (batch, 1, crop, crop) of augmented crops: random slice, zoom, 90-degree rotation, flips,
    crop centre within the content box, gamma, intensity, and (with p_complex) Re/Im of x * exp(i phi)."""
    dev = bank.images.device
    g = generator

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=g, device=dev)

    idx = torch.randint(0, len(bank), (batch,), generator=g, device=dev)
    hm, wm = bank.images.shape[-2:]
    zoom = torch.exp(math.log(aug.zoom[0]) + rand(batch) * math.log(aug.zoom[1] / aug.zoom[0]))
    # output normalised coords -> input normalised coords: scale by crop size in input pixels
    sx = crop / wm * zoom
    sy = crop / hm * zoom
    # 90-degree rotations and flips as signed permutations
    k = torch.randint(0, 4, (batch,), generator=g, device=dev)
    cos = torch.tensor([1.0, 0.0, -1.0, 0.0], device=dev)[k]
    sin = torch.tensor([0.0, 1.0, 0.0, -1.0], device=dev)[k]
    fx = torch.where(rand(batch) < 0.5, -1.0, 1.0)
    theta = torch.zeros(batch, 2, 3, device=dev)
    theta[:, 0, 0] = cos * sx * fx
    theta[:, 0, 1] = -sin * sx
    theta[:, 1, 0] = sin * sy * fx
    theta[:, 1, 1] = cos * sy
    c = bank.centre[idx]
    h = bank.half[idx] * 0.9
    theta[:, :, 2] = c + (2 * rand(batch, 2) - 1) * h
    grid = F.affine_grid(theta, [batch, 1, crop, crop], align_corners=False)
    x = F.grid_sample(bank.images[idx], grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    x = x.clamp_min(0)
    gam = torch.exp(math.log(aug.gamma[0]) + rand(batch) * math.log(aug.gamma[1] / aug.gamma[0]))
    x = x.pow(gam.view(-1, 1, 1, 1))
    x = x * (aug.intensity[0] + rand(batch) * (aug.intensity[1] - aug.intensity[0])).view(-1, 1, 1, 1)
    if aug.p_complex > 0:
        lo = torch.randn(batch, 1, 4, 4, generator=g, device=dev) * (aug.max_phase / 2)
        phi = F.interpolate(lo, size=(crop, crop), mode="bicubic", align_corners=False)
        phi = phi + (2 * rand(batch) - 1).view(-1, 1, 1, 1) * math.pi
        part = torch.where((rand(batch) < 0.5).view(-1, 1, 1, 1), torch.cos(phi), torch.sin(phi))
        use = (rand(batch) < aug.p_complex).view(-1, 1, 1, 1)
        x = torch.where(use, x * part, x)
    return x.contiguous()
