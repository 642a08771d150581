"""``scoremri train``: continuous denoising score matching of the VE-SDE prior.

sigma ~ log-uniform[sigma_min, sigma_max], x = x0 + sigma z, loss = sigma^2 |s(x, sigma) + z / sigma|^2
(mean over pixels and batch). Adam, linear warm-up, gradient clipping, EMA (``torch._foreach_lerp_``),
bf16 autocast on CUDA, optional torch.compile, DDP under ``torchrun`` (WORLD_SIZE), resumable chunks
(``--resume``, ``--max-minutes``), a tqdm bar on stderr, a loss-curve PNG, and at every chunk end the EMA
weights as ``<out>/model.safetensors`` + card.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import save_model, sha256_file
from .data import Augment, SliceBank, load_slices, sample_batch
from .ncsnpp import NCSNpp, count_parameters, net_config
from .sde import VESDE, sigma_max_rule

log = logging.getLogger(__name__)


def dsm_loss(net: torch.nn.Module, x0: torch.Tensor, sde: VESDE, generator: torch.Generator | None = None
             ) -> torch.Tensor:
    """sigma^2-weighted continuous DSM loss on a batch x0 (B, 1, H, W)."""
    sigma = sde.sample_sigma(x0.shape[0], generator=generator, device=x0.device)
    z = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    s = sigma.view(-1, 1, 1, 1)
    score = net(x0 + s * z, sigma).float()
    return ((s * score + z) ** 2).mean()


class EMA:
    """Exponential moving average of parameters, fused with ``torch._foreach_lerp_``."""

    def __init__(self, net: torch.nn.Module, decay: float) -> None:
        self.decay = decay
        self.params = [p.detach().clone() for p in net.parameters()]

    @torch.no_grad()
    def update(self, net: torch.nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self.params, [p.detach() for p in net.parameters()], 1.0 - d)

    def state_dict(self, net: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The network's state dict with the EMA parameters substituted."""
        names = [n for n, _ in net.named_parameters()]
        sd = {k: v.detach().clone() for k, v in net.state_dict().items()}
        for n, p in zip(names, self.params):
            sd[n] = p.detach().clone()
        return sd


