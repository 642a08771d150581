"""benchmarks/quality.py's machinery on one tiny case: raw file -> replay and BART on the chain's k-space, scored
against the stored ground truth; an external row provider becomes a column; the summary states the targets."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]


def _quality():
    spec = importlib.util.spec_from_file_location("quality_benchmark", REPO / "benchmarks" / "quality.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["quality_benchmark"] = mod
    spec.loader.exec_module(mod)
    return mod


PROVIDER = '''
from dataclasses import dataclass
import numpy as np
import quality_benchmark as q

@dataclass
class Out:
    images: list
    seconds: float
    note: str

def provider(raw, workdir):
    """SENSE-free reference column: the coil-combined zero-filled image of the chain's k-space."""
    ks, _ = q.chain_kspace(raw)
    imgs = [np.sqrt((np.abs(np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(k, axes=(-2, -1)), norm="ortho"),
                                          axes=(-2, -1))) ** 2).sum(0)) for _, k in ks]
    return Out(imgs, 0.0, "rss")
provider.name = "rss_zf"
'''


def test_quick_machinery_on_one_tiny_case(bart_available, tmp_path, capsys):
    q = _quality()
    (tmp_path / "prov.py").write_text(PROVIDER)
    rows = q.run_job(q.Job(q.make_cases(["ex4d"], ["base"], max_slices=1)[0],
                           ["zero_filled", "sense", "bart_l1", "bart_l2", "fast"], {"steps=3": {"sampler.steps": "3"}},
                           {"sampler.steps": "4"}, [f"{tmp_path / 'prov.py'}:provider"], "cpu", None))
    by = {r.method: r for r in rows}
    assert set(by) == {"zero_filled", "sense", "bart_l1", "bart_l2", "fast", "steps=3", "rss_zf"}
    assert all(r.shape == (128, 96) and r.role == "TUNE" and abs(r.accel - 4.0) < 0.1 for r in rows)
    # real numbers on real anatomy: SENSE and pics beat zero filling; BART ran on the chain's k-space
    assert by["sense"].psnr_fg > by["zero_filled"].psnr_fg + 1.5
    assert by["bart_l1"].psnr_fg > by["zero_filled"].psnr_fg + 1.5 and "lambda" in by["bart_l1"].note
    assert by["fast"].psnr_fg > by["zero_filled"].psnr_fg and 0.5 < by["fast"].extra["rho"] < 1.5
    assert np.isfinite([r.seconds for r in rows]).all()
    text = q.summary([r for r in rows if r.method != "steps=3"], ["zero_filled", "sense", "bart_l1", "fast"])
    assert "target fast >= SENSE + 1 dB" in text and "rss_zf" in text and "sanity fallback fired on 0" in text
    assert "steps=3" in q.ablation_table(rows, ["steps=3"])
