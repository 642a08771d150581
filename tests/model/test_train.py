"""Training: DSM loss decreases and the tiny model's score approaches the analytic score of a Gaussian toy
distribution; the CLI trains, checkpoints and resumes; the data loaders read every supported format."""
from pathlib import Path

import numpy as np
import pytest
import torch

from scoremri.model.data import Augment, SliceBank, load_slices, sample_batch
from scoremri.model.ncsnpp import build_network
from scoremri.model.priors import GaussianPrior
from scoremri.model.sde import VESDE
from scoremri.model.train import EMA, dsm_loss

PRIOR = GaussianPrior(0.5, 0.1)
SIGMAS = (0.05, 0.2, 1.0)


def _score_error(net: torch.nn.Module) -> list[float]:
    """Relative L2 error of the network's score vs the analytic one, at x ~ p_sigma, per sigma."""
    g = torch.Generator().manual_seed(123)
    out = []
    net.eval()
    for s in SIGMAS:
        x = PRIOR.sample((16, 1, 8, 8), g)
        x = x + s * torch.randn(x.shape, generator=g)
        sig = torch.full((16,), s)
        with torch.no_grad():
            a, b = net(x, sig), PRIOR.score(x, sig)
        out.append(((a - b).norm() / b.norm()).item())
    net.train()
    return out


def _eval_loss(net: torch.nn.Module, sde: VESDE) -> float:
    g = torch.Generator().manual_seed(7)
    x0 = PRIOR.sample((64, 1, 8, 8), g)
    net.eval()
    with torch.no_grad():
        loss = dsm_loss(net, x0, sde, g).item()
    net.train()
    return loss


