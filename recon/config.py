"""Reconstruction configuration: dataclasses per concern, one loader, one set of dotted names.

Sources, later ones override earlier ones:
1. the dataclass defaults,
2. a YAML preset (``pipelines/presets/<name>.yaml`` or a path),
3. overrides ``{"sampler.steps": "50", ...}`` from Gadgetron XML ``<property>`` elements or ``--set``.

The compute device is *not* part of the configuration: it is a runtime argument resolved once at the entry.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field, fields, is_dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

import yaml


class ConfigError(ValueError):
    """A configuration value or name is invalid; the message names it."""


@dataclass
class CoilConfig:
    """Coil-sensitivity estimation (ESPIRiT on the ACS; Walsh fallback for small ACS)."""

    method: str = "auto"  # auto | espirit | walsh
    calib_size: int = 24  # max ACS lines used (phase direction); readout uses the same width
    kernel: int = 6  # ESPIRiT kernel width
    threshold: float = 0.02  # keep singular values s/s_max > threshold (sigpy); BART's `-t t` equals sqrt(t)
    crop: float = 0.95  # eigenvalue crop: maps where lambda < crop are zeroed
    min_acs: int = 12  # with fewer fully sampled centre lines 'auto' uses Walsh
    cache: bool = True  # gadget/replay: reuse maps per slice location

    def validate(self) -> None:
        _choice("coils.method", self.method, ("auto", "espirit", "walsh"))
        _positive("coils.kernel", self.kernel)
        _positive("coils.calib_size", self.calib_size)
        _range("coils.threshold", self.threshold, 0.0, 1.0)
        _range("coils.crop", self.crop, 0.0, 1.0)


@dataclass
class AccelRule:
    """One row of the per-acceleration table ``sampler.by_accel``: applies when the mask's true acceleration
    is <= ``max_accel`` (``.inf``/omitted: any); each field that is not None replaces the sampler field of the
    same name. In YAML: ``by_accel: [{max_accel: 5}, {start_sigma: 0.05, steps: 20}]``."""

    max_accel: float = math.inf
    start: str | None = None
    start_sigma: float | None = None
    steps: int | None = None
    dc_iters: int | None = None
    dc_lam: float | None = None
    dc_rho: float | None = None
    eta: float | None = None
    final: str | None = None
    dc: str | None = None
    snr: float | None = None

    def updates(self) -> dict[str, Any]:
        """The sampler fields this row sets."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "max_accel"
                and getattr(self, f.name) is not None}


def _default_by_accel() -> list[AccelRule]:
    # chosen with the fast preset on the TUNE set of benchmarks/quality.py: the defaults above up to x5, a lower
    # start beyond (and, where no calibration block gives the noise level, a lower fixed DC weight)
    return [AccelRule(max_accel=5.0), AccelRule(start_sigma=0.05, dc_lam=0.3)]


