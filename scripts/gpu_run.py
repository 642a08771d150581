"""The one GPU call of issue 10, stage by stage (scripts/gpu_run.sh runs them with deadlines):

    train    the default prior from the packed training volumes: bf16 autocast, torch.compile, fused AdamW,
             foreach EMA, batch 32 at 256x256, a fixed seed; it/s printed; fp16 EMA weights + card written to
             OUT every minute (a run cut short still returns a usable prior); then loss curve + sample grid.
    measure  on the packed ruler slices through recon.api.reconstruct with the NEW and the SHIPPED prior: `fast`
             (the acceptance numbers), then speeds (network ms fp32/bf16, `fast` s/slice at 256/8 and 320/16
             coils), `paper` N=2000 on one slice, `uncertainty` K=8, a batched 30-slice series (when
             recon.api.reconstruct_batch exists) and the compiled network, each only if its time is left.
             measure.json is rewritten after every item.
    table    the one table (scripts/gpu_common.format_table) from measure.json and the card; printed, and
             written to OUT/table.md.

Every stage takes ``--deadline`` (epoch seconds) and starts no work it cannot finish before it; SIGTERM
(the shell's ``timeout``) ends training at the next step with the weights saved. ``--dry-run`` runs the same
code on CPU with a tiny network, a few steps and small sizes (the CI test of this script).

Network size (``--size``, default ``medium``, model/ncsnpp.py SIZES): see scripts/README.md "Network size".
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.abc
import inspect
import json
import logging
import math
import os
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_common import (  # noqa: E402
    MEASURE_FORMAT, PackError, atomic_write_json, format_table, read_manifest, ruler_slices, training_volumes,
)

log = logging.getLogger("gpu_run")
REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "model" / "weights" / "default.safetensors"
WEIGHTS_NAME = "default.safetensors"  # the name it gets in model/weights/ (the card records it)


def remaining(deadline: float) -> float:
    return deadline - time.time()


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def device_name(dev: torch.device) -> str:
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"


# ================================================================================================ train
class MixedSigma:
    """Training noise levels: with probability ``p_focus`` log-uniform in [sigma_min, focus], else log-uniform
    over the SDE's whole [sigma_min, sigma_max] (what ``VESDE.sample_sigma`` draws). The default sampler
    (``fast``) only asks the prior at sigma <= its starting sigma (0.1 at most, prior units); the paper
    sampler asks everywhere, so half of every batch still covers the whole range."""

    def __init__(self, sigma_min: float, sigma_max: float, focus: float, p_focus: float) -> None:
        if not sigma_min < focus <= sigma_max or not 0 <= p_focus <= 1:
            raise ValueError(f"need sigma_min < focus <= sigma_max and 0 <= p_focus <= 1 (focus {focus}, "
                             f"p_focus {p_focus})")
        self.lo, self.hi, self.focus, self.p = math.log(sigma_min), math.log(sigma_max), math.log(focus), p_focus

    def sample_sigma(self, n: int, generator: torch.Generator | None = None,
                     device: torch.device | str = "cpu") -> torch.Tensor:
        u = torch.rand(n, generator=generator, device=device)
        f = torch.rand(n, generator=generator, device=device) < self.p
        top = torch.where(f, torch.full_like(u, self.focus), torch.full_like(u, self.hi))
        return torch.exp(self.lo + u * (top - self.lo))

    def describe(self) -> str:
        return (f"with probability {self.p} log-uniform in [sigma_min, {math.exp(self.focus):g}] (where the fast "
                "sampler works), else log-uniform in [sigma_min, sigma_max]")


def _range(spec: str) -> tuple[float, float]:
    lo, _, hi = str(spec).partition("-")
    return float(lo), float(hi or lo)


class CompileTimeout(RuntimeError):
    """torch.compile's first step ran past --compile-timeout-s."""


def _compile_timeout(signum: int, frame: Any) -> None:
    raise CompileTimeout("the first compiled step ran past --compile-timeout-s")


