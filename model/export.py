"""``scoremri export CKPT -o model.onnx``: the score network as ONNX, verified with onnxruntime.

Inputs ``x`` (B, 1, H, W) float32 with H, W multiples of the network's ``multiple`` (metadata), ``sigma``
(B,) float32; output ``score`` (B, 1, H, W). Batch, height and width are dynamic; the padding wrapper stays
outside (the ONNX backend pads itself). Metadata: multiple, sigma_min, sigma_max, weights_sha256, name.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import ModelLoadError, load_model
from .ncsnpp import NCSNpp

log = logging.getLogger(__name__)


class ExportError(RuntimeError):
    """The exported ONNX model does not reproduce the torch network; the message names the file."""


def export_onnx(net: NCSNpp, card: dict[str, Any], path: str | Path, opset: int = 18,
                verify: bool = True, tol: float = 1e-4) -> float:
    """Export ``net`` (fp32, CPU) to ``path``; returns max|onnx - torch| / max|torch| of the check."""
    import onnx

    path = Path(path)
    net = net.float().cpu().eval()
    m = net.multiple
    x = torch.randn(2, 1, 2 * m, 3 * m)
    sigma = torch.tensor([0.05, 2.0])
    dyn = {"x": {0: "batch", 2: "height", 3: "width"}, "sigma": {0: "batch"}, "score": {0: "batch",
           2: "height", 3: "width"}}
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(net, (x, sigma), str(path), input_names=["x", "sigma"], output_names=["score"],
                          dynamic_axes=dyn, opset_version=opset, dynamo=False)
    model = onnx.load(str(path))
    meta = {"multiple": str(m), "sigma_min": str(card["sde"]["sigma_min"]),
            "sigma_max": str(card["sde"]["sigma_max"]), "weights_sha256": str(card.get("sha256", "")),
            "name": f"ncsnpp-{card.get('size', 'custom')}"}
    for k, v in meta.items():
        p = model.metadata_props.add()
        p.key, p.value = k, v
    onnx.save(model, str(path))
    rel = 0.0
    if verify:
        import onnxruntime as ort

        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        xt = torch.randn(3, 1, 4 * m, 5 * m)
        st = torch.tensor([0.01, 0.3, 50.0])
        with torch.no_grad():
            ref = net(xt, st).numpy()
        got = sess.run(["score"], {"x": xt.numpy(), "sigma": st.numpy()})[0]
        rel = float(np.abs(got - ref).max() / np.abs(ref).max())
        if not rel < tol:
            raise ExportError(f"{path}: onnxruntime disagrees with torch (max rel diff {rel:.2e} >= {tol})")
        log.info("verified %s with onnxruntime: max|diff|/max|ref| = %.2e", path, rel)
    return rel


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a .safetensors checkpoint with its .json card")
    p.add_argument("-o", "--output", required=True, help="the .onnx file to write")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (default 18)")
    p.add_argument("--no-verify", action="store_true", help="skip the onnxruntime check")


DATA_ERRORS = (ModelLoadError, ExportError)


def run(args: argparse.Namespace) -> int:
    net, card = load_model(args.checkpoint, "cpu")
    rel = export_onnx(net, card, args.output, opset=args.opset, verify=not args.no_verify)
    log.info("wrote %s (check: %.2e)", args.output, rel)
    return 0