@pytest.fixture(scope="module")
def toy_run() -> dict:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    sde = VESDE(0.01, 5.0, 100)
    net = build_network("tiny")
    ema = EMA(net, 0.99)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    res = {"err0": _score_error(net), "loss0": _eval_loss(net, sde)}
    for step in range(150):
        loss = dsm_loss(net, PRIOR.sample((16, 1, 8, 8), g), sde, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update(net, step)
    res.update(err=_score_error(net), loss=_eval_loss(net, sde))
    return res


def test_dsm_loss_decreases(toy_run: dict) -> None:
    assert toy_run["loss"] < 0.7 * toy_run["loss0"], toy_run


def test_tiny_score_approaches_gaussian_score(toy_run: dict) -> None:
    err0, err = toy_run["err0"], toy_run["err"]
    assert all(e < 0.35 for e in err), err
    assert all(e < 0.5 * e0 for e, e0 in zip(err, err0)), (err0, err)


def test_augmented_batches(tmp_path: Path) -> None:
    yy, xx = np.mgrid[:60, :50]
    slices = [np.exp(-((yy - 30) ** 2 + (xx - 25) ** 2) / (2 * (8 + i) ** 2)).astype(np.float32)
              for i in range(5)]
    bank = SliceBank.from_slices(slices)
    assert bank.images.shape == (5, 1, 60, 50)
    g = torch.Generator().manual_seed(0)
    x = sample_batch(bank, 64, 32, Augment(p_complex=0.0), g)
    assert x.shape == (64, 1, 32, 32) and x.min() >= 0 and x.max() <= 1.0 + 1e-6 and x.max() > 0.5
    y = sample_batch(bank, 64, 32, Augment(p_complex=1.0), g)
    assert y.min() < -0.1  # real/imag parts of x * exp(i phi) take both signs
    assert (y.abs() <= 1.0 + 1e-6).all()


def test_loaders_all_formats(tmp_path: Path) -> None:
    import h5py
    import nibabel as nib
    from PIL import Image

    rng = np.random.default_rng(1)
    vol = np.zeros((12, 14, 10), np.float32)
    vol[2:10, 3:11, 2:8] = 1 + rng.random((8, 8, 6))
    nib.save(nib.Nifti1Image(vol, np.eye(4)), tmp_path / "v.nii.gz")
    s = load_slices(tmp_path / "v.nii.gz")
    assert len(s) == 8 + 8 + 6  # non-empty slices along all three axes
    assert all(abs(a.max() - 1) < 1e-6 for a in s)
    np.save(tmp_path / "a.npy", vol[:, :, 4])
    assert len(load_slices(tmp_path / "a.npy")) == 1
    with h5py.File(tmp_path / "f.h5", "w") as f:
        f["reconstruction_rss"] = np.moveaxis(vol, 2, 0)
    assert len(load_slices(tmp_path / "f.h5")) == 6
    (tmp_path / "png").mkdir()
    Image.fromarray((vol[:, :, 4] / vol.max() * 255).astype(np.uint8)).save(tmp_path / "png" / "a.png")
    assert len(load_slices(tmp_path / "png")) == 1
    np.savez(tmp_path / "b.npz", n=2, s0=vol[:, :, 3], s1=vol[:, :, 4])
    assert len(load_slices(tmp_path / "b.npz")) == 2
    with pytest.raises(FileNotFoundError, match="training data not found"):
        load_slices(tmp_path / "missing.nii.gz")
    with pytest.raises(ValueError, match="unsupported training file type"):
        (tmp_path / "x.txt").write_text("x")
        load_slices(tmp_path / "x.txt")


def test_cli_train_checkpoint_resume(tmp_path: Path) -> None:
    from scoremri.gadget.cli import main
    from scoremri.model.checkpoint import load_model

    yy, xx = np.mgrid[:40, :40]
    stack = np.stack([np.exp(-((yy - 20) ** 2 + (xx - 18 - i) ** 2) / 60.0) for i in range(4)])
    np.save(tmp_path / "d.npy", stack.astype(np.float32))
    out = tmp_path / "run"
    common = ["--size", "tiny", "--no-progress", "--threads", "1", "--save-every", "1000"]
    assert main(["train", str(tmp_path / "d.npy"), "-o", str(out), "--steps", "6", "--batch", "4",
                 "--crop", "16-24", "--sigma-max", "rule", *common]) == 0
    st = torch.load(out / "state.pt", weights_only=False)
    assert st["step"] == 6 and st["args"]["crop"] == "16-24"
    assert main(["train", "-o", str(out), "--resume", "--steps", "9", *common]) == 0
    st = torch.load(out / "state.pt", weights_only=False)
    assert st["step"] == 9 and st["args"]["batch"] == 4  # resumed run keeps its hyper-parameters
    assert main(["train", "-o", str(out), "--resume", "--steps", "11", "--lr-end", "1e-5", "--warmup", "1",
                 "--decay-start", "9", *common]) == 0  # the last step (10) is half-way down the cosine
    lr = torch.load(out / "state.pt", weights_only=False)["opt"]["param_groups"][0]["lr"]
    assert lr == pytest.approx(1e-5 + 0.5 * (5e-4 - 1e-5))
    net, card = load_model(out / "model.safetensors")
    assert card["training"]["steps"] == 11 and card["training"]["files"][0]["name"] == "d.npy"
    assert card["training"]["lr_schedule"] == "cosine 0.0005 -> 1e-05 from step 9 to 11"
    assert len(card["training"]["files"][0]["sha256"]) == 64
    assert "Song & Ermon" in card["sigma_max_choice"]
    assert 1.0 < card["sde"]["sigma_max"] < 40.0  # max distance of 4 shifted blobs on 256^2
    assert (out / "loss.png").stat().st_size > 0


def test_cli_train_init_from_published(tmp_path: Path) -> None:
    """--init fine-tunes a published model: same network and SDE, EMA starting at its weights, step count
    continued from its card, the start recorded on the new card; --init with --resume is a usage error."""
    from scoremri.gadget.cli import main
    from scoremri.model.checkpoint import load_model

    yy, xx = np.mgrid[:40, :40]
    np.save(tmp_path / "d.npy", np.exp(-((yy - 20) ** 2 + (xx - 18) ** 2) / 60.0)[None].astype(np.float32))
    common = ["--size", "tiny", "--no-progress", "--threads", "1", "--save-every", "1000", "--batch", "2",
              "--crop", "16-24"]
    assert main(["train", str(tmp_path / "d.npy"), "-o", str(tmp_path / "a"), "--steps", "4",
                 "--sigma-max", "7", *common]) == 0
    first, card_a = load_model(tmp_path / "a" / "model.safetensors")
    assert main(["train", str(tmp_path / "d.npy"), "-o", str(tmp_path / "b"), "--steps", "4",
                 "--init", str(tmp_path / "a" / "model.safetensors"), *common]) == 0
    same, card_b = load_model(tmp_path / "b" / "model.safetensors")  # no step taken: EMA = the init weights
    assert all(torch.equal(p, q) for p, q in zip(first.state_dict().values(), same.state_dict().values()))
    assert card_b["sde"]["sigma_max"] == 7.0 and card_b["training"]["init"]["step"] == 4
    assert card_b["training"]["init"]["sha256"] == card_a["sha256"]
    assert main(["train", "-o", str(tmp_path / "b"), "--resume", "--steps", "6", "--lr-end", "1e-5",
                 "--decay-start", "4", *common[:-4]]) == 0
    _, card_c = load_model(tmp_path / "b" / "model.safetensors")
    assert card_c["training"]["steps"] == 6 and card_c["training"]["init"]["sha256"] == card_a["sha256"]
    assert main(["train", "-o", str(tmp_path / "b"), "--resume", "--init",
                 str(tmp_path / "a" / "model.safetensors"), "--steps", "8", *common]) == 2
    from scoremri.model.publish import publish  # the card of a published fine-tune records both runs

    card = publish(tmp_path / "b", tmp_path / "pub", "ft", sample_steps=3, machine="cpu (test)",
                   command="scoremri train ... --init a/model.safetensors")
    t = card["training"]
    assert t["init"]["step"] == 4 and t["this_run"]["steps"] == 2 and t["device"] == "cpu (test)"
    md = (tmp_path / "pub" / "ft.md").read_text()
    assert t["lr_schedule"] == "cosine 0.0005 -> 1e-05 from step 4 to 6" and "then cosine 0.0005" in md
    assert "fine-tuned (`scoremri train --init`)" in md and "2 more steps" in md and "--init a/model" in md


def test_lr_schedule_warmup_constant_and_cosine_anneal() -> None:
    """lr_at: linear warm-up, then constant; with lr_end a half-cosine from decay_start to steps."""
    from scoremri.model.train import lr_at

    assert lr_at(0, 1e-3, 0, 10, 100) == pytest.approx(1e-4)
    assert lr_at(50, 1e-3, 0, 10, 100) == pytest.approx(1e-3)
    assert lr_at(5000, 1e-3, 0, 10, 100) == pytest.approx(1e-3)  # no anneal asked: constant
    kw = dict(lr_end=1e-4, decay_start=40)
    assert lr_at(39, 1e-3, 0, 10, 100, **kw) == pytest.approx(1e-3)
    assert lr_at(70, 1e-3, 0, 10, 100, **kw) == pytest.approx(0.55e-3)  # half-way: the mean of both ends
    assert lr_at(100, 1e-3, 0, 10, 100, **kw) == pytest.approx(1e-4)
    assert lr_at(500, 1e-3, 0, 10, 100, **kw) == pytest.approx(1e-4)
    rates = [lr_at(s, 1e-3, 0, 10, 100, **kw) for s in range(40, 101)]
    assert all(a >= b for a, b in zip(rates, rates[1:]))  # monotone decay
    assert lr_at(12, 1e-3, 10, 10, 100, lr_end=1e-4) == pytest.approx(3e-4)  # a fine-tune warms up again
