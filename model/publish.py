"""Turn a training run into shipped weights: ``python -m scoremri.model.publish runs/default``.

Writes ``model/weights/<name>.safetensors`` (EMA weights, fp16), ``<name>.json`` (card),
``<name>.md`` (human-readable model card), ``loss.png`` and ``samples.png`` (unconditional samples), and
the denoising PSNR table on dipy's ``t1_coronal_slice.npy`` (visible evaluation data, never trained on).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .backends import WEIGHTS_DIR, TorchScoreModel
from .checkpoint import load_model, save_model
from .ncsnpp import NCSNpp, count_parameters, net_config
from .sde import VESDE
from .train import lr_schedule

log = logging.getLogger(__name__)


def psnr(a: torch.Tensor, ref: torch.Tensor, peak: float = 1.0) -> float:
    """PSNR in dB of ``a`` against ``ref`` with the given peak value."""
    mse = float(((a - ref) ** 2).mean())
    return 10 * math.log10(peak**2 / mse)


def dipy_slice() -> np.ndarray:
    """dipy's t1_coronal_slice.npy scaled to [0, 1] (256, 256) float32: evaluation only."""
    import dipy.data

    img = np.load(Path(dipy.data.__file__).parent / "files" / "t1_coronal_slice.npy").astype(np.float32)
    return img / img.max()


def denoise_table(model: Any, image: np.ndarray, sigmas: tuple[float, ...] = (0.02, 0.05, 0.1, 0.2, 0.5),
                  seed: int = 0) -> list[dict[str, float]]:
    """Tweedie denoising of image + sigma * z: PSNR (peak 1) of the noisy input and of the denoised one."""
    x0 = torch.from_numpy(np.asarray(image, np.float32))[None, None]
    g = torch.Generator().manual_seed(seed)
    rows = []
    for s in sigmas:
        y = x0 + s * torch.randn(x0.shape, generator=g)
        d = model.denoise(y, torch.tensor([s]))
        rows.append({"sigma": s, "psnr_noisy_db": round(psnr(y, x0), 2), "psnr_denoised_db": round(psnr(d, x0), 2)})
    return rows


@torch.no_grad()
def sample_unconditional(model: Any, n: int = 8, size: int = 64, steps: int = 100, seed: int = 0,
                         sigma_end: float | None = None) -> torch.Tensor:
    """Reverse-diffusion (ancestral) sampling on a geometric schedule sigma_max -> sigma_min, then a final
    Tweedie denoise. Returns (n, 1, size, size)."""
    g = torch.Generator().manual_seed(seed)
    smin = sigma_end or model.sigma_min
    sig = torch.exp(torch.linspace(math.log(model.sigma_max), math.log(smin), steps))
    x = torch.randn(n, 1, size, size, generator=g) * sig[0]
    for i in range(steps - 1):
        s, s_next = sig[i], sig[i + 1]
        var = s**2 - s_next**2
        x = x + var * model.score(x, s.expand(n)) + torch.sqrt(var) * torch.randn(x.shape, generator=g)
    return model.denoise(x, sig[-1].expand(n))


def save_grid(x: torch.Tensor, path: str | Path, cols: int = 4, lo: float = 0.0, hi: float = 1.0) -> None:
    """(n, 1, H, W) -> a PNG grid, values clipped to [lo, hi]."""
    from PIL import Image

    a = ((x[:, 0].clamp(lo, hi) - lo) / (hi - lo) * 255).round().to(torch.uint8).numpy()
    n, h, w = a.shape
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * (h + 2), cols * (w + 2)), np.uint8)
    for k in range(n):
        r, c = divmod(k, cols)
        grid[r * (h + 2): r * (h + 2) + h, c * (w + 2): c * (w + 2) + w] = a[k]
    Image.fromarray(grid).save(path)


NILEARN_DIR = "\"$(python -c 'import nilearn, os; print(os.path.dirname(nilearn.__file__))')\""


def portable_path(path: str) -> tuple[str, str]:
    """A training file's location as any machine can find it: (where it comes from, path). Package data of
    nilearn -> ``<site-packages>/nilearn/...``; Debian ``mricron-data`` -> its /usr/share path; else as given."""
    p = str(path)
    if "/site-packages/nilearn/" in p:
        return "nilearn package data", "<site-packages>/nilearn/" + p.split("/site-packages/nilearn/", 1)[1]
    if p.startswith("/usr/share/mricron/"):
        return "Debian `mricron-data`", p
    return "", p


def _shell_path(path: str) -> str:
    """A training file's path for a command line on another machine (nilearn's data found by Python)."""
    p = str(path)
    if "/site-packages/nilearn/" in p:
        return NILEARN_DIR + "/" + p.split("/site-packages/nilearn/", 1)[1]
    return p