@dataclass
class SamplerConfig:
    """Which reconstruction runs and how. The defaults ARE the default preset ``fast`` (its YAML adds nothing);
    ``sampler.method`` is any name of the method registry (recon/methods.py)."""

    method: str = "fast"
    lam: float = 0.01  # Tikhonov weight of SENSE (A^H A + lam I), relative to max eigenvalue ~1
    cg_iters: int = 30  # CG iterations of the SENSE reconstruction
    steps: int = 22  # sampler noise levels (network evaluations per image: steps for 'fast', 2 x steps for 'pc';
    # calls depend on sampler.batch); 22, not 25, pays for the 2 samples below (see there)
    snr: float = 0.16  # Langevin corrector signal-to-noise ratio ('pc')
    dc: str = "sense"  # data consistency: replace | ssos | hybrid | sense | sense_grad (recon/dc.py)
    dc_iters: int = 5  # CG steps per data-consistency call
    dc_lam: float = 0.5  # 'sense' DC proximal weight mu: CG on (A^H A + mu I) x = A^H y + mu x0 (0 = plain DDS)
    # dc_rho > 0: noise-aware weight per level, mu_i = (noise / scale)^2 / (dc_rho sigma_i)^2 within
    # [dc_lam_min, dc_lam_max] (the MAP weight of data with that noise against a denoise whose error std is
    # dc_rho sigma_i); noise = the data's noise std estimated from the calibration block; dc_lam when none
    dc_rho: float = 0.5
    dc_lam_min: float = 0.1
    dc_lam_max: float = 4.0
    start: str = "sense"  # noise | sense (CCDF warm start from the SENSE image)
    start_sigma: float = 0.1  # starting sigma: a fraction of sigma_max for 'noise', absolute (prior units) for 'sense'
    eta: float = 1.0  # DDIM stochasticity of the re-noise step
    final: str = "dc"  # 'fast': the last estimate is the data-consistent x0 (dc) or the plain Tweedie denoise
    samples: int = 2  # posterior samples K in one batch -> their mean (and pixel-wise std). 2 x 22 levels: +0.31 dB
    # over 1 x 25 on the TUNE set of benchmarks/quality.py (-0.05 to +0.67 per slice; 2 x 25: +0.37) for 1.5x the
    # CPU time of a replay (one 256x256 8-coil slice, one thread: 12.1-14.9 s wall, 2 x 25 went to 15.6 once;
    # limit 15); samples=1 steps=25 halves the network time
    seed: int = 0  # base seed; per slice seeds derive from it and the slice counters
    batch: int = 0  # max images per network call; 0 = auto (CUDA: as many as fit; CPU: 2, measured fastest)
    time_budget_s: float = 0.0  # per series; 0 = unlimited. Checked before each slice / batch of slices: once
    # exceeded, every later slice of the series is its SENSE image (labelled fallback, WARNING)
    slice_deadline_s: float = 0.0  # per slice; 0 = none. Checked before every network call: a slice (a batch of
    # B slices: B x this) still sampling after this many seconds becomes its SENSE image (labelled, WARNING)
    window: str = "support"  # the prior sees: support = the box around the coil-map support (+ window_margin
    # pixels; outside it the image is zero, which the prior is told exactly); full = the whole image
    window_margin: int = 16  # pixels of background around the support in the network window
    # per-acceleration rows (AccelRule), first whose max_accel >= the mask's true acceleration wins; a field set
    # explicitly (XML property / --set) is removed from every row: explicit beats the table
    by_accel: list[AccelRule] = field(default_factory=_default_by_accel)
    scale_percentile: float = 99.9  # prior scale: this percentile of |SENSE image| maps to 1 (training max = 1)
    # sanity fallback of the learned methods (recon/sanity.py): the slice goes out as the labelled SENSE image
    # when the residual exceeds sanity_residual x the noise level (discrepancy principle; the level from the
    # prewhitening, else from the calibration lines) or more than sanity_outside of the energy lies outside the
    # coil-map support
    sanity: bool = True
    sanity_residual: float = 2.0
    sanity_floor: float = 0.01  # a residual below this fraction of the data's norm passes (noise-free data)
    sanity_outside: float = 0.01

    def validate(self) -> None:
        from .dc import DC_KINDS
        from .methods import method_names

        _choice("sampler.method", self.method, method_names())
        _choice("sampler.dc", self.dc, DC_KINDS)
        _choice("sampler.start", self.start, ("noise", "sense"))
        _choice("sampler.final", self.final, ("dc", "denoise"))
        _positive("sampler.steps", self.steps)
        _positive("sampler.samples", self.samples)
        _nonneg("sampler.cg_iters", self.cg_iters)
        _nonneg("sampler.dc_iters", self.dc_iters)
        _nonneg("sampler.lam", self.lam)
        _nonneg("sampler.time_budget_s", self.time_budget_s)
        _nonneg("sampler.slice_deadline_s", self.slice_deadline_s)
        _choice("sampler.window", self.window, ("support", "full"))
        _nonneg("sampler.window_margin", self.window_margin)
        _nonneg("sampler.batch", self.batch)
        _range("sampler.eta", self.eta, 0.0, 1.0)
        _range("sampler.scale_percentile", self.scale_percentile, 50.0, 100.0)
        _nonneg("sampler.dc_lam", self.dc_lam)
        _nonneg("sampler.dc_rho", self.dc_rho)
        _nonneg("sampler.dc_lam_min", self.dc_lam_min)
        _nonneg("sampler.dc_lam_max", self.dc_lam_max)
        _positive("sampler.sanity_residual", self.sanity_residual)
        _range("sampler.sanity_outside", self.sanity_outside, 0.0, 1.0)
        _range("sampler.sanity_floor", self.sanity_floor, 0.0, 1.0)
        for i, rule in enumerate(self.by_accel):
            if not rule.max_accel >= 1.0:
                raise ConfigError(f"sampler.by_accel[{i}].max_accel must be >= 1, got {rule.max_accel}")
            try:
                replace(self, by_accel=[], **rule.updates()).validate()
            except ConfigError as e:
                raise ConfigError(f"sampler.by_accel[{i}]: {e}") from None

    def for_acceleration(self, accel: float) -> "SamplerConfig":
        """This config with the first ``by_accel`` row whose max_accel >= ``accel`` applied (table emptied)."""
        for rule in self.by_accel:
            if accel <= rule.max_accel:
                return replace(self, by_accel=[], **rule.updates())
        return replace(self, by_accel=[])


