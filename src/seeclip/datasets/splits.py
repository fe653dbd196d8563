"""OSDG splits: which domains and classes one task trains and tests on (:func:`make_split`).

Leave-one-domain-out is the default; a spec with fixed ``source_domains`` (Multi-Dataset) tests
on each of its ``target_domains`` instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from seeclip.datasets.specs import BenchmarkSpec


@dataclass(frozen=True)
class OSDGSplit:
    """One OSDG task: which domains and classes are seen in training and at test time."""

    benchmark: str
    protocol: str
    target: str
    source_domains: tuple[str, ...]
    known: tuple[str, ...]  # label order: label = index
    unknown: tuple[str, ...]
    source_classes: Mapping[str, tuple[str, ...]]  # source domain -> its known classes
    target_known: tuple[str, ...]
    target_unknown: tuple[str, ...]
    _index: Mapping[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(
            self, "_index", MappingProxyType({c: i for i, c in enumerate(self.known)})
        )

    @property
    def num_known(self) -> int:
        return len(self.known)

    def label(self, class_name: str) -> int:
        """Index of a known class in ``known``; -1 for an unknown class."""
        if class_name in self._index:
            return self._index[class_name]
        if class_name in self.unknown:
            return -1
        raise KeyError(f"class {class_name!r} is not part of split {self.protocol}/{self.target}")


def make_split(spec: BenchmarkSpec, protocol: str, target: str) -> OSDGSplit:
    """The OSDG split of ``spec`` for ``protocol`` with ``target`` as the unseen domain."""
    if protocol not in spec.protocols:
        raise ValueError(
            f"benchmark {spec.name!r} has no protocol {protocol!r}; "
            f"available protocols: {', '.join(spec.protocols)}"
        )
    if target not in spec.targets:
        raise ValueError(
            f"{target!r} is not a target domain of {spec.name!r}; "
            f"valid targets: {', '.join(spec.targets)}"
        )
    p = spec.protocols[protocol]
    sources = spec.sources_for(target)
    per_source = p.source_classes or tuple(p.known for _ in sources)
    return OSDGSplit(
        benchmark=spec.name,
        protocol=protocol,
        target=target,
        source_domains=sources,
        known=p.known,
        unknown=p.unknown,
        source_classes=MappingProxyType(dict(zip(sources, per_source, strict=True))),
        target_known=p.known if p.target_known is None else p.target_known,
        target_unknown=p.unknown,
    )
