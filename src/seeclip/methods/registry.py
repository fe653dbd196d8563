"""Every method seeclip can run, by name: one line per method, nothing registered by import.

A method is a module of :mod:`seeclip.methods` with a ``build(env, *, <sections>)`` factory. The
factory names the run-config sections it needs as keyword-only arguments, typed with their
section classes (``prompt: PromptConfig``); :func:`build_method` passes exactly those, so no
method sees the whole run config. Adding a method is a new module and one line below
(docs/extending.md).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from seeclip.methods import cocoop, coop, coop_unknown, seeclip, zeroshot
from seeclip.methods.base import Method, MethodEnv
from seeclip.registry import Registry

MethodFactory = Callable[..., Method]
METHODS: Registry[MethodFactory] = Registry("method")

METHODS.add("zeroshot", zeroshot.build)
METHODS.add("coop", coop.build)
METHODS.add("coop_unknown", coop_unknown.build)
METHODS.add("cocoop", cocoop.build)
METHODS.add("seeclip", seeclip.build)


def sections_of(factory: MethodFactory) -> tuple[str, ...]:
    """The run-config sections a factory takes (its keyword-only parameters)."""
    params = inspect.signature(factory).parameters.values()
    return tuple(p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY)


def trains_on_pseudo_unknowns(name: str) -> bool:
    """Whether method ``name`` mixes ``train.pseudo_unknowns`` into its batches: its module
    says so with ``PSEUDO_UNKNOWNS = True`` (methods that learn an unknown prompt)."""
    return bool(getattr(inspect.getmodule(METHODS.get(name)), "PSEUDO_UNKNOWNS", False))


def has_semantic_queries(name: str) -> bool:
    """Whether method ``name`` learns semantic queries that ``sd_online`` can follow (its module
    says ``SEMANTIC_QUERIES = True``; the model then also answers ``has_semantic_queries``)."""
    return bool(getattr(inspect.getmodule(METHODS.get(name)), "SEMANTIC_QUERIES", False))


def build_method(name: str, env: MethodEnv, sections: Mapping[str, Any]) -> Method:
    """Build method ``name`` with the sections its factory asks for, taken from ``sections``."""
    factory = METHODS.get(name)
    missing = [s for s in sections_of(factory) if s not in sections]
    if missing:
        raise KeyError(f"method {name!r} needs config section(s) {', '.join(missing)}")
    return factory(env, **{s: sections[s] for s in sections_of(factory)})


__all__ = [
    "METHODS",
    "MethodFactory",
    "build_method",
    "has_semantic_queries",
    "sections_of",
    "trains_on_pseudo_unknowns",
]