@dataclass
class ModelConfig:
    """The learned prior: empty path = the shipped default model (model/weights/default.*)."""

    path: str = ""  # a .safetensors checkpoint (card beside it) or an exported .onnx file
    backend: str = "auto"  # auto | torch | onnx; auto = onnx on CPU when onnxruntime is installed (1.4x faster
    # per network call there, benchmarks/throughput.py), else torch; always torch on CUDA
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast on CUDA; CPU runs fp32 unless bf16 asked)
    compile: bool = False  # torch.compile the network (serve mode warms it once)

    def validate(self) -> None:
        _choice("model.backend", self.backend, ("auto", "torch", "onnx"))
        _choice("model.precision", self.precision, ("fp32", "bf16", "fp16"))


MAGNITUDE_KINDS = ("none", "float", "ushort")


@dataclass
class OutputConfig:
    """What every wing sends (gadget, replay, servers): complex images in series ``series``, std maps in
    ``series + 1``, magnitude images in ``series + 2``."""

    series: int = 1
    uncertainty: bool = False  # also send the pixel-wise std (needs sampler.samples > 1)
    crop_to_recon: bool = True  # crop phase/readout oversampling to the recon matrix
    complex: bool = True  # send the complex image (image_type 5)
    # also send magnitude images (image_type 1, with window centre/width): none | float (|x|, float32) |
    # ushort (uint16 counts, what scanner databases store)
    magnitude: str = "none"
    # ushort counts per image unit; 0 = per image as Gadgetron's AutoScaleGadget (99th percentile -> 2048);
    # counts are clamped to 0..4095 as FloatToUShortGadget does
    ushort_scale: float = 0.0

    def validate(self) -> None:
        _positive("output.series", self.series)
        _choice("output.magnitude", self.magnitude, MAGNITUDE_KINDS)
        _nonneg("output.ushort_scale", self.ushort_scale)
        if not self.complex and self.magnitude == "none":
            raise ConfigError("output.complex = false and output.magnitude = none: no image would be sent")


