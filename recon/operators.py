"""SENSE operator ``A = M F S`` with forward, adjoint and normal (torch, batched, CPU or CUDA).

Shapes: image ``(..., ny, nx)`` complex; coil maps ``(C, ny, nx)`` or ``(..., C, ny, nx)`` (normalised to
sum_c |S_c|^2 = 1 inside the object); mask ``(ky, kx)`` bool/float, or with leading axes, broadcastable
against ``(..., C, ky, kx)``; k-space ``(..., C, ky, kx)``. A batch of slices: maps ``(S, 1, C, ny, nx)``,
mask ``(S, 1, 1, ky, kx)`` and images ``(S, K, ny, nx)`` (K samples per slice).

The normal operator A^H A runs in a permuted image domain, the "CG domain" (``to_cg``, ``normal_cg``,
``from_cg``), without the four fftshift copies of the coil tensors per call: fft2c = shift . fft2 . ishift,
so ``sum_c S_c^* ifft2c(M fft2c(S_c x)) = shift( sum_c S'_c^* ifft2(M' fft2(S'_c x')) )`` with primes =
ifftshift-ed arrays (exact, odd sizes included: shift and ishift are permutations). CG is invariant under
permutations, so iterative solvers run on x' = to_cg(x) throughout.

One-dimensional undersampling (every k-space row either fully measured or not at all: Cartesian phase
encoding with the whole readout, the usual case) makes A^H A cheaper still: with F = F_y F_x and
M = M_y (x) I, F^H M F = F_y^H M_y F_y (F_x^H F_x = I and F_x commutes with M_y), so A^H A needs 1-D FFTs
along ky only: exactly the same operator. The CG domain is then also transposed, so those FFTs run along
contiguous memory (a strided 1-D FFT is no faster than the 2-D one; the contiguous one makes A^H A about
20 % faster for 8 coils at 256x256). Likewise along kx when every column is full or empty.
"""
from __future__ import annotations

from functools import cached_property

import torch

from .fft import fft2c, ifft2c

_DIMS = (-2, -1)