def _retrain_command(state: dict[str, Any]) -> str:
    a = state["args"]
    files = " ".join(_shell_path(f["path"]) for f in state["train_files"])
    return (f"scoremri train {files} -o runs/default-gpu --size {state['net']['name']} --batch 32 "
            f"--crop 128-256 --lr {a.get('lr', 5e-4)} --ema 0.9999 --steps 30000 --max-minutes 9 --compile "
            f"--save-every 1000   # then repeat with --resume until done, and "
            f"python -m scoremri.model.publish runs/default-gpu")


CPU_NOTE = ("TRAINED ON CPU on two template volumes: a placeholder prior. A GPU session should retrain it with "
            "the command in 'retrain'.")


def publish(run_dir: str | Path, out_dir: str | Path = WEIGHTS_DIR, name: str = "default",
            sample_steps: int = 100, machine: str = "cpu (1 thread, shared 2-core machine)",
            command: str | None = None, note: str = CPU_NOTE) -> dict[str, Any]:
    """Publish the EMA weights of ``run_dir/state.pt`` as ``out_dir/name.*`` (see module docstring).

    machine: where it trained (recorded on the card); command: the training command line(s) as run; a run that
    fine-tuned a published model (``scoremri train --init``) records where it started (weights sha256, steps,
    seconds) and what this run added."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    state = torch.load(run_dir / "state.pt", map_location="cpu", weights_only=False)
    cfg = net_config(state["net"])
    sde = VESDE(**state["sde"])
    net = NCSNpp(cfg)
    net.load_state_dict(state["model"])
    names = [n for n, _ in net.named_parameters()]
    sd = dict(net.state_dict())
    for n, p in zip(names, state["ema"]):
        sd[n] = p
    a = state["args"]
    training = {
        "files": [{**f, "path": portable_path(f["path"])[1]} for f in state["train_files"]], "steps": state["step"], "ema_decay": a.get("ema"),
        "batch": a.get("batch"), "crop": a.get("crop"), "lr": a.get("lr"), "warmup": a.get("warmup"),
        "grad_clip": a.get("clip"), "p_complex": a.get("p_complex"),
        "objective": "continuous DSM, sigma log-uniform in [sigma_min, sigma_max], loss weight sigma^2",
        "augmentation": "random slice (all three axes), zoom 0.8-1.25, 90-degree rotations, flips, crop centre "
                        "inside the content box, gamma 0.7-1.4, intensity 0.8-1.0, with p_complex the real or "
                        "imaginary part of image x exp(i * smooth random phase)",
        "device": machine,
        "seconds": round(float(state.get("elapsed_s", 0.0)), 1),
        "note": note,
        "retrain": _retrain_command(state),
    }
    init = state.get("init")
    if init:  # a fine-tuning run: where it started and what it added
        training["init"] = {k: v for k, v in init.items() if k != "training"}
        training["this_run"] = {"steps": int(state["step"]) - int(init["step"]),
                                "seconds": round(float(state.get("elapsed_s", 0.0)) - float(init["seconds"]), 1),
                                "crop": a.get("crop"), "batch": a.get("batch"), "lr": a.get("lr")}
    sched = lr_schedule(a, int(init["step"]) if init else 0)
    if sched:
        training["lr_schedule"] = sched
    if command:
        training["command"] = command
    out_dir.mkdir(parents=True, exist_ok=True)
    wpath = out_dir / f"{name}.safetensors"
    card = save_model(sd, cfg, sde, wpath, dtype=torch.float16,
                      card={"sigma_max_choice": state["sigma_max_choice"], "training": training})
    # evaluate the shipped (fp16-rounded) weights
    snet, card = load_model(wpath)
    model = TorchScoreModel(snet, card)
    table = denoise_table(model, dipy_slice())
    log.info("denoising PSNR on dipy t1_coronal_slice: %s", table)
    loss_png = run_dir / "loss.png"
    if loss_png.exists():
        shutil.copy(loss_png, out_dir / "loss.png")
    samples = sample_unconditional(model, n=8, size=64, steps=sample_steps)
    save_grid(samples, out_dir / "samples.png")
    extra = {"denoising_psnr": {"image": "dipy t1_coronal_slice.npy / max (evaluation only, never trained on)",
                                "estimator": "Tweedie x + sigma^2 score", "seed": 0, "rows": table},
             "samples": {"file": "samples.png", "n": 8, "size": 64, "sampler":
                         f"reverse diffusion (ancestral), {sample_steps} geometric steps, final Tweedie"}}
    cp = wpath.with_suffix(".json")
    full = json.loads(cp.read_text())
    full.update(extra)
    cp.write_text(json.dumps(full, indent=2) + "\n")
    _write_md(out_dir / f"{name}.md", full, count_parameters(snet))
    return full


def _write_md(path: Path, card: dict[str, Any], nparams: int) -> None:
    t = card["training"]
    lines = [
        f"# scoremri model card: `{card['weights_file']}`", "",
        "Score prior (grad log p_sigma of magnitude / real / imaginary MR image parts in [0, 1] / [-1, 1]) "
        "for the score-based reconstruction of Chung & Ye (2022).", "",
        f"**Trained on {card['training']['device']}, {card['training']['seconds'] / 3600:.1f} h in all, on two "
        "brain templates: a placeholder prior, fine for demos and tests. A GPU session should retrain it** "
        "(command below).", "",
        "## Architecture",
        f"- NCSN++-style U-Net, size `{card['size']}`: {nparams:,} parameters, config "
        f"`{json.dumps(card['config'])}`",
        f"- preconditioning: {card['preconditioning']}",
        f"- weights: {card['weights_dtype']}, {card['weights_bytes']:,} bytes, sha256 `{card['sha256']}`",
        f"- any H, W: {card['padding']} (multiple {card['multiple']})", "",
        "## SDE",
        f"- VE-SDE sigma_min {card['sde']['sigma_min']}, sigma_max {card['sde']['sigma_max']}, "
        f"N {card['sde']['N']}",
        f"- sigma_max choice: {card['sigma_max_choice']} (the paper's value for 320x320 images in [0, 1]; an "
        "upper bound for the 256-320 px images the gadget reconstructs)", "",
        "## Training data (nothing else; no phantoms, no evaluation images)",
    ]
    for f in t["files"]:
        where, location = portable_path(f["path"])
        lines.append(f"- `{f['name']}` ({f['slices']} slices along all three axes): sha256 `{f['sha256']}` "
                     f"({where + ': ' if where else ''}`{location}`)")
    lines += [
        "", "## Training",
        f"- {t['steps']} steps, batch {t['batch']}, random crops {t['crop']} px, Adam lr {t['lr']} "
        f"(warm-up {t['warmup']}{', then ' + t['lr_schedule'] if t.get('lr_schedule') else ''}), "
        f"grad clip {t['grad_clip']}, EMA {t['ema_decay']}, {t['seconds'] / 60:.0f} min on {t['device']}",
        *([f"- fine-tuned (`scoremri train --init`) from the prior of sha256 `{t['init']['sha256'][:16]}...` "
           f"({t['init']['step']} steps): {t['this_run']['steps']} more steps in "
           f"{t['this_run']['seconds'] / 60:.0f} min, batch {t['this_run']['batch']}, crops "
           f"{t['this_run']['crop']} px, lr {t['this_run']['lr']}"] if "this_run" in t else []),
        *([f"- command: `{t['command']}`"] if t.get("command") else []),
        f"- objective: {t['objective']}",
        f"- augmentation: {t['augmentation']} (p_complex {t['p_complex']})",
        "- loss curve: `loss.png`; unconditional samples (64x64, "
        f"{card['samples']['sampler']}): `samples.png`", "",
        "## Denoising PSNR (Tweedie, dipy t1_coronal_slice scaled to [0, 1]; held-out evaluation data)", "",
        "| sigma | noisy PSNR (dB) | denoised PSNR (dB) | gain (dB) |", "| --- | --- | --- | --- |",
    ]
    for r in card["denoising_psnr"]["rows"]:
        lines.append(f"| {r['sigma']} | {r['psnr_noisy_db']:.2f} | {r['psnr_denoised_db']:.2f} | "
                     f"{r['psnr_denoised_db'] - r['psnr_noisy_db']:.2f} |")
    lines += ["", "## Retrain on a GPU", "",
              "The lent GPU machines have no nibabel: either carry nibabel's pure-Python wheel with the two "
              "NIfTI files, or pack the slices here first (`scoremri train MNI.nii.gz INIA.nii.gz -o runs/pack "
              "--steps 0` writes `runs/pack/slices.npz`) and train on that bundle. Each call runs <= 9 min; "
              "repeat with `--resume` (carry `runs/default-gpu`).", "", "```", t["retrain"], "```", "",
              f"Versions: {json.dumps(card['versions'])}", ""]
    path.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m scoremri.model.publish", description=__doc__)
    p.add_argument("run_dir", help="training run folder with state.pt")
    p.add_argument("--out", default=str(WEIGHTS_DIR))
    p.add_argument("--name", default="default")
    p.add_argument("--sample-steps", type=int, default=100)
    p.add_argument("--machine", default="cpu (1 thread, shared 2-core machine)", help="where it trained (card)")
    p.add_argument("--command", default=None, help="the training command line(s) as run (card)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    publish(args.run_dir, args.out, args.name, args.sample_steps, machine=args.machine, command=args.command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
