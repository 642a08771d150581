"""NCSN++-style score U-Net (Song et al. 2021; as used by Chung & Ye 2022) from plain torch ops only.

BigGAN residual blocks (GroupNorm -> SiLU -> conv, sigma embedding added, GroupNorm -> SiLU -> conv, 1x1
skip; sum rescaled by 1/sqrt(2)), FIR anti-aliased up/down sampling with the fixed [1,3,3,1] kernel as plain
depthwise (transposed) convolutions, a Gaussian Fourier embedding of log(sigma), a residual input pyramid,
DDPM-style self-attention in the middle block (and at the levels named in ``attn_levels``).

Input x (B, 1, H, W) with H, W multiples of ``net.multiple`` (the wrapper in ``backends.py`` pads), sigma
(B,). The raw network output F is turned into the score by the preconditioning chosen in the config:

* ``"ncsn"`` (the paper): score = F(x, sigma) / sigma.
* ``"edm"`` (Karras et al. 2022): D = c_skip x + c_out F(c_in x, log sigma) with sigma_data, and
  score = (D - x) / sigma^2 -- exactly the score of the denoiser D by Tweedie's formula.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

_FIR = (1.0, 3.0, 3.0, 1.0)


@dataclass
class NetConfig:
    """Architecture of the score network; ``name`` is the size label (tiny / default / paper / custom)."""

    name: str = "default"
    nf: int = 32
    ch_mult: tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attn_levels: tuple[int, ...] = ()  # level indices (0 = full resolution) with attention after each block
    fourier_scale: float = 16.0
    precond: str = "edm"  # edm | ncsn
    sigma_data: float = 0.5  # EDM only: assumed data std (images in [0, 1] / [-1, 1])
    dropout: float = 0.0

    @property
    def multiple(self) -> int:
        """H and W must be multiples of this (2 ** number of down-samplings)."""
        return 2 ** (len(self.ch_mult) - 1)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ch_mult"] = list(self.ch_mult)
        d["attn_levels"] = list(self.attn_levels)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "NetConfig":
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown network config fields: {sorted(unknown)}")
        d = dict(d)
        for k in ("ch_mult", "attn_levels"):
            if k in d:
                d[k] = tuple(int(v) for v in d[k])
        cfg = cls(**d)
        if cfg.precond not in ("edm", "ncsn"):
            raise ValueError(f"precond must be 'edm' or 'ncsn', got {cfg.precond!r}")
        return cfg


SIZES: dict[str, NetConfig] = {
    # tests: < 0.5 M parameters
    "tiny": NetConfig(name="tiny", nf=16, ch_mult=(1, 2, 2), num_res_blocks=1),
    # shipped: small enough for the CPU sampler target (see benchmarks/network.py)
    "default": NetConfig(name="default", nf=16, ch_mult=(1, 1, 2, 4, 8), num_res_blocks=2),
    # the GPU-trained prior of issue 10 (scripts/gpu_run.py; the choice in scripts/README.md): the shipped
    # default's full- and half-resolution width (what a CPU forward pays for) with 2-4x the channels below
    "medium": NetConfig(name="medium", nf=16, ch_mult=(1, 2, 4, 6, 8), num_res_blocks=2),
    # official score-MRI fastMRI config (nf 128, ch_mult 1,2,2,2, 4 res blocks): ~61.4 M parameters
    "paper": NetConfig(name="paper", nf=128, ch_mult=(1, 2, 2, 2), num_res_blocks=4, precond="ncsn"),
}


def net_config(size: str | NetConfig | dict, **overrides: Any) -> NetConfig:
    """A named size (``tiny``/``default``/``paper``), a dict (from a card) or a NetConfig, with overrides."""
    if isinstance(size, NetConfig):
        base = size.to_dict()
    elif isinstance(size, dict):
        base = NetConfig.from_dict(size).to_dict()
    else:
        if size not in SIZES:
            raise ValueError(f"unknown network size {size!r} (known: {', '.join(SIZES)})")
        base = SIZES[size].to_dict()
    base.update(overrides)
    return NetConfig.from_dict(base)


def _groups(ch: int) -> int:
    """GroupNorm groups: min(ch // 4, 32) as in NCSN++, lowered until it divides ch."""
    g = max(1, min(ch // 4, 32))
    while ch % g:
        g -= 1
    return g


def _fir_kernel(gain: float) -> torch.Tensor:
    k = torch.tensor(_FIR)
    k2 = torch.outer(k, k)
    return (k2 / k2.sum() * gain).view(1, 1, 4, 4)


class FirUp(nn.Module):
    """x2 FIR up-sampling (upfirdn2d with [1,3,3,1], gain 4) = depthwise transposed conv, stride 2."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.ch = ch
        self.register_buffer("k", _fir_kernel(4.0).repeat(ch, 1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv_transpose2d(x, self.k.to(x.dtype), stride=2, padding=1, groups=self.ch)


class FirDown(nn.Module):
    """/2 FIR down-sampling (upfirdn2d with [1,3,3,1]) = depthwise conv, stride 2, padding 1."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.ch = ch
        self.register_buffer("k", _fir_kernel(1.0).repeat(ch, 1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.k.to(x.dtype), stride=2, padding=1, groups=self.ch)


class FirConvDown(nn.Module):
    """FIR blur (pad 2) then 3x3 conv with stride 2 (the input pyramid's down-sampling with conv)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.cin = cin
        self.register_buffer("k", _fir_kernel(1.0).repeat(cin, 1, 1, 1), persistent=False)
        self.conv = nn.Conv2d(cin, cout, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.conv2d(x, self.k.to(x.dtype), padding=2, groups=self.cin)
        return self.conv(x)


class FourierEmbedding(nn.Module):
    """Gaussian Fourier features of a scalar: [sin(2 pi W t), cos(2 pi W t)], W ~ N(0, scale^2), fixed."""

    def __init__(self, size: int, scale: float) -> None:
        super().__init__()
        self.W = nn.Parameter(torch.randn(size) * scale, requires_grad=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        p = t[:, None] * self.W[None, :] * (2 * math.pi)
        return torch.cat([torch.sin(p), torch.cos(p)], dim=1)


class ResBlock(nn.Module):
    """BigGAN-style residual block with optional FIR up/down sampling, skip rescale 1/sqrt(2)."""

    def __init__(self, cin: int, cout: int, temb: int, up: bool = False, down: bool = False,
                 dropout: float = 0.0) -> None:
        super().__init__()
        self.norm0 = nn.GroupNorm(_groups(cin), cin, eps=1e-6)
        self.conv0 = nn.Conv2d(cin, cout, 3, padding=1)
        self.dense = nn.Linear(temb, cout)
        self.norm1 = nn.GroupNorm(_groups(cout), cout, eps=1e-6)
        self.drop = nn.Dropout(dropout)
        self.conv1 = nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.conv1.weight)  # init_scale 0 as in NCSN++: blocks start as identity
        nn.init.zeros_(self.conv1.bias)
        self.resample: nn.Module | None = FirUp(cin) if up else (FirDown(cin) if down else None)
        self.skip = nn.Conv2d(cin, cout, 1) if (cin != cout or up or down) else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = F.silu(self.norm0(x))
        if self.resample is not None:
            h = self.resample(h)
            x = self.resample(x)
        h = self.conv0(h)
        h = h + self.dense(temb)[:, :, None, None]
        h = self.conv1(self.drop(F.silu(self.norm1(h))))
        if self.skip is not None:
            x = self.skip(x)
        return (x + h) * (1.0 / math.sqrt(2.0))


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels (DDPM style), skip rescale 1/sqrt(2)."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(_groups(ch), ch, eps=1e-6)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.out = nn.Conv2d(ch, ch, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).unbind(1)
        a = torch.softmax(torch.einsum("bci,bcj->bij", q, k) * (c ** -0.5), dim=-1)
        o = torch.einsum("bij,bcj->bci", a, v).reshape(b, c, h, w)
        return (x + self.out(o)) * (1.0 / math.sqrt(2.0))


class NCSNpp(nn.Module):
    """The score network. ``forward(x, sigma)`` returns the score (B, 1, H, W); ``raw`` the network F."""

    def __init__(self, cfg: NetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        nf, temb = cfg.nf, cfg.nf * 4
        self.multiple = cfg.multiple
        self.embed = FourierEmbedding(nf, cfg.fourier_scale)
        self.temb0 = nn.Linear(2 * nf, temb)
        self.temb1 = nn.Linear(temb, temb)
        self.conv_in = nn.Conv2d(1, nf, 3, padding=1)
        nlev = len(cfg.ch_mult)
        self.down = nn.ModuleList()
        self.pyramid = nn.ModuleList()
        hs_c = [nf]
        ch = nf
        pyr_ch = 1
        for lev in range(nlev):
            blocks = nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                out = nf * cfg.ch_mult[lev]
                blocks.append(ResBlock(ch, out, temb, dropout=cfg.dropout))
                ch = out
                if lev in cfg.attn_levels:
                    blocks.append(AttnBlock(ch))
                hs_c.append(ch)
            if lev != nlev - 1:
                blocks.append(ResBlock(ch, ch, temb, down=True, dropout=cfg.dropout))
                self.pyramid.append(FirConvDown(pyr_ch, ch))
                pyr_ch = ch
                hs_c.append(ch)
            self.down.append(blocks)
        self.mid = nn.ModuleList([ResBlock(ch, ch, temb, dropout=cfg.dropout), AttnBlock(ch),
                                  ResBlock(ch, ch, temb, dropout=cfg.dropout)])
        self.up = nn.ModuleList()
        for lev in reversed(range(nlev)):
            blocks = nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                out = nf * cfg.ch_mult[lev]
                blocks.append(ResBlock(ch + hs_c.pop(), out, temb, dropout=cfg.dropout))
                ch = out
            if lev in cfg.attn_levels:
                blocks.append(AttnBlock(ch))
            if lev != 0:
                blocks.append(ResBlock(ch, ch, temb, up=True, dropout=cfg.dropout))
            self.up.append(blocks)
        assert not hs_c
        self.norm_out = nn.GroupNorm(_groups(ch), ch, eps=1e-6)
        self.conv_out = nn.Conv2d(ch, 1, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def raw(self, x: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        """The U-Net F(x, c_noise): (B, 1, H, W), (B,) -> (B, 1, H, W); c_noise = log sigma."""
        temb = self.temb1(F.silu(self.temb0(self.embed(c_noise))))
        temb = F.silu(temb)  # every block's dense layer sees act(temb), as in NCSN++
        pyr = x
        hs = [self.conv_in(x)]
        for lev, blocks in enumerate(self.down):
            h = hs[-1]
            for blk in blocks:
                if isinstance(blk, AttnBlock):
                    h = blk(h)
                    hs[-1] = h
                    continue
                h = blk(h, temb)
                if blk.resample is not None:  # the down-sampling block ends the level
                    pyr = self.pyramid[lev](pyr)
                    pyr = (pyr + h) * (1.0 / math.sqrt(2.0))
                    h = pyr
                hs.append(h)
        h = hs[-1]
        h = self.mid[0](h, temb)
        h = self.mid[1](h)
        h = self.mid[2](h, temb)
        for blocks in self.up:
            for blk in blocks:
                if isinstance(blk, AttnBlock):
                    h = blk(h)
                elif blk.resample is not None:
                    h = blk(h, temb)
                else:
                    h = blk(torch.cat([h, hs.pop()], dim=1), temb)
        return self.conv_out(F.silu(self.norm_out(h)))

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Score grad_x log p_sigma(x): x (B, 1, H, W) with H, W multiples of ``multiple``, sigma (B,) > 0."""
        s = sigma.to(x.dtype).view(-1, 1, 1, 1)
        c_noise = torch.log(sigma.to(x.dtype))
        if self.cfg.precond == "ncsn":
            return self.raw(x, c_noise) / s
        sd = self.cfg.sigma_data
        c_in = 1.0 / torch.sqrt(s * s + sd * sd)
        # (D - x) / sigma^2 with D = c_skip x + c_out F, c_skip = sd^2 c_in^2, c_out = sigma sd c_in,
        # written without the cancellation of c_skip - 1 at small sigma:
        return -x * (c_in * c_in) + (sd * c_in / s) * self.raw(c_in * x, c_noise)


def build_network(size: str | NetConfig | dict = "default", **overrides: Any) -> NCSNpp:
    """Construct the network for a named size / config (random initialisation)."""
    return NCSNpp(net_config(size, **overrides))


def count_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())