class SenseOp:
    """Multi-coil Cartesian SENSE operator. ``adjoint`` is the exact adjoint of ``forward``.

    chunk_bytes: on CPU, ``normal`` works in pieces whose coil tensors hold at most this many bytes (4 MiB:
    one 8-coil 256x256 image; see :meth:`normal_cg`).
    """

    def __init__(self, maps: torch.Tensor, mask: torch.Tensor, chunk_bytes: int = 4 * 2**20):
        if maps.dim() < 3:
            raise ValueError(f"coil maps must be (..., C, ny, nx), got shape {tuple(maps.shape)}")
        if tuple(mask.shape[-2:]) != tuple(maps.shape[-2:]):
            raise ValueError(f"mask shape {tuple(mask.shape)} does not match maps {tuple(maps.shape)}")
        self.maps = maps
        self.mask = mask.to(device=maps.device, dtype=maps.real.dtype)
        self.chunk_bytes = int(chunk_bytes) if maps.device.type == "cpu" else 0
        # the FFT axis of A^H A: -2 (rows full or empty), -1 (columns full or empty), or None (2-D)
        m = self.mask
        if bool((m == m[..., :1]).all()):
            self.axis: int | None = -2
        elif bool((m == m[..., :1, :]).all()):
            self.axis = -1
        else:
            self.axis = None

    @property
    def shape_image(self) -> tuple[int, int]:
        return tuple(self.maps.shape[-2:])  # type: ignore[return-value]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., ny, nx) -> (..., C, ky, kx): measured k-space of image x."""
        return self.mask * fft2c(self.maps * x.unsqueeze(-3))

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """(..., C, ky, kx) -> (..., ny, nx): coil-combined back-projection."""
        return (self.maps.conj() * ifft2c(self.mask * y)).sum(dim=-3)

    @property
    def _transposed(self) -> bool:
        return self.axis == -2

    def to_cg(self, x: torch.Tensor) -> torch.Tensor:
        """Image (..., ny, nx) -> the CG domain: ifftshift-ed, and transposed for a 1-D pattern along ky."""
        v = torch.fft.ifftshift(x, dim=_DIMS)
        return v.transpose(-1, -2).contiguous() if self._transposed else v

    def from_cg(self, v: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`to_cg`."""
        if self._transposed:
            v = v.transpose(-1, -2)
        return torch.fft.fftshift(v, dim=_DIMS).contiguous()

    @cached_property
    def _cg_arrays(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Maps, their conjugate and the mask in the CG domain (built on the first ``normal`` call); with a
        1-D pattern the mask keeps only its varying axis, as a row (1, n) along the last axis."""
        maps = self.to_cg(self.maps)
        mask = self.to_cg(self.mask)
        if self.axis is not None:
            mask = mask[..., :1, :]
        return maps, maps.conj().resolve_conj(), mask.contiguous()

    def _normal(self, v: torch.Tensor, maps: torch.Tensor, maps_conj: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        c = maps * v.unsqueeze(-3)
        shape = c.shape
        flat = (-1, *shape[-2:])  # FFTs of a 3-D view: on 5-D batches (slices, samples, coils) MKL was 3.6x slower
        if self.axis is None:
            k = torch.fft.fft2(c.reshape(flat), norm="ortho").reshape(shape)
            k.mul_(mask)
            c = torch.fft.ifft2(k.reshape(flat), norm="ortho").reshape(shape)
        else:
            k = torch.fft.fft(c.reshape(flat), dim=-1, norm="ortho").reshape(shape)
            k.mul_(mask)
            c = torch.fft.ifft(k.reshape(flat), dim=-1, norm="ortho").reshape(shape)
        c.mul_(maps_conj)
        return c.sum(dim=-3)

    def normal_cg(self, v: torch.Tensor) -> torch.Tensor:
        """A^H A in the CG domain: v = to_cg(x) (..., a, b) -> to_cg(A^H A x).

        On CPU the work is cut into pieces whose coil tensors hold at most ``chunk_bytes`` (temporaries beyond
        the cache, and fresh pages for big ones, made a batch of four 8-coil 256x256 slices 2.4x slower than
        the same slices one by one): along the leading axis of v, and within it (the samples of one slice of
        a batch) when one index is already too big; maps and mask with the same leading axis go alongside."""
        return self._chunked(v, *self._cg_arrays)

    def _chunked(self, v: torch.Tensor, maps: torch.Tensor, maps_conj: torch.Tensor,
                 mask: torch.Tensor) -> torch.Tensor:
        if not self.chunk_bytes or v.dim() < 3:
            return self._normal(v, maps, maps_conj, mask)
        per_lead = v[0].numel() * self.maps.shape[-3] * v.element_size()
        if v.shape[0] * per_lead <= self.chunk_bytes or v.shape[0] == 1 and v.dim() < 4:
            return self._normal(v, maps, maps_conj, mask)
        lead_maps = maps.dim() >= v.dim() + 1 and maps.shape[0] == v.shape[0]
        lead_mask = mask.dim() >= v.dim() + 1 and mask.shape[0] == v.shape[0]
        if per_lead > self.chunk_bytes and v.dim() >= 4:  # one slice is too big: its samples in pieces
            return torch.stack([
                self._chunked(v[i], maps[i] if lead_maps else maps, maps_conj[i] if lead_maps else maps_conj,
                              mask[i] if lead_mask else mask)
                for i in range(v.shape[0])
            ])
        chunk = max(self.chunk_bytes // per_lead, 1)
        out = []
        for i in range(0, v.shape[0], chunk):
            sl = slice(i, i + chunk)
            out.append(self._normal(v[sl], maps[sl] if lead_maps else maps,
                                    maps_conj[sl] if lead_maps else maps_conj, mask[sl] if lead_mask else mask))
        return torch.cat(out, 0)

    def normal(self, x: torch.Tensor) -> torch.Tensor:
        """A^H A x, (..., ny, nx) -> (..., ny, nx)."""
        return self.from_cg(self.normal_cg(self.to_cg(x)))

    __call__ = forward
