"""The registry of reconstruction methods: the ONE place a method (classical or learned sampler) is known.

A method is a function ``fn(problem) -> (image, std, report)`` decorated with
``@register_method("name", needs_prior=..., description=...)`` in a module of ``recon/classical.py`` or
``recon/samplers/`` (every module there is imported when the registry is first read). Everything that needs
the list of methods derives it from here: config validation (``sampler.method``), the reconstruction entry
point, and the gadget layer's decision to load a prior (:func:`needs_prior`). Adding a sampler = adding one
file to ``recon/samplers/`` (see ARCHITECTURE.md, "Adding a sampler").
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Protocol

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .api import Problem


class Method(Protocol):
    def __call__(self, problem: "Problem") -> "tuple[torch.Tensor, torch.Tensor | None, dict[str, Any]]":
        """-> image (ny, nx) complex64, std (ny, nx) float32 or None, report entries."""


@dataclass(frozen=True)
class MethodInfo:
    """A registered method: its name, function, whether it needs a learned prior, one-line description."""

    name: str
    fn: Method
    needs_prior: bool
    description: str


_REGISTRY: dict[str, MethodInfo] = {}
_LOADED = False


def register_method(name: str, *, needs_prior: bool, description: str = "") -> Callable[[Method], Method]:
    """Decorator: register ``fn`` as reconstruction method ``name`` (``sampler.method = name``)."""

    def deco(fn: Method) -> Method:
        if name in _REGISTRY and _REGISTRY[name].fn is not fn:
            raise ValueError(f"reconstruction method '{name}' is registered twice")
        doc = description or ((fn.__doc__ or "").strip().splitlines() or [""])[0]
        _REGISTRY[name] = MethodInfo(name, fn, needs_prior, doc)
        return fn

    return deco


def _load_all() -> None:
    """Import the modules that register methods: recon.classical and every module of recon.samplers."""
    global _LOADED
    if _LOADED:
        return
    _LOADED = True
    importlib.import_module(f"{__package__}.classical")
    samplers = importlib.import_module(f"{__package__}.samplers")
    for mod in pkgutil.iter_modules(samplers.__path__):
        importlib.import_module(f"{samplers.__name__}.{mod.name}")


def methods() -> dict[str, MethodInfo]:
    """All registered methods by name (imports the method modules once)."""
    _load_all()
    return dict(_REGISTRY)


def method_names() -> tuple[str, ...]:
    """Sorted names of every registered method."""
    return tuple(sorted(methods()))


def get_method(name: str) -> MethodInfo:
    """The method ``name``; ValueError listing the available ones when unknown."""
    table = methods()
    if name not in table:
        raise ValueError(f"unknown reconstruction method '{name}' (available: {', '.join(sorted(table))})")
    return table[name]


def needs_prior(name: str) -> bool:
    """True when method ``name`` runs a learned prior (the gadget layer loads one for it)."""
    return get_method(name).needs_prior


__all__ = ["Method", "MethodInfo", "register_method", "methods", "method_names", "get_method", "needs_prior"]
