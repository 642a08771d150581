"""ScoreModel backends: the torch network and an onnxruntime session, behind one small interface.

Both pad any H, W up to the network's multiple and crop back *outside* the network (so the exported ONNX
graph stays shape-dynamic). Padding: reflect (mirror without repeating the edge) when the pad is smaller
than the image side, else zero padding; the output is cropped to the input's (H, W) exactly.

``load_score_model(cfg, device)``: ``cfg.path`` empty -> the shipped default ``model/weights/default``;
a ``.onnx`` path or ``cfg.backend == "onnx"`` -> the ONNX backend (a .safetensors checkpoint is exported
to an ONNX file cached in ``$SCOREMRI_CACHE`` / ``~/.cache/scoremri`` on first use, ~2 s once);
``cfg.backend == "auto"`` -> ONNX on CPU when onnxruntime is installed (it runs the network about 1.4x
faster than torch there, and its time per image does not grow with the batch), torch otherwise and on CUDA.

Threads: the ONNX backend runs with as many intra-op threads as torch has (``torch.get_num_threads()``, set
by :mod:`scoremri.gadget.threads`), one session per thread count.
"""
from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .checkpoint import ModelLoadError, load_model, read_card, sha256_file
from .ncsnpp import NCSNpp
from .score import check_input

log = logging.getLogger(__name__)

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
DEFAULT_WEIGHTS = WEIGHTS_DIR / "default.safetensors"


def pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Pad (B, C, H, W) at the bottom/right to multiples of ``multiple``; returns (padded, (H, W)).

    Reflect padding when each pad is smaller than the side it extends, else zeros."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph == 0 and pw == 0:
        return x, (h, w)
    mode = "reflect" if (ph < h and pw < w) else "constant"
    return F.pad(x, (0, pw, 0, ph), mode=mode), (h, w)