@dataclass
class ReconConfig:
    coils: CoilConfig = field(default_factory=CoilConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def validate(self) -> "ReconConfig":
        for f in fields(self):
            getattr(self, f.name).validate()
        if self.output.uncertainty and self.sampler.samples < 2:
            raise ConfigError("output.uncertainty needs sampler.samples >= 2")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------- loading


def dotted_names(cfg: ReconConfig | None = None) -> list[str]:
    """All valid dotted names, e.g. ``sampler.steps``."""
    cfg = cfg or ReconConfig()
    return [f"{s.name}.{f.name}" for s in fields(cfg) for f in fields(getattr(cfg, s.name))]


PRESET_KEYS = ("description", "inherit")  # top-level keys of a preset besides the config sections


def preset_path(name: str) -> Path:
    """A preset name (``fast``) from pipelines/presets, or a path to a YAML file."""
    p = Path(name)
    if p.suffix in (".yaml", ".yml") and p.exists():
        return p
    path = _presets_dir() / f"{name}.yaml"
    if not path.exists() or "/" in name or "\\" in name:
        raise ConfigError(f"unknown preset '{name}' (available: {', '.join(preset_names())})")
    return path


def _presets_dir() -> Path:
    return Path(str(resources.files("scoremri.pipelines") / "presets"))


def preset_names() -> list[str]:
    """The shipped presets, sorted."""
    return sorted(q.stem for q in _presets_dir().glob("*.yaml"))


def preset_descriptions() -> dict[str, str]:
    """{name: first sentence of its description} of the shipped presets (for --help texts)."""
    out = {}
    for name in preset_names():
        text = str(_read_preset(preset_path(name)).get("description", "")).strip()
        out[name] = text.split(". ")[0].rstrip(".")
    return out


def _read_preset(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"preset {path}: invalid YAML: {e}") from e
    except OSError as e:
        raise ConfigError(f"preset {path}: cannot read it: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"preset {path}: expected a mapping of sections")
    return data


def preset_sections(preset: str | Path, _seen: tuple[str, ...] = ()) -> dict[str, dict[str, Any]]:
    """The config sections of a preset with its ``inherit:`` chain resolved (the child's entries win)."""
    path = preset_path(str(preset))
    key = str(path.resolve())
    if key in _seen:
        raise ConfigError(f"preset {path}: 'inherit' forms a cycle")
    data = _read_preset(path)
    parent = data.get("inherit")
    merged: dict[str, dict[str, Any]] = preset_sections(str(parent), _seen + (key,)) if parent else {}
    for section, values in data.items():
        if section in PRESET_KEYS:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"preset {path}: section '{section}' must be a mapping")
        merged.setdefault(section, {}).update(values)
    return merged


def load_config(preset: str | Path | None = "fast", overrides: Mapping[str, Any] | None = None) -> ReconConfig:
    """Defaults <- YAML preset (with its ``inherit`` chain) <- dotted overrides; validated.

    Raises ConfigError naming the bad entry."""
    cfg = ReconConfig()
    if preset:
        for section, values in preset_sections(preset).items():
            for key, value in values.items():
                set_dotted(cfg, f"{section}.{key}", value)
    for key, value in (overrides or {}).items():
        set_dotted(cfg, key, value)
    _explicit_wins(cfg, overrides or {})
    return cfg.validate()


def _explicit_wins(cfg: ReconConfig, overrides: Mapping[str, Any]) -> None:
    """An explicit override (XML property, ``--set``) of a sampler field beats the per-acceleration table:
    that field is removed from every ``sampler.by_accel`` row."""
    keys = {k.split(".", 1)[1] for k in overrides if k.startswith("sampler.") and k != "sampler.by_accel"}
    for rule in cfg.sampler.by_accel:
        for k in keys & {f.name for f in fields(rule)} - {"max_accel"}:
            setattr(rule, k, None)


def parse_overrides(items: list[str] | None) -> dict[str, str]:
    """``["sampler.steps=50", ...]`` (CLI ``--set``) -> dict."""
    out: dict[str, str] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set expects NAME=VALUE, got '{item}'")
        k, v = item.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def set_dotted(cfg: ReconConfig, name: str, value: Any) -> None:
    """Set ``section.field`` with type coercion from strings (XML/CLI) or YAML values."""
    parts = name.split(".")
    if len(parts) != 2 or not hasattr(cfg, parts[0]) or not is_dataclass(getattr(cfg, parts[0])):
        raise ConfigError(f"unknown configuration name '{name}' (valid: {', '.join(dotted_names(cfg))})")
    section = getattr(cfg, parts[0])
    types = typing.get_type_hints(type(section))
    if parts[1] not in types:
        raise ConfigError(f"unknown configuration name '{name}' (valid: {', '.join(dotted_names(cfg))})")
    if types[parts[1]] == list[AccelRule]:
        setattr(section, parts[1], _accel_rules(name, value))
    else:
        setattr(section, parts[1], _coerce(name, value, types[parts[1]]))


def _accel_rules(name: str, value: Any) -> list[AccelRule]:
    """``by_accel`` from YAML (a list of mappings) or from a string holding the same list in YAML flow style
    (``--set 'sampler.by_accel=[{max_accel: 5, steps: 30}, {steps: 20}]'``; ``''``/``none`` = no table)."""
    if isinstance(value, str):
        if value.strip().lower() in ("", "none", "null"):
            return []
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError as e:
            raise ConfigError(f"{name}: cannot read '{value}' as a YAML list of rows: {e}") from None
    if value is None:
        return []
    if not isinstance(value, list):
        raise ConfigError(f"{name}: expected a list of rows like {{max_accel: 5, steps: 30}}, got {value!r}")
    types = typing.get_type_hints(AccelRule)
    keys = [f.name for f in fields(AccelRule)]
    rules = []
    for i, row in enumerate(value):
        if isinstance(row, AccelRule):
            rules.append(row)
            continue
        if not isinstance(row, dict):
            raise ConfigError(f"{name}[{i}]: expected a mapping like {{max_accel: 5, steps: 30}}, got {row!r}")
        rule = AccelRule()
        for k, v in row.items():
            if k not in keys:
                raise ConfigError(f"{name}[{i}]: unknown key '{k}' (valid: {', '.join(keys)})")
            if k == "max_accel" and str(v).strip().lower() in ("*", "inf", ".inf", "none", "null"):
                v = math.inf
            typ = [a for a in typing.get_args(types[k]) if a is not type(None)] or [types[k]]
            setattr(rule, k, None if v is None else _coerce(f"{name}[{i}].{k}", v, typ[0]))
        rules.append(rule)
    return rules


def _coerce(name: str, value: Any, typ: type) -> Any:
    try:
        if typ is bool:
            if isinstance(value, bool):
                return value
            s = str(value).strip().lower()
            if s in ("1", "true", "yes", "on"):
                return True
            if s in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if typ is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(str(value).strip()) if not isinstance(value, (int, float)) else int(value)
        if typ is float:
            return float(value)
        if typ is str:
            return "" if value is None else str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name}: cannot read '{value}' as {typ.__name__}") from None
    raise ConfigError(f"{name}: unsupported type {typ}")


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"{name} = '{value}' is not one of {', '.join(allowed)}")


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{name} must be > 0, got {value}")


def _nonneg(name: str, value: float) -> None:
    if not value >= 0:
        raise ConfigError(f"{name} must be >= 0, got {value}")


def _range(name: str, value: float, lo: float, hi: float) -> None:
    if not lo <= value <= hi:
        raise ConfigError(f"{name} must be in [{lo}, {hi}], got {value}")