def plot_loss(steps: list[int], losses: list[float], path: str | Path, title: str = "DSM loss") -> None:
    """A small loss-curve PNG (log y, moving average) drawn with PIL."""
    from PIL import Image, ImageDraw

    W, H, m = 640, 400, 50
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    d.rectangle([m, m // 2, W - m // 2, H - m], outline="black")
    if len(steps) >= 2:
        y = np.log10(np.maximum(np.asarray(losses, float), 1e-12))
        k = max(1, len(y) // 50)
        ys = np.convolve(y, np.ones(k) / k, mode="valid")
        xs = np.asarray(steps[k - 1:], float)
        x0, x1 = float(steps[0]), float(max(steps[-1], steps[0] + 1))
        lo, hi = float(ys.min()), float(ys.max() + 1e-9)
        pts = [(m + (xv - x0) / (x1 - x0) * (W - 1.5 * m), H - m - (yv - lo) / (hi - lo) * (H - 1.5 * m))
               for xv, yv in zip(xs, ys)]
        d.line(pts, fill="blue", width=2)
        d.text((m + 4, m // 2 + 4), f"log10 loss {hi:.2f}", fill="black")
        d.text((m + 4, H - m - 14), f"log10 loss {lo:.2f}", fill="black")
        d.text((m, H - m + 6), f"step {int(x0)}", fill="black")
        d.text((W - 3 * m, H - m + 6), f"step {int(x1)}", fill="black")
    d.text((m, 6), title, fill="black")
    img.save(path)


class TrainUsageError(ValueError):
    """A ``scoremri train`` option is wrong (exit 2); the message names it."""


class TrainDataError(ValueError):
    """Training data or a run folder cannot be used (exit 1); the message names the file."""


USAGE_ERRORS = (TrainUsageError,)
DATA_ERRORS = (TrainDataError,)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", nargs="*", help="NIfTI volumes, .npy, fastMRI .h5, PNG/DICOM folders")
    p.add_argument("-o", "--out", required=True, help="run folder (state.pt, model.safetensors + card, loss.png)")
    p.add_argument("--size", default="default", choices=("tiny", "default", "paper"),
                   help="network size (default: default)")
    p.add_argument("--precond", default=None, choices=["edm", "ncsn"], help="override the size's preconditioning")
    p.add_argument("--volume", type=int, default=None,
                   help="volume of 4-D NIfTI inputs (required when one holds more than one volume)")
    p.add_argument("--sigma-min", type=float, default=0.01, help="smallest SDE noise level (default 0.01)")
    p.add_argument("--sigma-max", default="378",
                   help="a number, or 'rule' = max pairwise distance of the training slices (Song & Ermon)")
    p.add_argument("--N", type=int, default=2000, help="SDE discretisation levels (recorded on the card)")
    p.add_argument("--crop", default=None, help="crop size or range 'lo-hi' (multiples of the net's)")
    p.add_argument("--batch", type=int, default=None, help="global batch size")
    p.add_argument("--lr", type=float, default=None, help="default 5e-4")
    p.add_argument("--warmup", type=int, default=None, help="default 200")
    p.add_argument("--lr-end", type=float, default=None,
                   help="anneal the learning rate (cosine) to this value at --steps (default: constant lr)")
    p.add_argument("--decay-start", type=int, default=None,
                   help="step where the cosine anneal of --lr-end begins (default: the end of the warm-up)")
    p.add_argument("--clip", type=float, default=None, help="default 1.0")
    p.add_argument("--ema", type=float, default=None, help="default 0.999")
    p.add_argument("--steps", type=int, default=None, help="total steps (across resumed chunks)")
    p.add_argument("--max-minutes", type=float, default=0.0, help="stop this chunk after so many minutes")
    p.add_argument("--resume", action="store_true", help="continue from <out>/state.pt")
    p.add_argument("--init", default=None, metavar="WEIGHTS",
                   help="start a new run from a published model (.safetensors + card): its network, SDE, "
                        "EMA and step count; a fresh optimiser warms up again (fine-tuning)")
    p.add_argument("--save-every", type=int, default=500, help="write state and weights every N steps (default 500)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:n]")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = leave as is)")
    p.add_argument("--compile", action="store_true", help="torch.compile the network")
    p.add_argument("--no-bf16", action="store_true", help="no bf16 autocast on CUDA")
    p.add_argument("--p-complex", type=float, default=None, help="fraction of Re/Im x smooth-phase samples")
    p.add_argument("--no-progress", action="store_true", help="log every 100 steps instead of a progress bar")


# hyper-parameters that a resumed run takes from its state unless given again
RESUMABLE: dict[str, Any] = {"crop": "64-96", "batch": 8, "lr": 5e-4, "warmup": 200, "clip": 1.0,
                             "ema": 0.999, "steps": 100000, "p_complex": 0.5, "lr_end": None,
                             "decay_start": None}


def lr_at(step: int, lr: float, warm0: int, warmup: int, steps: int, lr_end: float | None = None,
          decay_start: int | None = None) -> float:
    """Learning rate of optimiser step ``step`` (0-based): linear warm-up over ``warmup`` steps from ``warm0``
    (a run's or fine-tune's first step), then constant ``lr``; with ``lr_end`` a half-cosine from ``lr`` at
    ``decay_start`` (default: the end of the warm-up) down to ``lr_end`` at ``steps``, ``lr_end`` after."""
    rate = lr * min(1.0, (step - warm0 + 1) / max(1, warmup))
    if lr_end is None:
        return rate
    d0 = _decay_start(warm0, warmup, decay_start)
    if step < d0:
        return rate
    frac = min(1.0, (step - d0) / max(1, steps - d0))
    return min(rate, lr_end + 0.5 * (lr - lr_end) * (1.0 + math.cos(math.pi * frac)))


def lr_schedule(a: dict[str, Any], warm0: int) -> str | None:
    """The cosine anneal of a run's arguments ``a`` (``vars(args)``) in words for the card, None if constant."""
    if a.get("lr_end") is None:
        return None
    d0 = _decay_start(warm0, a["warmup"], a.get("decay_start"))
    return f"cosine {a['lr']:g} -> {a['lr_end']:g} from step {d0} to {a['steps']}"


def _decay_start(warm0: int, warmup: int, decay_start: int | None) -> int:
    """The step where the cosine anneal begins: ``decay_start``, by default the end of the warm-up."""
    return warm0 + warmup if decay_start is None else decay_start


def _crop_range(spec: str, mult: int) -> tuple[int, int]:
    try:
        parts = [int(v) for v in str(spec).split("-")]
    except ValueError:
        raise TrainUsageError(f"--crop {spec}: expected a size or a range 'lo-hi' of integers") from None
    lo, hi = (parts[0], parts[0]) if len(parts) == 1 else (parts[0], parts[1])
    if lo <= 0 or hi < lo or lo % mult or hi % mult:
        raise TrainUsageError(f"--crop {spec}: need 0 < lo <= hi, both multiples of {mult}")
    return lo, hi


def _init_from(path: str) -> dict[str, Any]:
    """A published model's card and fp32 state dict (its EMA weights) to fine-tune from (``--init``)."""
    from .checkpoint import ModelLoadError, load_model

    try:
        net, card = load_model(path)
    except ModelLoadError as e:
        raise TrainDataError(f"--init: {e}") from None
    return {"card": card, "weights": {k: v.detach().clone() for k, v in net.state_dict().items()}}


def run(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if args.device == "auto":
        device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available()
                              else "cpu")
    else:
        device = torch.device(args.device)
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            torch.cuda.set_device(device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / "state.pt"
    state: dict[str, Any] | None = None
    if args.resume:
        if not state_path.exists():
            raise TrainUsageError(f"--resume: {state_path} does not exist (start without --resume)")
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        log.info("resuming %s at step %d", state_path, state["step"])
    if args.init and state is not None:
        raise TrainUsageError("--init starts a new run: give it without --resume (a resumed run keeps its start)")
    init = _init_from(args.init) if args.init else None
    for k, v in RESUMABLE.items():
        if getattr(args, k) is None:
            setattr(args, k, state["args"].get(k, v) if state is not None else v)

    # ---- data (slices cached per run folder so resumed chunks start fast)
    cache = out / "slices.npz"
    if state is not None and cache.exists():
        z = np.load(cache)
        slices = [z[f"s{i}"] for i in range(int(z["n"]))]
        files = state["train_files"]
    else:
        if not args.data:
            raise TrainUsageError("no training data given (name NIfTI/.npy/.h5 files or image folders)")
        slices, files = [], []
        for f in args.data:
            try:
                s = load_slices(f, volume=args.volume)
            except (ValueError, FileNotFoundError) as e:
                raise (TrainUsageError if "--volume" in str(e) else TrainDataError)(str(e)) from None
            log.info("%s: %d slices", f, len(s))
            slices += s
            files.append({"path": str(f), "name": Path(f).name,
                          "sha256": sha256_file(f) if Path(f).is_file() else "", "slices": len(s)})
        if rank == 0:
            np.savez(cache, n=len(slices), **{f"s{i}": s for i, s in enumerate(slices)})
    bank = SliceBank.from_slices(slices, device)

    # ---- model, SDE
    if state is not None:
        cfg = net_config(state["net"])
        sde = VESDE(**state["sde"])
        sigma_choice = state["sigma_max_choice"]
    elif init is not None:
        cfg = net_config(init["card"]["config"])
        sde = VESDE(**{k: v for k, v in init["card"]["sde"].items() if k != "type"})
        sigma_choice = init["card"].get("sigma_max_choice", f"from {args.init}")
    else:
        over = {"precond": args.precond} if args.precond else {}
        cfg = net_config(args.size, **over)
        if args.sigma_max == "rule":
            side = 256
            rs = [torch.nn.functional.interpolate(torch.from_numpy(s)[None, None], size=(side, side),
                                                  mode="area")[0, 0].numpy() for s in slices]
            smax = sigma_max_rule(np.stack(rs))
            sigma_choice = (f"Song & Ermon rule: max pairwise distance of the {len(rs)} training slices "
                            f"resized to {side}x{side} = {smax:.2f}")
        else:
            smax = float(args.sigma_max)
            sigma_choice = f"given: {smax}"
        sde = VESDE(args.sigma_min, smax, args.N)
    lo, hi = _crop_range(args.crop, cfg.multiple)
    torch.manual_seed(args.seed + rank)
    net = NCSNpp(cfg).to(device)
    if state is not None:
        net.load_state_dict(state["model"])
    elif init is not None:
        net.load_state_dict(init["weights"])
    opt = torch.optim.Adam(net.parameters(), lr=args.lr, fused=device.type == "cuda" or None)
    ema = EMA(net, args.ema)
    step = 0
    hist_steps: list[int] = []
    hist_loss: list[float] = []
    elapsed = 0.0
    start: dict[str, Any] | None = None  # where a fine-tuning run began (--init): recorded on the card
    if state is not None:
        opt.load_state_dict(state["opt"])
        ema.params = [p.to(device) for p in state["ema"]]
        step = int(state["step"])
        hist_steps, hist_loss = state["hist_steps"], state["hist_loss"]
        elapsed = float(state.get("elapsed_s", 0.0))
        start = state.get("init")
    elif init is not None:
        step = int(init["card"].get("training", {}).get("steps", 0))
        elapsed = float(init["card"].get("training", {}).get("seconds", 0.0))
        start = {"weights": str(args.init), "sha256": init["card"]["sha256"], "step": step,
                 "seconds": elapsed, "training": init["card"].get("training", {})}
    warm0 = start["step"] if start else 0  # the learning-rate warm-up restarts with a fresh optimiser
    log.info("network %s: %d parameters, multiple %d; SDE %s; %d slices; crops %d-%d; batch %d; device %s",
             cfg.name, count_parameters(net), cfg.multiple, sde, len(bank), lo, hi, args.batch, device)
    model: torch.nn.Module = net
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(net, device_ids=[device] if device.type == "cuda" else None)
    if args.compile:
        model = torch.compile(model)
    use_bf16 = device.type == "cuda" and not args.no_bf16
    gen = torch.Generator(device=device)
    gen.manual_seed(args.seed * 1000003 + step * 7 + rank)
    aug = Augment(p_complex=args.p_complex)
    local_batch = max(1, args.batch // world)

    def save() -> None:
        if rank != 0:
            return
        st = {"net": cfg.to_dict(), "sde": sde.to_dict(), "sigma_max_choice": sigma_choice,
              "model": net.state_dict(), "opt": opt.state_dict(), "ema": [p.cpu() for p in ema.params],
              "step": step, "hist_steps": hist_steps, "hist_loss": hist_loss, "train_files": files,
              "elapsed_s": elapsed + (time.time() - t_start), "args": vars(args), "init": start}
        tmp = state_path.with_name("state.pt.tmp")
        torch.save(st, tmp)
        tmp.replace(state_path)
        plot_loss(hist_steps, hist_loss, out / "loss.png", f"DSM loss ({cfg.name}, {step} steps)")
        save_model(ema.state_dict(net), cfg, sde, out / "model.safetensors", card={
            "sigma_max_choice": sigma_choice,
            "training": {"files": files, "steps": step, "ema_decay": args.ema, "batch": args.batch,
                         "crop": f"{lo}-{hi}", "lr": args.lr, "device": str(device),
                         **({"lr_schedule": sched} if (sched := lr_schedule(vars(args), warm0)) else {}),
                         "seconds": round(st["elapsed_s"], 1), "augmentation": vars(aug),
                         "objective": "continuous DSM, sigma log-uniform, loss weight sigma^2",
                         **({"init": {k: v for k, v in start.items() if k != "training"}} if start else {})}})

    t_start = time.time()
    deadline = t_start + args.max_minutes * 60 if args.max_minutes > 0 else math.inf
    bar = None
    if rank == 0 and not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=args.steps, initial=step, file=sys.stderr, unit="it", dynamic_ncols=True)
    net.train()
    step0 = step
    run_loss, run_n = 0.0, 0
    try:
        while step < args.steps and time.time() < deadline:
            crop = lo + cfg.multiple * int(torch.randint(0, (hi - lo) // cfg.multiple + 1, (1,), generator=gen,
                                                         device=device).item())
            x0 = sample_batch(bank, local_batch, crop, aug, gen)
            for gparam in opt.param_groups:
                gparam["lr"] = lr_at(step, args.lr, warm0, args.warmup, args.steps, args.lr_end, args.decay_start)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                loss = dsm_loss(model, x0, sde, gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if args.clip > 0:
                torch.nn.utils.clip_grad_norm_(net.parameters(), args.clip)
            opt.step()
            ema.update(net, step)
            step += 1
            lv = float(loss.detach())
            if not math.isfinite(lv):
                raise RuntimeError(f"loss became {lv} at step {step}")
            run_loss += lv
            run_n += 1
            if step % 10 == 0:
                hist_steps.append(step)
                hist_loss.append(run_loss / run_n)
                if bar is not None:
                    bar.set_postfix(loss=f"{run_loss / run_n:.4f}")
                run_loss, run_n = 0.0, 0
            if bar is not None:
                bar.update(1)
            if bar is None and rank == 0 and step % 100 == 0:
                log.info("step %d loss %.4f lr %.3g  %.2f it/s", step, hist_loss[-1], opt.param_groups[0]["lr"],
                         (step - step0) / max(1e-9, time.time() - t_start))
            if step % args.save_every == 0:
                save()
    except KeyboardInterrupt as e:  # Ctrl-C / SIGTERM: keep what was trained; the message says what was kept
        if bar is not None:
            bar.close()
        save()
        raise type(e)(f"state and EMA weights of step {step} in {out}") from None
    if bar is not None:
        bar.close()
    save()
    log.info("stopped at step %d (%.1f min this chunk)", step, (time.time() - t_start) / 60)
    if world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    return 0