def crop_to(x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    return x[..., : hw[0], : hw[1]]


class _Backend:
    """What both backends share: Tweedie's denoiser on top of their ``score``. ``windowable``: a convolutional
    network takes any window of an image (the samplers may crop to the object, recon/samplers/common.py)."""

    windowable = True

    def score(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """Tweedie: x + sigma^2 * score."""
        s = check_input(x, sigma).view(-1, 1, 1, 1)
        return x + s * s * self.score(x, sigma)


class TorchScoreModel(_Backend):
    """The torch backend: fp32 weights; ``precision`` bf16/fp16 runs the network under autocast."""

    def __init__(self, net: NCSNpp, card: dict[str, Any], device: torch.device | str = "cpu",
                 precision: str = "fp32", compile: bool = False) -> None:
        self.device = torch.device(device)
        self.net = net.to(self.device).eval()
        self.card = card
        self.multiple = net.multiple
        self.sigma_min = float(card["sde"]["sigma_min"])
        self.sigma_max = float(card["sde"]["sigma_max"])
        self.sha256 = str(card.get("sha256", ""))
        self.name = f"ncsnpp-{card.get('size', 'custom')}"
        if precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be fp32, bf16 or fp16, got {precision!r}")
        self.precision = precision
        self._fn = torch.compile(self.net, dynamic=True) if compile else self.net

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dt = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dt)

    @torch.no_grad()
    def score(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W), (B,) -> score (B, 1, H, W) float32 on x's device."""
        sigma = check_input(x, sigma)
        xp, hw = pad_to_multiple(x.to(self.device, torch.float32), self.multiple)
        with self._autocast():
            out = self._fn(xp, sigma.to(self.device))
        return crop_to(out.float(), hw).to(x.device)


class OnnxScoreModel(_Backend):
    """The onnxruntime backend (CUDA provider when available and asked for, else CPU)."""

    def __init__(self, path: str | Path, device: torch.device | str = "cpu") -> None:
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise ModelLoadError("the ONNX backend needs onnxruntime (pip install scoremri[onnx])") from e
        path = Path(path)
        if not path.exists():
            raise ModelLoadError(f"{path}: ONNX file missing")
        self.device = torch.device(device)
        avail = ort.get_available_providers()
        providers = ["CPUExecutionProvider"]
        if self.device.type == "cuda" and "CUDAExecutionProvider" in avail:
            providers.insert(0, "CUDAExecutionProvider")
        elif self.device.type == "cuda":
            log.warning("onnxruntime has no CUDA provider (install onnxruntime-gpu); running on CPU")
        self._ort, self._path, self._providers = ort, path, providers
        self._sessions: dict[int, Any] = {}
        self.session = self._session()
        meta = self.session.get_modelmeta().custom_metadata_map
        for key in ("multiple", "sigma_min", "sigma_max"):
            if key not in meta:
                raise ModelLoadError(f"{path}: ONNX metadata lacks '{key}' (export with 'scoremri export')")
        self.multiple = int(meta["multiple"])
        self.sigma_min = float(meta["sigma_min"])
        self.sigma_max = float(meta["sigma_max"])
        self.sha256 = meta.get("weights_sha256", "") or sha256_file(path)
        self.name = meta.get("name", "ncsnpp-onnx")
        self.providers = self.session.get_providers()

    def _session(self) -> Any:
        """The session for torch's current thread count (created on first use of that count)."""
        threads = max(torch.get_num_threads(), 1)
        if threads not in self._sessions:
            opts = self._ort.SessionOptions()
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
            try:
                self._sessions[threads] = self._ort.InferenceSession(str(self._path), sess_options=opts,
                                                                     providers=self._providers)
            except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
                raise ModelLoadError(f"{self._path}: onnxruntime cannot load it ({e})") from e
        return self._sessions[threads]

    @torch.no_grad()
    def score(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        sigma = check_input(x, sigma)
        xp, hw = pad_to_multiple(x.detach().float().cpu(), self.multiple)
        out = self._session().run(["score"], {"x": xp.contiguous().numpy(),
                                              "sigma": sigma.detach().float().cpu().numpy()})[0]
        return crop_to(torch.from_numpy(out), hw).to(x.device)


def _cache_dir() -> Path:
    return Path(os.environ.get("SCOREMRI_CACHE", Path.home() / ".cache" / "scoremri"))


def resolve_backend(cfg: Any, device: torch.device | str) -> str:
    """``cfg.backend``, with 'auto' -> 'onnx' on CPU for an fp32, uncompiled model when onnxruntime is
    importable, else 'torch'."""
    backend = getattr(cfg, "backend", "torch")
    if backend != "auto":
        return backend
    if torch.device(device).type != "cpu" or getattr(cfg, "precision", "fp32") != "fp32" or getattr(cfg, "compile", False):
        return "torch"
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return "torch"
    return "onnx"


def cached_onnx(path: Path) -> Path:
    """The ONNX export of the checkpoint ``path`` in the cache, written on first use (atomically: concurrent
    scans may export at once)."""
    card = read_card(path)
    onnx_path = _cache_dir() / f"{path.stem}-{card['sha256'][:16]}.onnx"
    if not onnx_path.exists():
        from .export import export_onnx

        net, card = load_model(path, "cpu")
        onnx_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = onnx_path.with_name(f".{onnx_path.name}.{os.getpid()}.tmp")
        try:
            export_onnx(net, card, tmp)
            os.replace(tmp, onnx_path)
        finally:
            tmp.unlink(missing_ok=True)
        log.info("exported %s to %s (ONNX backend cache)", path, onnx_path)
    return onnx_path


def load_score_model(cfg: Any, device: torch.device | str = "cpu") -> TorchScoreModel | OnnxScoreModel:
    """A ScoreModel from a :class:`scoremri.recon.config.ModelConfig` (path, backend, precision, compile)."""
    path = Path(cfg.path) if getattr(cfg, "path", "") else DEFAULT_WEIGHTS
    backend = resolve_backend(cfg, device)
    if path.suffix == ".onnx":
        return OnnxScoreModel(path, device)
    if path.suffix != ".safetensors":
        raise ModelLoadError(f"{path}: model.path must be a .safetensors checkpoint or an .onnx file")
    if backend == "onnx":
        if getattr(cfg, "backend", "torch") == "onnx":
            return OnnxScoreModel(cached_onnx(path), device)
        try:  # auto: the faster backend when it can be had, never a failed scan when it cannot
            return OnnxScoreModel(cached_onnx(path), device)
        except Exception as e:  # noqa: BLE001 - export or onnxruntime failure: torch still works
            log.warning("model.backend auto: the ONNX backend is not available (%s: %s); using torch",
                        type(e).__name__, e)
    net, card = load_model(path, device)
    return TorchScoreModel(net, card, device, precision=getattr(cfg, "precision", "fp32"),
                           compile=bool(getattr(cfg, "compile", False)))
