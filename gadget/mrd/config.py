"""What an MRD client's configuration messages mean: one scan's ReconConfig, device and buffering.

A client sends the configuration in up to two messages (python-ismrmrd-server's rules):

1. first, either CONFIG_FILE (id 1): a **name**, or CONFIG_TEXT (id 2): the configuration itself;
2. optionally, right after the header, a JSON text (id 5 TEXT as python-ismrmrd-server's client sends it, or
   id 2): ``{"parameters": {...}}`` (OpenRecon's UI parameters, the client's ``NAME.json`` / ``configAdditional``).

**A name** (id 1, or ``parameters.config`` / a non-empty ``parameters.customconfig``, which replace the first
message's configuration as in python-ismrmrd-server) is never a path: ``/``, ``\\`` and ``..`` are refused. It
resolves, in this order, to
- ``default`` / ``default.xml`` (what ``gadgetron_ismrmrd_client`` sends without ``-c``): the server's own
  configuration (``--preset`` and ``--set``);
- a file of the server's ``--config-dir``: ``NAME`` or ``NAME.yaml`` / ``.yml`` / ``.json`` / ``.xml``, read as
  a configuration text (below); a site's file of the same name as a preset wins over the preset;
- a shipped preset (``fast``, ``sense``, ...; ``NAME.yaml`` too).

**A configuration text** (id 2, or a ``--config-dir`` file) is recognised by its content:
- XML ``<configuration>`` with ``<property>`` elements (either spelling Gadgetron reads): ``preset``,
  ``device`` and dotted names, as the Gadgetron gadget reads them. A whole Gadgetron stream XML (a
  ``<stream>``, e.g. ``pipelines/scoremri.xml``) also sets the buffering (NoiseAdjust, RemoveROOversampling,
  AcquisitionAccumulateTrigger and BucketToBuffer properties) and takes the ``<external>`` element's
  properties; a ComplexToFloat gadget after it means magnitude output (``output.complex=false``,
  ``output.magnitude=ushort`` with FloatToUShort, else ``float``) unless the properties say otherwise.
- YAML or JSON mapping, read like a preset: ``inherit:`` (or ``preset:``) names a shipped preset to start
  from (default: the server's ``--preset``), sections (``sampler: {steps: 10}``) and/or dotted names
  (``sampler.steps: 10``), ``device``, ``description`` (ignored). A mapping with a ``parameters`` key is
  read as the JSON parameters below.

**JSON parameters** ``{"parameters": {...}}``: ``config`` / ``customconfig`` (a name, above), ``preset``,
``device``, dotted names (``"sampler.steps": 10``) and sections (``"sampler": {"steps": 10}``); other keys
(OpenRecon's own UI parameters) are ignored with a warning line.

Precedence, lowest first: the shipped pipeline XML's ``<external>`` properties (as replay), the server's
``--set``, the configuration (name or text), the JSON parameters. The result goes through the one loader
(:func:`scoremri.recon.config.load_config`), so names and values are validated with the same messages as
everywhere. What the client sends may name only shipped presets and may point ``model.path`` only at a file
name in ``--config-dir`` (the scanner side never chooses files of the server); the site's own
``--config-dir`` files may give any ``model.path`` (relative to the folder).
"""
from __future__ import annotations

import json
import logging
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

import yaml

from scoremri.recon.config import ConfigError, ReconConfig, load_config, preset_names

from ..gadgetron.external import RUNTIME_PROPERTIES, runtime_from_properties
from ..gadgetron.pipeline import PipelineError, PipelineSpec, parse_pipeline, properties, read_pipeline

log = logging.getLogger(__name__)

DEFAULT_NAMES = ("default", "default.xml")
CONFIG_DIR_SUFFIXES = ("", ".yaml", ".yml", ".json", ".xml")
NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+-]{0,127}$")
MAX_CONFIG_FILE_BYTES = 1 << 20
SECTIONS = tuple(f.name for f in fields(ReconConfig))
PRESET_META_KEYS = ("description",)
RUNTIME_KEYS = RUNTIME_PROPERTIES  # threads, slice_batch: runtime settings, as the Gadgetron gadget's


