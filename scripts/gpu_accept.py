"""After the GPU call of issue 10, on CPU: check what came back, decide, and install the new default prior.

    .venv/bin/python scripts/gpu_accept.py /work/.device/<files_at>      # the folder the device call returned

1. The weights load (sha256, size and config checked against their card) and the card names exactly the two
   allowed training files with their sha256 (the data rule), trained on a GPU.
2. The decision of issue 10 item 2 on measure.json (both priors on the same ruler slices, same GPU):
   accept when the new prior's mean PSNR inside the object is higher and no slice drops by more than 0.3 dB.
3. Printed: the run's table, and the figures beside the goals of item 3 for the new and the shipped prior.
4. Accepted: ``model/weights/default.{safetensors,json,md}``, ``loss.png`` and ``samples.png`` replaced; the card
   gains the denoising PSNR table on dipy's held-out slice (computed here), the CPU cost of a forward beside
   the old prior's, and the decision with its numbers. Rejected: nothing changes (exit 3).

``--dry-run`` takes a dry-run folder (any training data) and ``--force`` installs whatever the decision; both
are for tests and for a person who has read the numbers, and both are printed.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_common import ALLOWED_TRAINING, atomic_write_json, decision, format_table, goal_rows  # noqa: E402

log = logging.getLogger("gpu_accept")
REPO = Path(__file__).resolve().parents[1]
EXIT_REJECTED = 3


class AcceptError(ValueError):
    """What came back cannot be installed; the message names the file and the problem."""


def check_folder(folder: Path, dry_run: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """(card, measure) of a returned folder, after the checks of step 1."""
    from scoremri.model.checkpoint import ModelLoadError, load_model

    w = folder / "default.safetensors"
    try:
        _, card = load_model(w)
    except ModelLoadError as e:
        raise AcceptError(f"{e} (a run cut between writing the weights and the card leaves them out of step: "
                          "nothing to install)") from None
    t = card.get("training", {})
    if not t.get("steps"):
        raise AcceptError(f"{folder / 'default.json'}: no training steps recorded (an untrained network is no prior)")
    names = {f.get("name"): f.get("sha256") for f in t.get("files", [])}
    if not dry_run:
        if names != ALLOWED_TRAINING:
            raise AcceptError(f"{folder / 'default.json'}: trained on {sorted(names)}; the default prior trains only "
                              f"on {sorted(ALLOWED_TRAINING)} with their sha256 (data rule)")
        if not t.get("gpu"):
            raise AcceptError(f"{folder / 'default.json'}: not trained on a GPU (device {t.get('device')!r})")
    mp = folder / "measure.json"
    if not mp.exists():
        raise AcceptError(f"{mp} missing: no measurements, no decision")
    return card, json.loads(mp.read_text())


def cpu_forward_ms(paths: dict[str, Path], res: int = 256, rounds: int = 3) -> dict[str, float]:
    """CPU ms per network forward (batch 2 = one slice's real + imaginary parts, one thread, interleaved)."""
    from scoremri.model.checkpoint import load_model

    nets = {k: load_model(p)[0] for k, p in paths.items()}
    x, s = torch.randn(2, 1, res, res), torch.full((2,), 0.05)
    times: dict[str, list[float]] = {k: [] for k in nets}
    with torch.no_grad():
        for n in nets.values():
            n(x, s)
        for _ in range(rounds):
            for k, n in nets.items():
                t = time.perf_counter()
                n(x, s)
                times[k].append(time.perf_counter() - t)
    return {k: round(1e3 * float(np.median(v)), 1) for k, v in times.items()}


def write_md(path: Path, card: dict[str, Any], nparams: int) -> None:
    """The human-readable card of a GPU-trained default prior."""
    t, g = card["training"], card.get("gpu_run", {})
    L = [f"# scoremri model card: `{card['weights_file']}`", "",
         "Score prior (grad log p_sigma of magnitude / real / imaginary MR image parts in [0, 1] / [-1, 1]) for the "
         "score-based reconstruction of Chung & Ye (2022).", "",
         f"**{t.get('note', '')}**: {t.get('minutes')} min on {t.get('gpu')}, {t.get('steps')} iterations at "
         f"{t.get('it_per_s')} it/s, seed {t.get('seed')}.", "",
         "## Architecture",
         f"- NCSN++-style U-Net, size `{card['size']}`: {nparams:,} parameters, config `{json.dumps(card['config'])}`",
         f"- preconditioning: {card['preconditioning']}",
         f"- weights: {card['weights_dtype']}, {card['weights_bytes']:,} bytes, sha256 `{card['sha256']}`",
         f"- any H, W: {card['padding']} (multiple {card['multiple']})"]
    if "cpu_forward_ms_256" in card:
        c = card["cpu_forward_ms_256"]
        L.append(f"- CPU cost: {c['new']} ms per forward at 256x256, batch 2, one thread (the prior it replaced: "
                 f"{c['previous']} ms; measured interleaved on the accepting machine)")
    L += ["", "## SDE", f"- VE-SDE sigma_min {card['sde']['sigma_min']}, sigma_max {card['sde']['sigma_max']}, "
          f"N {card['sde']['N']}; {card.get('sigma_max_choice', '')}", "",
          "## Training data (nothing else; no phantoms, no evaluation images)"]
    for f in t["files"]:
        L.append(f"- `{f['name']}` ({f['slices']} slices along all three axes): sha256 `{f['sha256']}` (`{f['path']}`; "
                 f"carried as {f.get('packed_as')})")
    L += ["", "## Training",
          f"- {t['steps']} iterations, batch {t['batch']}, crops {t['crop']} px, {t['optimizer']}, lr {t['lr']} "
          f"({t['lr_schedule']}, warm-up {t['warmup']}), grad clip {t['grad_clip']}, EMA {t['ema_decay']}",
          f"- {t['device']}, torch {t['torch']}, {t['compile']} ({t['compile_s']} s for the first step), bf16 "
          f"autocast {t['bf16_autocast']}, channels-last; {t['it_per_s']} it/s; final loss {t['final_loss']}",
          f"- objective: {t['objective']}", f"- augmentation: {t['augmentation']} (p_complex {t['p_complex']})",
          "- loss curve: `loss.png`; unconditional samples: `samples.png`"
          + (f" ({card['samples']['size']} px, {card['samples']['sampler']})" if "samples" in card else ""), ""]
    if "denoising_psnr" in card:
        L += ["## Denoising PSNR (Tweedie, dipy t1_coronal_slice scaled to [0, 1]; held-out evaluation data)", "",
              "| sigma | noisy PSNR (dB) | denoised PSNR (dB) | gain (dB) |", "| --- | --- | --- | --- |"]
        for r in card["denoising_psnr"]["rows"]:
            L.append(f"| {r['sigma']} | {r['psnr_noisy_db']:.2f} | {r['psnr_denoised_db']:.2f} | "
                     f"{r['psnr_denoised_db'] - r['psnr_noisy_db']:.2f} |")
        L.append("")
    if g:
        L += ["## Why it ships (issue 10's rule, measured on the GPU beside the prior it replaced)", "",
              f"- {g['decision']['verdict']}", f"- measured on {g.get('device')}: `fast` on {g['decision']['compared']} "
              "slices of the visible benchmark (benchmarks/quality.py), same k-space, mask, seed and coil maps", ""]
        L += ["| goal (issue 10) | figure reached | verdict |", "| --- | --- | --- |"]
        L += [f"| {a} | {b} | {c} |" for a, b, c in g.get("goals", [])]
        L.append("")
    L += ["## Retrain", "", f"{t['retrain']}.", "", f"Versions: {json.dumps(card['versions'])}", ""]
    path.write_text("\n".join(L))


def install(folder: Path, card: dict[str, Any], measure: dict[str, Any], dec: dict[str, Any], weights_dir: Path,
            forced: bool) -> dict[str, Any]:
    from scoremri.model.backends import TorchScoreModel
    from scoremri.model.checkpoint import load_model
    from scoremri.model.ncsnpp import count_parameters
    from scoremri.model.publish import denoise_table, dipy_slice

    weights_dir.mkdir(parents=True, exist_ok=True)
    new_w, old_w = folder / "default.safetensors", weights_dir / "default.safetensors"
    net, _ = load_model(new_w)
    card = dict(card)
    table = denoise_table(TorchScoreModel(net, card), dipy_slice())
    card["denoising_psnr"] = {"image": "dipy t1_coronal_slice.npy / max (evaluation only, never trained on)",
                              "estimator": "Tweedie x + sigma^2 score", "seed": 0, "rows": table}
    if old_w.exists():
        ms = cpu_forward_ms({"new": new_w, "previous": old_w})
        card["cpu_forward_ms_256"] = {**ms, "batch": 2, "threads": torch.get_num_threads()}
    card["gpu_run"] = {"device": measure.get("device"), "decision": dec, "forced": forced,
                       "goals": goal_rows(measure, card, "new"),
                       "accepted_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    tmp = weights_dir / "default.safetensors.tmp"
    shutil.copyfile(new_w, tmp)
    tmp.replace(old_w)
    atomic_write_json(weights_dir / "default.json", card)
    for extra in ("loss.png", "samples.png"):
        if (folder / extra).exists():
            shutil.copyfile(folder / extra, weights_dir / extra)
    write_md(weights_dir / "default.md", card, count_parameters(net))
    load_model(old_w)  # the installed pair verifies
    return card


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folder", help="the files that came back from the GPU call ($OUT)")
    ap.add_argument("--weights-dir", default=str(REPO / "model" / "weights"))
    ap.add_argument("--dry-run", action="store_true", help="accept a dry-run folder (any training data)")
    ap.add_argument("--force", action="store_true", help="install whatever the decision says")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: the CPU cost is quoted "
                    "per thread, and more only contend on a shared machine)")
    args = ap.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _run(args)
    finally:
        torch.set_num_threads(threads)
        torch.set_flush_denormal(False)


def _run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("scoremri").setLevel(logging.WARNING)
    folder = Path(args.folder)
    if args.dry_run:
        torch.set_flush_denormal(True)  # a few-step dry-run prior makes subnormal activations: slow on a CPU
    try:
        card, measure = check_folder(folder, args.dry_run)
    except AcceptError as e:
        print(f"gpu_accept: {e}", file=sys.stderr)
        return 1
    print(format_table(measure, card))
    print("\nGoals with the shipped prior (same run):")
    for g, fig, verdict in goal_rows(measure, card, "shipped"):
        if "it/s" not in g:
            print(f"| {g} | {fig} | {verdict} |")
    dec = decision(measure)
    print(f"\n{dec['verdict']}")
    if not dec["accept"] and not args.force:
        print("nothing installed: the shipped prior stays")
        return EXIT_REJECTED
    if args.force and not dec["accept"]:
        print("--force: installing although the rule says no")
    new = install(folder, card, measure, dec, Path(args.weights_dir), args.force and not dec["accept"])
    cpu = new.get("cpu_forward_ms_256", {})
    print(f"installed {args.weights_dir}/default.safetensors (sha256 {new['sha256'][:16]}...); denoising gain at sigma "
          f"0.1 on dipy: {next((r['psnr_denoised_db'] - r['psnr_noisy_db'] for r in new['denoising_psnr']['rows'] if r['sigma'] == 0.1), float('nan')):.2f} dB"
          + (f"; CPU forward 256x256 b2: {cpu.get('new')} ms (previous {cpu.get('previous')} ms)" if cpu else ""))
    print("next: run the tests that use the default prior (tests/model/test_default_model.py, tests/recon), "
          "commit model/weights/ with the figures above")
    return 0


if __name__ == "__main__":
    sys.exit(main())
