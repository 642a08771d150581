"""The one configuration loader: presets, dotted overrides, validation errors that name the entry."""
from __future__ import annotations

import pytest

from scoremri.recon.config import ConfigError, dotted_names, load_config, parse_overrides


@pytest.mark.parametrize("preset", ["fast", "paper", "uncertainty", "sense", "zero_filled"])
def test_every_shipped_preset_loads(preset: str) -> None:
    cfg = load_config(preset)
    assert cfg.sampler.method in ("fast", "pc", "sense", "zero_filled")


def test_overrides_are_typed_from_strings() -> None:
    cfg = load_config("sense", parse_overrides(["sampler.cg_iters=7", "sampler.lam=0.5", "coils.cache=false"]))
    assert cfg.sampler.cg_iters == 7 and cfg.sampler.lam == 0.5 and cfg.coils.cache is False


@pytest.mark.parametrize(
    "overrides, words",
    [
        ({"sampler.stepz": "3"}, ["sampler.stepz", "sampler.steps"]),
        ({"sampler.steps": "many"}, ["sampler.steps", "int"]),
        ({"sampler.method": "magic"}, ["sampler.method", "magic"]),
        ({"sampler.steps": "0"}, ["sampler.steps", "> 0"]),
        ({"output.uncertainty": "true", "sampler.samples": "1"}, ["output.uncertainty", "samples"]),
    ],
)
def test_bad_entries_name_the_problem(overrides: dict, words: list[str]) -> None:
    with pytest.raises(ConfigError) as e:
        load_config("fast", overrides)
    for w in words:
        assert w in str(e.value)


def test_unknown_preset_lists_the_available_ones() -> None:
    with pytest.raises(ConfigError, match="available: .*fast"):
        load_config("nonexistent")


def test_explicit_override_beats_the_per_acceleration_table() -> None:
    preset = load_config("fast").sampler
    assert any(r.start_sigma is not None for r in preset.by_accel)  # the preset's table does set start_sigma...
    cfg = load_config("fast", {"sampler.start_sigma": "0.3"}).sampler
    for accel in (2.0, 4.0, 8.0, 12.0):  # ...but an explicit value wins at every acceleration
        assert cfg.for_acceleration(accel).start_sigma == 0.3
    assert cfg.for_acceleration(8.0).dc_lam == preset.for_acceleration(8.0).dc_lam != preset.dc_lam


def test_dotted_names_cover_every_section() -> None:
    names = dotted_names()
    for n in ("coils.threshold", "sampler.steps", "model.path", "output.uncertainty"):
        assert n in names


def test_dataclass_defaults_are_the_default_preset() -> None:
    from scoremri.recon.config import ReconConfig

    assert load_config("fast") == ReconConfig().validate()
    assert load_config(None) == load_config("fast")


def test_uncertainty_inherits_fast_and_adds_samples() -> None:
    fast, unc = load_config("fast"), load_config("uncertainty")
    assert unc.sampler.samples == 8 and unc.output.uncertainty is True
    unc.sampler.samples, unc.output.uncertainty = fast.sampler.samples, fast.output.uncertainty
    assert unc == fast  # nothing else differs: a change to fast reaches uncertainty


def test_preset_inherit_chain_and_cycle(tmp_path) -> None:
    a = tmp_path / "a.yaml"
    b = tmp_path / "b.yaml"
    a.write_text(f"inherit: {b}\nsampler:\n  steps: 7\n")
    b.write_text("inherit: uncertainty\nsampler:\n  steps: 9\n  eta: 0.5\n")
    cfg = load_config(str(a))
    assert (cfg.sampler.steps, cfg.sampler.eta, cfg.sampler.samples) == (7, 0.5, 8)
    b.write_text(f"inherit: {a}\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(str(a))


def test_by_accel_rows_through_overrides_and_yaml(tmp_path) -> None:
    cfg = load_config("fast", {"sampler.by_accel": "[{max_accel: 3, steps: 11}, {max_accel: '*', steps: 13}]"})
    assert [r.steps for r in cfg.sampler.by_accel] == [11, 13]
    assert cfg.sampler.for_acceleration(2.5).steps == 11 and cfg.sampler.for_acceleration(9.0).steps == 13
    assert load_config("fast", {"sampler.by_accel": ""}).sampler.by_accel == []
    p = tmp_path / "mine.yaml"
    p.write_text("inherit: fast\nsampler:\n  by_accel:\n    - {max_accel: 6, dc_lam: 0.2}\n")
    rows = load_config(str(p)).sampler.by_accel
    assert len(rows) == 1 and rows[0].dc_lam == 0.2 and rows[0].max_accel == 6.0
    with pytest.raises(ConfigError, match=r"max_accel must be >= 1"):
        load_config("fast", {"sampler.by_accel": "[{max_accel: 0.5}]"})


def test_method_lists_derive_from_the_registry(monkeypatch) -> None:
    """A newly registered sampler is accepted by the config and asks the gadget layer for a prior."""
    from scoremri.recon import methods
    from scoremri.recon.api import reconstruct

    methods.methods()  # the shipped ones are loaded
    assert set(methods.method_names()) >= {"fast", "pc", "sense", "zero_filled"}
    assert methods.needs_prior("fast") and not methods.needs_prior("sense")
    with pytest.raises(ConfigError, match="brand_new"):
        load_config("fast", {"sampler.method": "brand_new"})
    monkeypatch.setattr(methods, "_REGISTRY", dict(methods._REGISTRY))
    calls = []

    @methods.register_method("brand_new", needs_prior=False, description="test sampler")
    def brand_new(problem):
        calls.append(problem.config.sampler.method)
        return problem.maps.conj().sum(0) * 0, None, {"nfe": 0}

    cfg = load_config("fast", {"sampler.method": "brand_new"})
    import numpy as np

    k = np.ones((2, 8, 8), np.complex64)
    maps = np.ones((2, 8, 8), np.complex64) / np.sqrt(2)
    res = reconstruct(k, np.ones((8, 8), bool), cfg, maps=maps)
    assert calls == ["brand_new"] and res.image.shape == (8, 8)
    assert methods.needs_prior("brand_new") is False