@dataclass
class Layer:
    """One source of configuration, already flattened: a preset to start from, a device, dotted overrides,
    a buffering spec (from a stream XML)."""

    source: str
    preset: str | None = None
    device: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    spec: PipelineSpec | None = None
    name: str | None = None  # JSON parameters: config / customconfig
    warnings: list[str] = field(default_factory=list)
    trusted: bool = False  # a --config-dir file (the site's): may point model.path anywhere
    runtime: dict[str, Any] = field(default_factory=dict)  # threads / slice_batch (never part of a preset)


@dataclass
class ScanConfig:
    """A scan's resolved configuration."""

    config: ReconConfig
    device: str
    spec: PipelineSpec
    source: str  # e.g. "preset fast", "config-dir file site.yaml", "config text (XML)"
    preset: str
    warnings: list[str] = field(default_factory=list)
    threads: int | None = None  # this scan's CPU threads (None: the server's)
    slice_batch: int | None = None  # this scan's slices per sampler run (None: the server's)


def check_name(name: str) -> str:
    """A config name as the wire carries it; ConfigError when it is empty or could be a path."""
    n = name.strip()
    if not n:
        raise ConfigError("empty config name")
    if "/" in n or "\\" in n or ".." in n or "\x00" in n or not NAME_RE.match(n):
        raise ConfigError(
            f"config name {n!r} refused: a config name is a preset or a file name in the server's config "
            "folder, never a path ('/', '\\' and '..' are not allowed)"
        )
    return n


def _check_preset(value: Any, source: str) -> str:
    v = str(value).strip()
    names = preset_names()
    if v.endswith(".yaml") and v[:-5] in names:
        v = v[:-5]
    if v not in names:
        raise ConfigError(f"{source}: preset {v!r} is not a shipped preset (available: {', '.join(names)})")
    return v


def _flatten(data: Mapping[str, Any], source: str, layer: Layer, *, lenient: bool) -> None:
    """Sections and dotted names of a mapping into ``layer.overrides``; ``preset``/``inherit``/``device`` into
    the layer. lenient: unknown keys become warnings (JSON parameters) instead of errors."""
    for key, value in data.items():
        k = str(key).strip()
        if k in ("inherit", "preset"):
            if value not in (None, ""):
                layer.preset = _check_preset(value, source)
        elif k == "device":
            if value not in (None, ""):
                layer.device = str(value).strip()
        elif k in RUNTIME_KEYS:
            if value not in (None, ""):
                layer.runtime[k] = str(value).strip()
        elif k in SECTIONS:
            if not isinstance(value, Mapping):
                raise ConfigError(f"{source}: section '{k}' must be a mapping of names to values, got {value!r}")
            for sub, v in value.items():
                layer.overrides[f"{k}.{sub}"] = v
        elif "." in k and k.split(".", 1)[0] in SECTIONS:
            layer.overrides[k] = value
        elif k in PRESET_META_KEYS:
            continue
        elif lenient:
            layer.warnings.append(f"{source}: parameter '{k}' is not a scoremri setting: ignored")
        else:
            raise ConfigError(
                f"{source}: unknown key '{k}' (a configuration holds inherit/preset, device, the sections "
                f"{', '.join(SECTIONS)} or dotted names such as sampler.steps)"
            )


def parse_parameters(params: Any, source: str = "JSON parameters") -> Layer:
    """``{"parameters": {...}}``'s inner mapping -> Layer (``config``/``customconfig`` -> ``name``)."""
    if not isinstance(params, Mapping):
        raise ConfigError(f"{source}: 'parameters' must be a JSON object, got {type(params).__name__}")
    layer = Layer(source=source)
    rest = dict(params)
    custom = rest.pop("customconfig", None)
    config = rest.pop("config", None)
    if custom not in (None, ""):
        layer.name = check_name(str(custom))
    elif config not in (None, ""):
        layer.name = check_name(str(config))
    _flatten(rest, source, layer, lenient=True)
    return layer