def train(args: argparse.Namespace) -> int:
    from scoremri.model.checkpoint import save_model
    from scoremri.model.data import Augment, SliceBank, _volume_slices, sample_batch
    from scoremri.model.ncsnpp import NCSNpp, count_parameters, net_config
    from scoremri.model.sde import VESDE
    from scoremri.model.train import EMA, dsm_loss, plot_loss

    t_start = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dev = torch.device(args.device)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    stop = {"why": ""}

    def on_signal(signum: int, _frame: Any) -> None:
        stop["why"] = f"signal {signal.Signals(signum).name}"

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    manifest = read_manifest(args.pack)
    if manifest["purpose"] != "gpu" and not args.dry_run:
        raise PackError(f"{args.pack} is a {manifest['purpose']} pack: the real run trains only on a 'gpu' pack "
                        "(scripts/gpu_pack.py without --dry-run)")
    slices: list[np.ndarray] = []
    files = []
    for entry, vol in training_volumes(args.pack, manifest):
        s = _volume_slices(vol.astype(np.float32), entry["min_fill"])
        if len(s) != entry["slices"]:
            raise PackError(f"{entry['name']}: {len(s)} usable slices, the manifest says {entry['slices']}")
        slices += s
        files.append({"name": entry["name"], "sha256": entry["sha256"], "slices": len(s), "path": entry["path"],
                      "packed_as": entry["stored"]})
    torch.manual_seed(args.seed)
    bank = SliceBank.from_slices(slices, dev)
    cfg = net_config(args.size)
    sde = VESDE(args.sigma_min, args.sigma_max, 2000)
    sigmas = MixedSigma(sde.sigma_min, sde.sigma_max, args.sigma_focus, args.p_focus)
    net = NCSNpp(cfg).to(dev).to(memory_format=torch.channels_last)
    nparam = count_parameters(net)
    if nparam * 2 > args.max_mib * 2**20:
        raise ValueError(f"size {cfg.name}: {nparam:,} parameters = {nparam * 2 / 2**20:.1f} MiB in fp16, over "
                         f"--max-mib {args.max_mib}")
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, betas=(0.9, 0.999), weight_decay=0.0,
                            fused=dev.type == "cuda" or None)
    ema = EMA(net, args.ema)
    aug = Augment(zoom=_range(args.zoom), p_complex=args.p_complex)
    gen = torch.Generator(device=dev)
    gen.manual_seed(args.seed)
    use_bf16 = dev.type == "cuda" and not args.no_bf16
    model: torch.nn.Module = net
    compile_note = "off"
    if args.compile:
        model = torch.compile(net, backend=args.compile_backend)
        compile_note = f"torch.compile(backend={args.compile_backend})"
    log.info("training %s on %s: %d parameters (%.1f MiB fp16), %d slices, batch %d, crop %d, %s, bf16 %s; "
             "sigma %s; deadline in %.0f s", cfg.name, device_name(dev), nparam, nparam * 2 / 2**20, len(bank),
             args.batch, args.crop, compile_note, use_bf16, sigmas.describe(), remaining(args.deadline))

    steps: list[int] = []
    losses: list[float] = []
    state = {"step": 0, "compile_s": None, "t_loop": None, "t_mark": None, "s_mark": 0, "its": None,
             "saves": 0, "last_save": time.time(), "compile_error": None}

    def card_extra() -> dict[str, Any]:
        elapsed = time.time() - (state["t_loop"] or time.time())
        return {
            "sigma_max_choice": f"given: {args.sigma_max} (as the CPU-trained card; the paper's value)",
            "training": {
                "files": files, "steps": state["step"], "batch": args.batch, "crop": str(args.crop),
                "lr": args.lr, "warmup": args.warmup, "lr_schedule": "linear warm-up, then cosine to 5 % over the "
                "time budget", "optimizer": "AdamW (fused), betas 0.9/0.999, weight decay 0",
                "grad_clip": args.clip, "ema_decay": args.ema, "p_complex": args.p_complex,
                "objective": "continuous DSM, loss weight sigma^2; sigma " + sigmas.describe(),
                "augmentation": f"random slice (all three axes), zoom {args.zoom} (field of view scale: coarser "
                                "pixels above 1), 90-degree rotations, flips, crop centre inside the content box, "
                                "gamma 0.7-1.4, intensity 0.8-1.0, with p_complex the real or imaginary part of "
                                "image x exp(i * smooth random phase)",
                "device": f"{dev.type}: {device_name(dev)}", "gpu": device_name(dev) if dev.type == "cuda" else None,
                "torch": torch.__version__, "seconds": round(elapsed, 1), "minutes": round(elapsed / 60, 2),
                "it_per_s": None if state["its"] is None else round(state["its"], 2),
                "compile": compile_note if not state["compile_error"] else f"failed, eager ({state['compile_error']})",
                "compile_s": state["compile_s"], "bf16_autocast": use_bf16, "channels_last": True,
                "seed": args.seed, "final_loss": round(losses[-1], 5) if losses else None,
                "pack": {k: manifest.get(k) for k in ("created_utc", "commit", "purpose")},
                "note": ("TRAINED ON A GPU (issue 10's prepared run, scripts/gpu_run.sh)" if dev.type == "cuda"
                         else "DRY RUN on CPU (scripts/gpu_run.sh --dry-run): not a usable prior"),
                "retrain": "scripts/gpu_pack.py, then scripts/gpu_run.sh on a GPU (scripts/README.md)",
            },
        }

    def save(final: bool = False) -> None:
        save_model(ema.state_dict(net), cfg, sde, out / WEIGHTS_NAME, dtype=torch.float16, card=card_extra())
        if steps:
            plot_loss(steps, losses, out / "loss.png", f"DSM loss ({cfg.name}, {state['step']} steps, {dev.type})")
        state["saves"] += 1
        state["last_save"] = time.time()
        log.info("saved fp16 EMA weights of step %d%s", state["step"], " (final)" if final else "")

    buf, buf_at = torch.empty(0), args.data_chunk
    acc = torch.zeros((), device=dev)
    acc_n = 0
    # it/s is measured after these steps (compile and cudnn autotuning excluded)
    n_warm = 5 if not args.steps or args.steps > 10 else 1
    try:
        while not stop["why"]:
            now = time.time()
            if args.steps and state["step"] >= args.steps:
                stop["why"] = f"{args.steps} steps"
                break
            if now > args.deadline:
                stop["why"] = "time budget"
                break
            if state["t_loop"] is None:
                state["t_loop"] = now
            step = state["step"]
            frac = min(1.0, (now - state["t_loop"]) / max(1.0, args.deadline - state["t_loop"]))
            lr = args.lr * min(1.0, (step + 1) / max(1, args.warmup)) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac)))
            for g in opt.param_groups:
                g["lr"] = lr
            if buf_at >= args.data_chunk:  # many batches per call: sample_batch syncs the stream (small H2D copies)
                buf = sample_batch(bank, args.batch * args.data_chunk, args.crop, aug, gen)
                buf_at = 0
            x0 = buf[buf_at * args.batch:(buf_at + 1) * args.batch].contiguous(memory_format=torch.channels_last)
            buf_at += 1
            t_step = time.time()
            watchdog = step == 0 and model is not net and args.compile_timeout_s > 0
            if watchdog:  # a compile that takes too long is abandoned for eager training
                signal.signal(signal.SIGALRM, _compile_timeout)
                signal.setitimer(signal.ITIMER_REAL, args.compile_timeout_s)
            try:
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_bf16):
                    loss = dsm_loss(model, x0, sigmas, gen)  # type: ignore[arg-type]
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if watchdog:
                    signal.setitimer(signal.ITIMER_REAL, 0)
            except Exception as e:  # noqa: BLE001 - a compiler failure must not cost the run: train eagerly
                if watchdog:
                    signal.setitimer(signal.ITIMER_REAL, 0)
                if model is net or step > 0:
                    raise
                state["compile_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
                log.error("torch.compile failed on the first step (%s): training eagerly", state["compile_error"])
                model = net
                compile_note = "eager (torch.compile failed)"
                opt.zero_grad(set_to_none=True)
                continue
            if args.clip > 0:
                torch.nn.utils.clip_grad_norm_(net.parameters(), args.clip)
            opt.step()
            ema.update(net, step)
            acc += loss.detach()
            acc_n += 1
            state["step"] = step = step + 1
            if step == 1:
                _sync(dev)
                state["compile_s"] = round(time.time() - t_step, 1)
                log.info("first step %.1f s (%s)", state["compile_s"], compile_note)
            if step == n_warm:
                _sync(dev)
                state["t_mark"], state["s_mark"] = time.time(), step
            if step % args.log_every == 0 or step == 1:
                lv = float(acc) / acc_n  # one sync per log_every steps
                acc.zero_()
                acc_n = 0
                if not math.isfinite(lv):
                    raise FloatingPointError(f"loss became {lv} at step {step}")
                steps.append(step)
                losses.append(lv)
                if state["t_mark"] is not None and step > state["s_mark"]:
                    state["its"] = (step - state["s_mark"]) / (time.time() - state["t_mark"])
                if step % (args.log_every * 10) == 0 or step == 1:
                    log.info("step %d loss %.4f lr %.2e  %s it/s  %.0f s left", step, lv, lr,
                             "-" if state["its"] is None else f"{state['its']:.1f}", remaining(args.deadline))
            if time.time() - state["last_save"] >= args.save_every_s:
                save()
    except Exception:
        log.exception("training stopped by an error at step %d", state["step"])
        if state["step"] > 0:
            save(final=True)  # what was trained so far comes back; the error is in the log
        raise
    _sync(dev)
    log.info("stopped after %d steps (%s): %.1f it/s", state["step"], stop["why"], state["its"] or float("nan"))
    if state["step"] == 0:  # an untrained network is no prior: nothing is written, measure runs the shipped one
        log.error("no training step finished (%s): no weights written", stop["why"])
        return 1
    save(final=True)
    # sample grid from the saved (fp16-rounded) weights: what would ship
    try:
        from scoremri.model.backends import TorchScoreModel
        from scoremri.model.checkpoint import load_model
        from scoremri.model.publish import sample_unconditional, save_grid

        snet, card = load_model(out / WEIGHTS_NAME, dev)
        samples = sample_unconditional(TorchScoreModel(snet, card, dev), n=8, size=args.sample_size,
                                       steps=args.sample_steps, seed=args.seed)
        save_grid(samples, out / "samples.png")
        cp = out / WEIGHTS_NAME.replace(".safetensors", ".json")
        c = json.loads(cp.read_text())
        c["samples"] = {"file": "samples.png", "n": 8, "size": args.sample_size,
                        "sampler": f"reverse diffusion (ancestral), {args.sample_steps} geometric steps, final Tweedie"}
        atomic_write_json(cp, c)
    except Exception:  # noqa: BLE001 - the weights are saved; a failed picture must not fail the stage
        log.exception("sample grid failed (weights are saved)")
    log.info("train stage done in %.0f s", time.time() - t_start)
    return 0


# ================================================================================================ measure
class Recorder:
    """measure.json, rewritten after every item so a killed run keeps what it measured."""

    def __init__(self, path: Path, base: dict[str, Any]) -> None:
        self.path = path
        self.data = {"format": MEASURE_FORMAT, "ruler": [], "network": [], "fast_speed": [], "paper": [],
                     "skipped": [], "errors": [], **base}
        self.flush()

    def flush(self) -> None:
        atomic_write_json(self.path, self.data)

    def skip(self, stage: str, reason: str) -> None:
        log.warning("skipped %s: %s", stage, reason)
        self.data["skipped"].append({"stage": stage, "reason": reason})
        self.flush()

    def error(self, stage: str, e: BaseException) -> None:
        log.exception("%s failed", stage)
        self.data["errors"].append({"stage": stage, "error": f"{type(e).__name__}: {str(e)[:300]}"})
        self.flush()


def load_prior(path: Path, dev: torch.device) -> Any:
    """The torch backend of a checkpoint (hash-checked), whatever the config's backend default."""
    from scoremri.model.backends import TorchScoreModel
    from scoremri.model.checkpoint import load_model

    net, card = load_model(path, dev)
    return TorchScoreModel(net, card, dev)


def time_fn(fn: Callable[[], Any], dev: torch.device, reps: int, warm: int = 2) -> float:
    """Median seconds per call (CUDA events on a GPU, perf_counter on a CPU), after ``warm`` calls."""
    for _ in range(warm):
        fn()
    _sync(dev)
    out = []
    for _ in range(reps):
        if dev.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            out.append(a.elapsed_time(b) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
    return statistics.median(out)


def _resize(img: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    from scipy.ndimage import zoom

    z = zoom(img, (shape[0] / img.shape[0], shape[1] / img.shape[1]), order=1)
    z = np.clip(z[: shape[0], : shape[1]], 0, None)
    if z.shape != tuple(shape):
        z = np.pad(z, ((0, shape[0] - z.shape[0]), (0, shape[1] - z.shape[1])))
    return (z / z.max()).astype(np.float32)


def synthetic_slice(mag: np.ndarray, coils: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A simulated (k-space (C, ky, kx), mask) of magnitude ``mag``: birdcage coils, 1-D random x4 mask with
    24 ACS lines, noise 0.005 (recon.simulation; timing only, no chain needed)."""
    from scoremri.recon.masks import make_mask
    from scoremri.recon.simulation import birdcage_maps, complex_image, simulate_kspace

    rng = np.random.default_rng(seed)
    mask = make_mask("random", mag.shape, 4.0, acs=min(24, mag.shape[0] // 4), seed=seed)
    k = simulate_kspace(complex_image(mag, rng), birdcage_maps(coils, mag.shape), mask, 0.005, rng)
    return k, mask


def measure(args: argparse.Namespace) -> int:
    from scoremri.recon import api
    from scoremri.recon.config import SamplerConfig, load_config, parse_overrides
    from scoremri.recon.metrics import evaluate

    t0 = time.time()
    dev = torch.device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(args.pack)
    slices = list(ruler_slices(args.pack, manifest))
    if args.max_slices:
        slices = slices[: args.max_slices]
    over = parse_overrides(args.set)
    rec = Recorder(out / "measure.json", {"device": device_name(dev), "torch": torch.__version__,
                                          "pack": {k: manifest.get(k) for k in ("created_utc", "commit", "purpose",
                                                                                "benchmark")},
                                          "overrides": over, "priors": {}})
    priors: dict[str, Any] = {}
    for name, path in (("new", Path(args.new)), ("shipped", Path(args.shipped))):
        try:
            priors[name] = load_prior(path, dev)
            c = priors[name].card
            rec.data["priors"][name] = {"path": str(path), "sha256": c["sha256"], "size": c.get("size"),
                                        "parameters": c.get("parameters"), "config": c.get("config")}
        except Exception as e:  # noqa: BLE001 - a missing new prior still leaves the shipped one to measure
            rec.error(f"load {name} prior ({path})", e)
    rec.flush()
    names = [n for n in ("new", "shipped") if n in priors]
    first = names[0] if names else None
    cfg_fast = load_config("fast", {**manifest.get("pipeline_properties", {}), **over})
    cfg_unc = load_config("uncertainty", {**manifest.get("pipeline_properties", {}), **over,
                                          **({"sampler.samples": str(args.k)} if args.k else {})})
    has_deadline = "slice_deadline_s" in {f.name for f in dataclasses.fields(SamplerConfig)}
    # what the core passes besides k-space, mask, calib, maps and seed (issue 11: the whitened noise level, for
    # the sanity verdict in the report; the image does not depend on it)
    takes_noise = "noise_std" in inspect.signature(api.reconstruct).parameters

    def left() -> float:
        return remaining(args.deadline)

    # ---- 1. network ms per forward, fp32 and bf16 (cheap)
    res_list = [int(r) for r in args.net_res.split(",") if r]
    try:
        for name in names:
            pnet = priors[name].net
            for res in res_list:
                x = torch.randn(2, 1, res, res, device=dev)
                s = torch.full((2,), 0.05, device=dev)
                for mode in ("fp32", "bf16"):
                    if left() < 30:
                        raise TimeoutError("deadline")

                    def fwd() -> None:
                        with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=mode == "bf16"):
                            pnet(x, s)

                    ms = time_fn(fwd, dev, args.reps) * 1e3
                    rec.data["network"].append({"prior": name, "res": res, "batch": 2, "mode": mode, "ms": ms})
                    log.info("network %s %dx%d b2 %s: %.2f ms", name, res, res, mode, ms)
                    rec.flush()
    except TimeoutError:
        rec.skip("network fp32/bf16", "deadline")
    except Exception as e:  # noqa: BLE001
        rec.error("network fp32/bf16", e)

    # ---- 2. fast (and later uncertainty) on the ruler, both priors, same k-space / mask / seed / maps
    maps_cache: dict[int, np.ndarray] = {}
    rows: list[dict[str, Any]] = []
    for sl in slices:
        rows.append({k: sl.meta[k] for k in ("i", "case", "label", "role", "anatomy", "setting", "shape", "coils",
                                             "accel", "seed", "baselines")})
    rec.data["ruler"] = rows

    def ruler_pass(method: str, cfg: Any, per_slice_s: float) -> None:
        for sl, row in zip(slices, rows):
            for name in names:
                if left() < per_slice_s:
                    raise TimeoutError(f"deadline ({left():.0f} s left) at {sl.name} with the {name} prior")
                t = time.perf_counter()
                try:
                    extra = {"noise_std": sl.meta.get("noise_std")} if takes_noise else {}
                    r = api.reconstruct(sl.kspace, sl.mask, cfg, maps=maps_cache.get(sl.meta["i"]), calib=sl.calib,
                                        device=dev, seed=sl.meta["seed"], prior=priors[name], **extra)
                    _sync(dev)
                    secs = time.perf_counter() - t
                    maps_cache.setdefault(sl.meta["i"], r.maps)
                    m = evaluate(r.image, sl.gt, sl.fg)
                except Exception as e:  # noqa: BLE001 - one slice's failure is recorded; the others still run
                    log.exception("%s %s with the %s prior failed", method, sl.name, name)
                    row.setdefault(method, {})[name] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
                    continue
                row.setdefault(method, {})[name] = {
                    **{k: round(float(m[k]), 4) for k in ("psnr", "ssim", "psnr_fg", "ssim_fg")},
                    "seconds": round(secs, 4), "nfe": r.report.get("nfe"),
                    **({"sanity_failed": r.report["sanity"].get("failed")} if isinstance(r.report.get("sanity"), dict)
                       else {})}
            rec.flush()
            got = row[method]
            log.info("%s %-28s %s", method, sl.name, "  ".join(
                f"{n} {got[n]['psnr_fg']:.2f}" if "psnr_fg" in got[n] else f"{n} ERROR" for n in names))

    def stage(name: str, fn: Callable[[], None], need_s: float) -> None:
        if not names:
            rec.skip(name, "no prior loaded")
            return
        if left() < need_s:
            rec.skip(name, f"{left():.0f} s left, needs about {need_s:.0f} s")
            return
        try:
            fn()
        except TimeoutError as e:
            rec.skip(name, str(e))
        except Exception as e:  # noqa: BLE001 - a late stage's failure keeps everything measured before it
            rec.error(name, e)

    stage("fast on the ruler", lambda: ruler_pass("fast", cfg_fast, args.slice_s), 20)

    # ---- 3. fast seconds per slice (maps estimated: ESPIRiT + SENSE + sampler)
    big = max(slices, key=lambda s: s.gt.size) if slices else None

    def fast_speed() -> None:
        for spec in args.speed.split(","):
            ny, nx, c = (int(v) for v in spec.split("x"))
            k, mask = synthetic_slice(_resize(big.gt, (ny, nx)), c, seed=1)
            for name in names:
                if left() < 15:
                    raise TimeoutError("deadline")

                def run() -> dict[str, Any]:
                    return api.reconstruct(k, mask, cfg_fast, device=dev, seed=0, prior=priors[name]).report

                rep = run()
                s = time_fn(run, dev, 3, warm=0)
                rec.data["fast_speed"].append({"prior": name, "shape": [ny, nx], "coils": c, "s_per_slice": s,
                                               "nfe": rep.get("nfe")})
                log.info("fast %s %dx%d C%d: %.3f s per slice", name, ny, nx, c, s)
                rec.flush()

    stage("fast seconds per slice", fast_speed, 15)

    # ---- 4. paper (N=2000) on one slice, new prior first; estimated from the measured network time
    def paper() -> None:
        sl = next((s for s in slices if s.meta["case"].endswith("/base") and s.gt.size >= 256 * 256), big)
        for name in names[: args.paper_priors]:
            steps = args.paper_steps
            ms = [n["ms"] for n in rec.data["network"] if n["prior"] == name and n["mode"] == "fp32"]
            est = 2 * steps * (min(ms) / 1e3 if ms else 0.01) * 1.6 + 2
            if left() < est + 10:
                rec.skip(f"paper {name}", f"about {est:.0f} s needed, {left():.0f} s left")
                continue
            o = {**over, "sampler.steps": str(steps)}
            if has_deadline:
                o["sampler.slice_deadline_s"] = str(max(1.0, left() - 5))
            cfg = load_config("paper", {**manifest.get("pipeline_properties", {}), **o})
            t = time.perf_counter()
            r = api.reconstruct(sl.kspace, sl.mask, cfg, maps=maps_cache.get(sl.meta["i"]), calib=sl.calib,
                                device=dev, seed=sl.meta["seed"], prior=priors[name])
            _sync(dev)
            secs = time.perf_counter() - t
            m = evaluate(r.image, sl.gt, sl.fg)
            rec.data["paper"].append({"prior": name, "case": sl.name, "steps": steps, "seconds": secs,
                                      "nfe": r.report.get("nfe"), "psnr_fg": float(m["psnr_fg"]),
                                      "estimate_s": est})
            log.info("paper N=%d %s on %s: %.1f s, PSNR fg %.2f", steps, name, sl.name, secs, m["psnr_fg"])
            rec.flush()

    stage("paper", paper, 10)
    stage("uncertainty on the ruler", lambda: ruler_pass("uncertainty", cfg_unc, args.slice_s * 2), 20)

    # ---- 5. a batched series (issue 13's reconstruct_batch, when it has landed)
    def batched() -> None:
        if not hasattr(api, "reconstruct_batch"):
            rec.data["batched_note"] = "recon.api.reconstruct_batch not in this tree (issue 13 not landed)"
            rec.flush()
            return
        ny, nx, c = (int(v) for v in args.speed.split(",")[0].split("x"))
        mag = _resize(big.gt, (ny, nx))
        ks, masks = zip(*(synthetic_slice(mag, c, seed=100 + i) for i in range(args.series)))
        name = first
        seeds = list(range(args.series))
        api.reconstruct_batch(list(ks[:2]), list(masks[:2]), cfg_fast, device=dev, seeds=seeds[:2],
                              prior=priors[name])  # warm-up
        t = time.perf_counter()
        api.reconstruct_batch(list(ks), list(masks), cfg_fast, device=dev, seeds=seeds, prior=priors[name])
        _sync(dev)
        secs = time.perf_counter() - t
        one = [s["s_per_slice"] for s in rec.data["fast_speed"] if s["prior"] == name and s["shape"] == [ny, nx]]
        rec.data["batched"] = {"prior": name, "slices": args.series, "shape": [ny, nx], "coils": c, "seconds": secs,
                               "slices_per_s": args.series / secs,
                               "one_by_one_slices_per_s": 1 / one[0] if one else None}
        log.info("batched %d slices: %.2f s", args.series, secs)
        rec.flush()

    stage("batched series", batched, 30)

    # ---- 6. the compiled network (bf16, channels-last), new prior first: compiling costs tens of seconds
    def compiled() -> None:
        cells = [(n, r) for n in names for r in res_list][: args.compile_cells or None]
        for name, res in cells:
            if left() < args.compile_need_s:
                raise TimeoutError(f"{left():.0f} s left, a compile needs about {args.compile_need_s:.0f} s")
            pnet = copy.deepcopy(priors[name].net).to(memory_format=torch.channels_last)
            fn = torch.compile(pnet, backend=args.compile_backend)
            x = torch.randn(2, 1, res, res, device=dev).contiguous(memory_format=torch.channels_last)
            s = torch.full((2,), 0.05, device=dev)

            def fwd() -> None:
                with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
                    fn(x, s)

            tc = time.perf_counter()
            fwd()
            _sync(dev)
            tc = time.perf_counter() - tc
            ms = time_fn(fwd, dev, args.reps) * 1e3
            rec.data["network"].append({"prior": name, "res": res, "batch": 2, "mode": "compiled", "ms": ms,
                                        "compile_s": tc})
            log.info("network %s %dx%d compiled: %.2f ms (compile %.1f s)", name, res, res, ms, tc)
            rec.flush()

    stage("compiled network", compiled, args.compile_need_s)
    rec.data["seconds"] = time.time() - t0
    rec.flush()
    log.info("measure stage done in %.0f s", time.time() - t0)
    return 0


# ================================================================================================ table
def table(args: argparse.Namespace) -> int:
    out = Path(args.out)
    mp = out / "measure.json"
    measure_data = json.loads(mp.read_text()) if mp.exists() else {"errors": [{"stage": "measure",
                                                                               "error": "no measure.json"}]}
    cp = out / WEIGHTS_NAME.replace(".safetensors", ".json")
    card = json.loads(cp.read_text()) if cp.exists() else None
    text = format_table(measure_data, card)
    (out / "table.md").write_text(text + "\n")
    print(text)
    return 0


# ================================================================================================ CLI
class ForbiddenImports(importlib.abc.MetaPathFinder):
    """Makes importing a package that the GPU machine lacks fail here too (``SCOREMRI_FORBID_IMPORTS``)."""

    def __init__(self, names: set[str]) -> None:
        self.names = names

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> None:
        if fullname.split(".")[0] in self.names:
            raise ModuleNotFoundError(f"{fullname} is not on the GPU machine (SCOREMRI_FORBID_IMPORTS): the GPU run "
                                      "must not import it")
        return None


def main(argv: list[str] | None = None) -> int:
    forbid = {n for n in os.environ.get("SCOREMRI_FORBID_IMPORTS", "").split(",") if n}
    if forbid:
        sys.meta_path.insert(0, ForbiddenImports(forbid))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="stage", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--pack", default=str(REPO / "gpu_pack"))
    common.add_argument("--out", default=os.environ.get("OUT", str(REPO / "gpu_out")))
    common.add_argument("--deadline", type=float, default=0.0, help="epoch seconds (0 = 9 minutes from now)")
    common.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    common.add_argument("--dry-run", action="store_true", help="CPU rehearsal (accepts a dry-run pack)")
    common.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = as is)")
    tr = sub.add_parser("train", parents=[common])
    tr.add_argument("--size", default="medium")
    tr.add_argument("--max-mib", type=float, default=15.0, help="refuse a network whose fp16 weights exceed this")
    tr.add_argument("--batch", type=int, default=32)
    tr.add_argument("--crop", type=int, default=256)
    tr.add_argument("--lr", type=float, default=5e-4)
    tr.add_argument("--warmup", type=int, default=300)
    tr.add_argument("--ema", type=float, default=0.999)
    tr.add_argument("--clip", type=float, default=1.0)
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--steps", type=int, default=0, help="stop after N steps (0 = at the deadline)")
    tr.add_argument("--sigma-min", type=float, default=0.01)
    tr.add_argument("--sigma-max", type=float, default=378.0)
    tr.add_argument("--sigma-focus", type=float, default=0.5)
    tr.add_argument("--p-focus", type=float, default=0.5)
    tr.add_argument("--zoom", default="0.7-2.0", help="field-of-view scale range of the crops")
    tr.add_argument("--p-complex", type=float, default=0.5)
    tr.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    tr.add_argument("--compile-backend", default="inductor")
    tr.add_argument("--compile-timeout-s", type=float, default=150.0,
                    help="abandon a first compiled step that takes longer and train eagerly (0 = wait)")
    tr.add_argument("--no-bf16", action="store_true")
    tr.add_argument("--data-chunk", type=int, default=16, help="batches drawn per augmentation call")
    tr.add_argument("--save-every-s", type=float, default=60.0)
    tr.add_argument("--log-every", type=int, default=25)
    tr.add_argument("--sample-size", type=int, default=128)
    tr.add_argument("--sample-steps", type=int, default=200)
    me = sub.add_parser("measure", parents=[common])
    me.add_argument("--new", default=None, help="new prior (default OUT/default.safetensors)")
    me.add_argument("--shipped", default=str(SHIPPED))
    me.add_argument("--set", action="append", default=[], help="recon overrides for every learned method")
    me.add_argument("--k", type=int, default=0, help="uncertainty samples (0 = the preset's 8)")
    me.add_argument("--paper-steps", type=int, default=2000)
    me.add_argument("--paper-priors", type=int, default=1, help="paper with the first N priors (new, then shipped)")
    me.add_argument("--speed", default="256x256x8,320x320x16", help="ny x nx x coils for the fast timing")
    me.add_argument("--net-res", default="256,320")
    me.add_argument("--series", type=int, default=30)
    me.add_argument("--reps", type=int, default=20)
    me.add_argument("--max-slices", type=int, default=0)
    me.add_argument("--slice-s", type=float, default=3.0, help="time kept free per ruler slice")
    me.add_argument("--compile-backend", default="inductor")
    me.add_argument("--compile-need-s", type=float, default=60.0)
    me.add_argument("--compile-cells", type=int, default=0, help="compile at most N (prior, res) cells (0 = all)")
    sub.add_parser("table", parents=[common])
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stdout)
    logging.getLogger("scoremri").setLevel(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.dry_run:
        # a CPU rehearsal: the few-step EMA weights of the dry run make subnormal activations, which a CPU
        # computes ~10x slower; flushing them keeps the rehearsal fast (no effect on the GPU run)
        torch.set_flush_denormal(True)
    if not args.deadline:
        args.deadline = time.time() + 540
    if args.stage == "measure" and args.new is None:
        args.new = str(Path(args.out) / WEIGHTS_NAME)
    try:
        return {"train": train, "measure": measure, "table": table}[args.stage](args)
    except PackError as e:
        log.error("%s", e)
        return 1


if __name__ == "__main__":
    sys.exit(main())
