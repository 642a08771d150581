"""The shipped default model: loads (hash-checked), small, documented, and denoises held-out data."""
import json

import numpy as np
import torch

from scoremri.model.backends import DEFAULT_WEIGHTS, OnnxScoreModel, TorchScoreModel
from scoremri.model.score import ScoreModel, load_score_model
from scoremri.recon.config import ModelConfig


def test_default_model_files_and_card() -> None:
    assert DEFAULT_WEIGHTS.exists(), f"{DEFAULT_WEIGHTS} missing: the default model must ship in the repo"
    assert DEFAULT_WEIGHTS.stat().st_size <= 15e6
    card = json.loads(DEFAULT_WEIGHTS.with_suffix(".json").read_text())
    assert card["weights_dtype"] == "float16"
    names = sorted(f["name"] for f in card["training"]["files"])
    assert names == ["inia19-t1-brain.nii.gz", "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"]
    assert all(len(f["sha256"]) == 64 for f in card["training"]["files"])
    t = card["training"]
    if t.get("gpu"):  # trained by issue 10's GPU run, installed by scripts/gpu_accept.py
        assert "GPU" in t["note"] and "gpu_run.sh" in t["retrain"] and t["it_per_s"] > 0 and t["seed"] is not None
        assert card["gpu_run"]["decision"]["accept"] and not card["gpu_run"]["forced"]
    else:
        assert "CPU" in t["note"] and "scoremri train" in t["retrain"]
    for extra in ("default.md", "loss.png", "samples.png"):
        assert (DEFAULT_WEIGHTS.parent / extra).stat().st_size > 0


def test_default_model_denoises_dipy_slice_by_more_than_6db(dipy_t1: np.ndarray) -> None:
    """Both backends of the shipped model: torch, and ONNX (model.backend auto on CPU, onnxruntime installed)."""
    x0 = torch.from_numpy(dipy_t1)[None, None]
    g = torch.Generator().manual_seed(0)
    sigma = 0.1
    y = x0 + sigma * torch.randn(x0.shape, generator=g)

    def psnr(a: torch.Tensor) -> float:
        return 10 * np.log10(1.0 / ((a - x0) ** 2).mean().item())

    out = {}
    for backend, kind in (("torch", TorchScoreModel), ("auto", OnnxScoreModel)):
        model = load_score_model(ModelConfig(backend=backend), "cpu")
        assert isinstance(model, kind) and isinstance(model, ScoreModel)
        assert (model.sigma_min, model.sigma_max) == (0.01, 378.0)
        out[backend] = d = model.denoise(y, torch.tensor([sigma]))
        gain = psnr(d) - psnr(y)
        assert gain > 6.0, f"{backend}: Tweedie denoising gain {gain:.2f} dB at sigma 0.1"
    assert ((out["auto"] - out["torch"]).abs().max() / out["torch"].abs().max()) < 1e-4
