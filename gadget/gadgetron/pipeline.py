"""Read a Gadgetron 4 stream XML (``pipelines/scoremri.xml``) into the properties replay mirrors.

Replay groups acquisitions exactly as the XML's AcquisitionAccumulateTrigger and BucketToBuffer are set up,
whitens when NoiseAdjust is in the chain and removes readout oversampling when RemoveROOversampling is, and
passes the ``<external>`` element's ``<configuration>`` properties (preset, device, dotted config names) on.

Both property spellings Gadgetron reads are accepted: ``<property name="x" value="y"/>`` and
``<property><name>x</name><value>y</value></property>``. Defaults are Gadgetron's own: empty trigger/sorting
dimension (trigger at the end of the scan, one bucket), no N/S dimension, split_slices false,
ignore_segment false.
"""
from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

log = logging.getLogger(__name__)

DIMENSIONS = ("", "kspace_encode_step_1", "kspace_encode_step_2", "average", "slice", "contrast", "phase",
              "repetition", "set", "segment", "user_0", "user_1", "user_2", "user_3", "user_4", "user_5",
              "user_6", "user_7")
BUFFER_DIMENSIONS = ("", "average", "contrast", "phase", "repetition", "set", "segment", "slice")


class PipelineError(ValueError):
    """The pipeline XML is missing or malformed; the message names the file and element."""


@dataclass
class PipelineSpec:
    """What replay mirrors of a Gadgetron stream."""

    trigger_dimension: str = ""  # AcquisitionAccumulateTrigger
    sorting_dimension: str = ""
    n_dimension: str = ""  # BucketToBuffer N_dimension
    s_dimension: str = ""  # BucketToBuffer S_dimension
    split_slices: bool = False
    ignore_segment: bool = False
    noise_adjust: bool = True  # NoiseAdjustGadget in the chain
    remove_ro_oversampling: bool = True  # RemoveROOversamplingGadget in the chain
    external_module: str = "scoremri.gadget.gadget"
    external_target: str = "score_recon"
    config: dict[str, str] = field(default_factory=dict)  # <external><configuration> properties
    gadgets: list[str] = field(default_factory=list)  # classnames in stream order
    source: str = "<defaults>"


def default_pipeline_path() -> Path:
    """The shipped ``scoremri.xml`` (package data of scoremri.pipelines)."""
    return Path(str(resources.files("scoremri.pipelines") / "scoremri.xml"))


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _child(el: ET.Element, name: str) -> ET.Element | None:
    for c in el:
        if _local(c.tag) == name:
            return c
    return None


def properties(el: ET.Element) -> dict[str, str]:
    """{name: value} of the ``<property>`` elements in ``el``, in both spellings Gadgetron reads:
    ``<property name="x" value="y"/>`` and ``<property><name>x</name><value>y</value></property>``.
    Used for the stream XML's gadgets here and for the ``<configuration>`` Gadgetron sends the gadget."""
    out: dict[str, str] = {}
    for p in el.iter():
        if _local(p.tag) != "property":
            continue
        name = p.get("name")
        value = p.get("value")
        if name is None:
            n = _child(p, "name")
            name = (n.text or "").strip() if n is not None else None
        if value is None:
            v = _child(p, "value")
            value = (v.text or "") if v is not None else ""
        if not name:
            raise PipelineError(f"a <property> in <{_local(el.tag)}> has no name")
        out[name.strip()] = value.strip()
    return out


def _bool(src: str, gadget: str, name: str, value: str) -> bool:
    v = value.strip().lower()
    if v in ("true", "1", "yes", "on"):
        return True
    if v in ("false", "0", "no", "off", ""):
        return False
    raise PipelineError(f"{src}: {gadget}.{name} = '{value}' is not a boolean")


def _dim(src: str, gadget: str, name: str, value: str, allowed: tuple[str, ...]) -> str:
    v = value.strip().lower()
    v = "" if v == "none" else v
    if v not in allowed:
        raise PipelineError(f"{src}: {gadget}.{name} = '{value}' is not one of {', '.join(a or 'none' for a in allowed)}")
    return v


def read_pipeline(xml_path: str | Path | None = None) -> PipelineSpec:
    """Parse a Gadgetron 4 stream XML into a PipelineSpec (None: the shipped ``pipelines/scoremri.xml``)."""
    path = Path(xml_path) if xml_path is not None else default_pipeline_path()
    src = str(path)
    if not path.exists():
        raise PipelineError(f"{src}: no such pipeline file")
    try:
        root = ET.parse(str(path)).getroot()
    except ET.ParseError as e:
        raise PipelineError(f"{src}: invalid XML: {e}") from e
    return parse_pipeline(root, src)


def parse_pipeline(root: ET.Element, src: str = "<xml>") -> PipelineSpec:
    """The PipelineSpec of a parsed ``<configuration>`` element."""
    if _local(root.tag) != "configuration":
        raise PipelineError(f"{src}: root element is <{_local(root.tag)}>, expected <configuration>")
    stream = _child(root, "stream")
    if stream is None:
        raise PipelineError(f"{src}: no <stream> element (a Gadgetron 4 chain is needed)")
    spec = PipelineSpec(source=src, noise_adjust=False, remove_ro_oversampling=False)
    found_external = False
    for el in stream.iter():
        tag = _local(el.tag)
        if tag == "gadget":
            cls_el = _child(el, "classname")
            cls = (cls_el.text or "").strip() if cls_el is not None else ""
            if not cls:
                raise PipelineError(f"{src}: a <gadget> without <classname>")
            spec.gadgets.append(cls)
            props = properties(el)
            if cls == "NoiseAdjustGadget":
                spec.noise_adjust = _bool(src, cls, "perform_noise_adjust", props.get("perform_noise_adjust", "true"))
            elif cls == "RemoveROOversamplingGadget":
                spec.remove_ro_oversampling = True
            elif cls == "AcquisitionAccumulateTriggerGadget":
                spec.trigger_dimension = _dim(src, cls, "trigger_dimension", props.get("trigger_dimension", ""), DIMENSIONS)
                spec.sorting_dimension = _dim(src, cls, "sorting_dimension", props.get("sorting_dimension", ""), DIMENSIONS)
            elif cls == "BucketToBufferGadget":
                spec.n_dimension = _dim(src, cls, "N_dimension", props.get("N_dimension", ""), BUFFER_DIMENSIONS)
                spec.s_dimension = _dim(src, cls, "S_dimension", props.get("S_dimension", ""), BUFFER_DIMENSIONS)
                spec.split_slices = _bool(src, cls, "split_slices", props.get("split_slices", "false"))
                spec.ignore_segment = _bool(src, cls, "ignore_segment", props.get("ignore_segment", "false"))
        elif tag == "external":
            if found_external:
                raise PipelineError(f"{src}: more than one <external> element")
            found_external = True
            spec.gadgets.append("<external>")
            ex = _child(el, "execute")
            if ex is None:
                ex = _child(el, "connect")
            if ex is not None and _local(ex.tag) == "execute":
                spec.external_module = ex.get("name", spec.external_module)
                spec.external_target = ex.get("target", spec.external_target)
            conf = _child(el, "configuration")
            if conf is not None:
                spec.config = properties(conf)
    if not found_external:
        raise PipelineError(f"{src}: no <external> element (the scoremri gadget) in the stream")
    log.debug("pipeline %s: %s", src, spec)
    return spec
