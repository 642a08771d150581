"""Issue 10's prepared GPU run, rehearsed on CPU: gpu_pack.py packs a tiny subset from the quality benchmark's own
case definitions, ``scripts/gpu_run.sh --dry-run`` runs every stage of the GPU call (train, publish, measure,
table) with a tiny network, and gpu_accept.py checks, decides and installs what came back."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "scripts"
sys.path.insert(0, str(SCRIPTS))


def _benchmark_has_cases() -> bool:
    text = (REPO / "benchmarks" / "quality.py").read_text()
    return "def make_cases(" in text and "def write_case(" in text


def _phantom_volume(path: Path) -> None:
    """A synthetic training volume (ellipsoids; no evaluation data, no templates): (20, 40, 40) float32."""
    z, y, x = np.mgrid[-1:1:20j, -1:1:40j, -1:1:40j]
    vol = ((x / 0.8) ** 2 + (y / 0.9) ** 2 + (z / 0.9) ** 2 < 1).astype(np.float32) * 0.6
    vol += ((x / 0.3 - 0.5) ** 2 + (y / 0.5) ** 2 + (z / 0.6) ** 2 < 1) * 0.4
    np.save(path, vol)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> dict:
    if not _benchmark_has_cases():
        pytest.skip("benchmarks/quality.py is not yet issue 11's raw-file benchmark (make_cases/write_case)")
    import gpu_pack

    tmp = tmp_path_factory.mktemp("gpu")
    _phantom_volume(tmp / "phantom.npy")
    pack, out = tmp / "pack", tmp / "out"
    rc = gpu_pack.main(["--dry-run", "--train-file", str(tmp / "phantom.npy"), "--sources", "ex4d", "--settings",
                        "base", "--max-slices", "1", "--no-bart", "-o", str(pack)])
    assert rc == 0
    env = {**os.environ, "OUT": str(out), "GPU_PACK": str(pack), "PYTHON": sys.executable}
    p = subprocess.run([str(SCRIPTS / "gpu_run.sh"), "--dry-run"], env=env, capture_output=True, text=True,
                       timeout=600)
    return {"pack": pack, "out": out, "proc": p, "tmp": tmp}


@pytest.mark.slow
def test_pack_holds_the_chain_inputs_and_the_cpu_baseline(dry_run) -> None:
    from gpu_common import read_manifest, ruler_slices, training_volumes

    m = read_manifest(dry_run["pack"])
    assert m["purpose"] == "dry-run" and m["benchmark"]["path"].endswith("benchmarks/quality.py")
    (entry, vol), = training_volumes(dry_run["pack"], m)
    assert entry["name"] == "phantom.npy" and vol.dtype == np.float16 and entry["slices"] > 20
    sl, = ruler_slices(dry_run["pack"], m)
    assert sl.meta["case"] == "ex4d/base" and sl.kspace.shape == (8, 128, 96) and sl.mask.shape == (128, 96)
    assert abs(sl.meta["accel"] - 4.0) < 0.2 and sl.fg.sum() > 1000
    # zeros exactly where nothing was measured; SENSE through the same core as replay, scored as the benchmark does
    assert np.all(sl.kspace[:, ~sl.mask.any(axis=1)] == 0) and np.abs(sl.kspace[:, sl.mask.any(axis=1)]).min() > 0
    assert 22.0 < sl.meta["baselines"]["sense"]["psnr_fg"] < 35.0


@pytest.mark.slow
def test_dry_run_runs_every_stage_and_returns_at_most_8_files(dry_run) -> None:
    p, out = dry_run["proc"], dry_run["out"]
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    files = sorted(f.name for f in out.iterdir())
    assert files == ["default.json", "default.safetensors", "log.txt", "loss.png", "measure.json", "samples.png",
                     "table.md"]
    from scoremri.model.checkpoint import load_model

    net, card = load_model(out / "default.safetensors")  # sha256 / size / config of the fp16 EMA weights
    t = card["training"]
    assert card["weights_dtype"] == "float16" and t["steps"] == 4 and t["batch"] == 2 and t["seed"] == 0
    assert [f["name"] for f in t["files"]] == ["phantom.npy"] and len(t["files"][0]["sha256"]) == 64
    assert t["it_per_s"] > 0 and t["compile"].startswith("torch.compile") and "samples" in card
    m = json.loads((out / "measure.json").read_text())
    row, = m["ruler"]
    sense = row["baselines"]["sense"]["psnr_fg"]
    for method in ("fast", "uncertainty"):
        assert set(row[method]) == {"new", "shipped"}
    # the shipped prior on the packed k-space is a real reconstruction of the packed ground truth (a garbled
    # k-space, mask or scale would be far below SENSE on the same data)
    assert row["fast"]["shipped"]["psnr_fg"] > sense - 3.0
    assert {(n["prior"], n["mode"]) for n in m["network"]} >= {("new", "fp32"), ("new", "bf16"), ("shipped", "fp32")}
    assert len(m["fast_speed"]) == 2 and all(s["s_per_slice"] > 0 for s in m["fast_speed"])
    assert m["paper"] and m["paper"][0]["steps"] == 2
    assert "batched" in m or "batched_note" in m
    assert not m["errors"], m["errors"]
    table = (out / "table.md").read_text()
    assert "decision (issue 10 item 2): REJECT" in table and "Goals (issue 10 item 3)" in table
    # the table is what the call prints last
    assert p.stdout.rstrip().endswith(table.rstrip().splitlines()[-1])


@pytest.mark.slow
def test_accept_refuses_other_data_rejects_a_worse_prior_and_installs_when_forced(dry_run, tmp_path) -> None:
    import gpu_accept

    out = dry_run["out"]
    assert gpu_accept.main([str(out), "--weights-dir", str(tmp_path / "w")]) == 1  # phantom.npy is not allowed
    assert gpu_accept.main([str(out), "--dry-run", "--weights-dir", str(tmp_path / "w")]) == gpu_accept.EXIT_REJECTED
    assert not (tmp_path / "w").exists()
    assert gpu_accept.main([str(out), "--dry-run", "--force", "--weights-dir", str(tmp_path / "w")]) == 0
    from scoremri.model.checkpoint import load_model

    _, card = load_model(tmp_path / "w" / "default.safetensors")
    assert card["gpu_run"]["forced"] and not card["gpu_run"]["decision"]["accept"]
    assert len(card["denoising_psnr"]["rows"]) == 5
    for f in ("default.md", "loss.png", "samples.png"):
        assert (tmp_path / "w" / f).stat().st_size > 0


def test_decision_rule_mean_higher_and_no_case_drops_more_than_0_3_db() -> None:
    from gpu_common import decision

    def m(pairs):
        return {"ruler": [{"case": f"c{i}", "label": "s", "fast": {"new": {"psnr_fg": a}, "shipped": {"psnr_fg": b}}}
                          for i, (a, b) in enumerate(pairs)]}

    assert decision(m([(30.0, 29.0), (28.0, 28.2)]))["accept"]
    assert not decision(m([(31.0, 29.0), (27.0, 27.4)]))["accept"]  # one case drops 0.4 dB
    assert not decision(m([(29.0, 29.1), (28.0, 28.0)]))["accept"]  # mean lower
    partial = m([(30.0, 29.0)])
    partial["ruler"].append({"case": "c9", "label": "s", "fast": {"shipped": {"psnr_fg": 20.0}}})
    d = decision(partial)
    assert not d["accept"] and d["verdict"].startswith("incomplete")


@pytest.mark.bart
def test_pack_stores_bart_pics_at_its_best_lambda_beside_sense(bart_available, tmp_path) -> None:
    """The CPU-only baselines of the GPU table come from the benchmark's own run_bart on the chain's k-space."""
    if not _benchmark_has_cases():
        pytest.skip("benchmarks/quality.py is not yet issue 11's raw-file benchmark (make_cases/write_case)")
    import gpu_pack
    from gpu_common import read_manifest

    _phantom_volume(tmp_path / "phantom.npy")
    assert gpu_pack.main(["--dry-run", "--train-file", str(tmp_path / "phantom.npy"), "--sources", "ex4d",
                          "--settings", "base", "--max-slices", "1", "-o", str(tmp_path / "pack")]) == 0
    b = read_manifest(tmp_path / "pack")["ruler"][0]["baselines"]
    assert b["bart_l1"]["lambda"] in (0.003, 0.01, 0.03)
    # pics-l1 at its best lambda is at least SENSE-class on this brain slice (26.6 vs 25.9 dB measured)
    assert b["bart_l1"]["psnr_fg"] > b["sense"]["psnr_fg"] - 0.5 and b["bart_l2"]["psnr_fg"] > 20