def parse_json_parameters(text: str, source: str = "JSON parameters") -> Layer:
    """The optional JSON text after the header -> Layer; ConfigError naming what is wrong."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{source}: not valid JSON: {e}") from None
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: expected a JSON object like {{\"parameters\": {{...}}}}")
    if "parameters" not in data:
        raise ConfigError(f"{source}: no 'parameters' object (keys: {', '.join(map(str, data)) or 'none'})")
    return parse_parameters(data["parameters"], source)


def parse_text(text: str, source: str = "config text") -> Layer:
    """A configuration text (XML, YAML or JSON; see the module docstring) -> Layer."""
    t = text.replace("\x00", "").strip()
    if not t:
        raise ConfigError(f"{source}: empty configuration text")
    if t.startswith("<"):
        return _parse_xml(t, source)
    try:
        data = json.loads(t) if t.startswith("{") else yaml.safe_load(t)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"{source}: neither XML nor a valid YAML/JSON mapping: {e}") from None
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: expected an XML <configuration> or a YAML/JSON mapping, got "
                          f"{type(data).__name__}")
    if "parameters" in data:
        return parse_parameters(data["parameters"], source)
    layer = Layer(source=source)
    _flatten(data, source, layer, lenient=False)
    return layer


def _parse_xml(text: str, source: str) -> Layer:
    try:
        root = ET.fromstring(text)
    except ET.ParseError as e:
        raise ConfigError(f"{source}: the XML cannot be parsed: {e}") from None
    tag = root.tag.rsplit("}", 1)[-1]
    if tag != "configuration":
        raise ConfigError(f"{source}: XML root element is <{tag}>, expected <configuration>")
    layer = Layer(source=source)
    try:
        if any(c.tag.rsplit("}", 1)[-1] == "stream" for c in root):
            spec = parse_pipeline(root, source)
            layer.spec = spec
            props = dict(spec.config)
            after = spec.gadgets[spec.gadgets.index("<external>") + 1:] if "<external>" in spec.gadgets else []
            if "ComplexToFloatGadget" in after:  # the chain turns our complex images into magnitude ones
                props.setdefault("output.complex", "false")
                props.setdefault("output.magnitude", "ushort" if "FloatToUShortGadget" in after else "float")
        else:
            props = properties(root)
    except PipelineError as e:
        raise ConfigError(str(e)) from None
    _flatten(props, source, layer, lenient=False)
    return layer


class ConfigResolver:
    """Turns a scan's configuration messages into a :class:`ScanConfig` (server-wide defaults fixed at start).

    default_preset / default_overrides / default_device: the server's ``--preset``, ``--set``, ``--device``.
    config_dir: the server's ``--config-dir`` (None: names resolve to presets only).
    pipeline: the stream XML whose buffering and ``<external>`` properties are the defaults (None: the shipped
    ``pipelines/scoremri.xml``, as replay).
    """

    def __init__(self, default_preset: str = "fast", default_overrides: Mapping[str, Any] | None = None,
                 default_device: str = "auto", config_dir: str | Path | None = None,
                 pipeline: str | Path | None = None) -> None:
        self.default_preset = default_preset
        self.default_overrides = dict(default_overrides or {})
        self.default_device = default_device
        self.config_dir = Path(config_dir).resolve() if config_dir is not None else None
        if self.config_dir is not None and not self.config_dir.is_dir():
            raise ConfigError(f"--config-dir {config_dir}: not a folder")
        self.spec = read_pipeline(pipeline)
        base = dict(self.spec.config)
        for k in ("preset", "device", *RUNTIME_KEYS):  # the server's flags decide these, not its default XML
            base.pop(k, None)
        self.base_overrides = base

    def names(self) -> list[str]:
        """Every name a client may send: config-dir files (without suffix) and shipped presets."""
        out = list(DEFAULT_NAMES[:1])
        if self.config_dir is not None:
            out += sorted({p.stem if p.suffix in CONFIG_DIR_SUFFIXES else p.name
                           for p in self.config_dir.iterdir() if p.is_file() and not p.name.startswith(".")})
        return out + [n for n in preset_names() if n not in out]

    def from_name(self, name: str) -> Layer:
        """A config name -> Layer (see the module docstring for the order)."""
        n = check_name(name)
        if n in DEFAULT_NAMES:
            return Layer(source=f"'{n}' (the server's configuration)")
        if self.config_dir is not None:
            for suffix in CONFIG_DIR_SUFFIXES:
                path = self.config_dir / f"{n}{suffix}"
                if path.is_file():
                    return self._read_file(path)
        stem = n[:-5] if n.endswith(".yaml") else n
        if stem in preset_names():
            return Layer(source=f"preset {stem}", preset=stem)
        raise ConfigError(f"unknown config '{n}' (available: {', '.join(self.names())})")

    def _read_file(self, path: Path) -> Layer:
        source = f"config-dir file {path.name}"
        try:
            if path.stat().st_size > MAX_CONFIG_FILE_BYTES:
                raise ConfigError(f"{source}: larger than {MAX_CONFIG_FILE_BYTES} bytes")
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"{source}: cannot read it: {e.strerror or e}") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{source}: not UTF-8 text: {e}") from None
        layer = parse_text(text, source)
        layer.trusted = True
        return layer

    def _model_path(self, value: Any, layer: Layer) -> str:
        """model.path of a scan: a --config-dir file's may be any path (relative = in the folder); one sent by
        the client only a file name in --config-dir."""
        v, source = str(value).strip(), layer.source
        if not v:
            return v
        if layer.trusted and self.config_dir is not None:
            return str((self.config_dir / v) if not Path(v).is_absolute() else Path(v))
        if self.config_dir is None:
            raise ConfigError(f"{source}: model.path may only name a file of the server's --config-dir, and the "
                              "server was started without one")
        if not NAME_RE.match(v) or ".." in v:
            raise ConfigError(f"{source}: model.path '{v}' refused: a scan may name a file of the server's "
                              "--config-dir, never a path")
        path = self.config_dir / v
        if not path.is_file():
            raise ConfigError(f"{source}: model.path '{v}' is not a file of the server's --config-dir")
        return str(path)

    def resolve(self, *, name: str | None = None, text: str | None = None,
                parameters: Layer | None = None) -> ScanConfig:
        """The scan's configuration from its first message (``name`` or ``text``) and the optional JSON
        parameters; ConfigError naming the problem."""
        if parameters is not None and parameters.name:
            first = self.from_name(parameters.name)  # python-ismrmrd-server: the JSON's config replaces it
        elif name is not None:
            first = self.from_name(name)
        elif text is not None:
            first = parse_text(text, "config text")
        else:
            first = Layer(source="the server's configuration")
        layers = [first] + ([parameters] if parameters is not None else [])
        preset, device, spec = self.default_preset, self.default_device, self.spec
        overrides: dict[str, Any] = {**self.base_overrides, **self.default_overrides}
        warnings: list[str] = []
        runtime: dict[str, Any] = {}
        for layer in layers:
            preset = layer.preset or preset
            device = layer.device or device
            runtime.update(layer.runtime)
            spec = layer.spec or spec
            for k, v in layer.overrides.items():
                overrides[k] = self._model_path(v, layer) if k == "model.path" else v
            warnings += layer.warnings
        if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
            raise ConfigError(f"device = '{device}' is not one of auto, cpu, cuda, cuda:N")
        config = load_config(preset, overrides)
        source = " + ".join(layer.source for layer in layers)
        threads, slice_batch = runtime_from_properties(runtime)
        return ScanConfig(config=config, device=device, spec=spec, source=source, preset=str(preset),
                          warnings=warnings, threads=threads, slice_batch=slice_batch)


__all__ = ["ConfigResolver", "Layer", "ScanConfig", "check_name", "parse_json_parameters", "parse_parameters",
           "parse_text"]
