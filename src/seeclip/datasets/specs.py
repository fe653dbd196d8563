"""OSDG benchmark specs: the spec dataclasses, their YAML loaders and the ``BENCHMARKS`` registry.

Each benchmark is a versioned data file ``specs/<name>.yaml`` that names its domains, its classes
(in protocol order: index = label) and every split **by class name**, never by an index into a
sorted folder listing; the packaged ones are read into ``BENCHMARKS`` on import.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any

import yaml

from seeclip.paths import data_folders
from seeclip.registry import Registry


def _empty() -> Mapping[str, Any]:
    return MappingProxyType({})


_SPEC_KEYS = (
    "name",
    "version",
    "description",
    "citation",
    "layout",
    "dirnames",
    "domains",
    "domain_aliases",
    "source_domains",
    "target_domains",
    "optional_domains",
    "ignore_extra_classes",
    "classes",
    "text",
    "aliases",
    "template",
    "protocols",
    "lookalikes",
)
_REQUIRED_KEYS = ("name", "layout", "domains", "classes", "protocols")
_PROTOCOL_KEYS = ("description", "known", "unknown", "source_classes", "target_known")
FOLDER_KEYS = ("description", "domains", "known", "unknown", "daml", "template", "text", "aliases")
_FOLDER_DAML_KEYS = ("source_classes", "target_known")


@dataclass(frozen=True)
class ProtocolSpec:
    """One split family of a benchmark, by class name.

    ``known`` is in label order (label = position). ``source_classes`` holds one class tuple per
    source domain (src1..srcN, in the order of ``BenchmarkSpec.sources_for``); ``None`` means
    every source sees all known classes. ``target_known=None`` means the target has all of them.
    """

    name: str
    known: tuple[str, ...]
    unknown: tuple[str, ...]
    source_classes: tuple[tuple[str, ...], ...] | None = None
    target_known: tuple[str, ...] | None = None
    description: str = ""


@dataclass(frozen=True)
class BenchmarkSpec:
    """A benchmark: domains, classes, protocols and where its images live (see layouts.py)."""

    name: str
    description: str
    citation: str
    domains: tuple[str, ...]
    classes: tuple[str, ...]  # protocol order: index = label in the benchmark's label space
    protocols: Mapping[str, ProtocolSpec]
    layout: str  # name of a loader in seeclip.datasets.layouts.LAYOUTS
    template: str  # prompt template with one "{}" for the class text
    # class name -> prompt text, where the default (see class_text) is poor
    text: Mapping[str, str] = field(default_factory=_empty)
    # domain or "*" (every domain) -> folder name -> class name
    aliases: Mapping[str, Mapping[str, str]] = field(default_factory=_empty)
    # other folder (or list file) name, or a relative path -> domain
    domain_aliases: Mapping[str, str] = field(default_factory=_empty)
    dirnames: tuple[str, ...] = ()  # dataset folders tried under the data root, then the root
    source_domains: tuple[str, ...] | None = None  # fixed sources; None = leave-one-domain-out
    target_domains: tuple[str, ...] | None = None  # None = every domain in turn
    optional_domains: tuple[str, ...] = ()  # prepare() does not require these
    ignore_extra_classes: tuple[str, ...] = ()  # domains whose unexpected class folders are skipped
    # hard unknown -> the class it differs from by one local detail (its look-alike)
    lookalikes: Mapping[str, str] = field(default_factory=_empty)
    version: int = 1

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def targets(self) -> tuple[str, ...]:
        """The domains that can be the target, in benchmark order."""
        if self.target_domains is not None:
            return self.target_domains
        return self.domains

    def sources_for(self, target: str) -> tuple[str, ...]:
        """src1..srcN for ``target``: fixed sources, or the other domains in benchmark order."""
        if self.source_domains is not None:
            return self.source_domains
        return tuple(d for d in self.domains if d != target)

    def class_text(self, name: str) -> str:
        """The prompt text of a class: ``text[name]`` or the name, "_" -> " ", lower-case."""
        if name not in self.classes:
            raise KeyError(f"{self.name} has no class {name!r}")
        return self.text.get(name, name.replace("_", " ").lower())

    def unknown_kinds(self, protocol: str) -> dict[str, tuple[str, ...]]:
        """``{"hard": ..., "easy": ...}`` unknown classes of a protocol; {} without look-alikes.

        An unknown is hard when its look-alike (``lookalikes``) is a known class of the protocol.
        """
        if not self.lookalikes:
            return {}
        p = self.protocols[protocol]
        hard = tuple(c for c in p.unknown if self.lookalikes.get(c) in p.known)
        return {"hard": hard, "easy": tuple(c for c in p.unknown if c not in hard)}

    def folder_aliases(self, domain: str) -> dict[str, str]:
        """Folder name -> class for ``domain`` (the "*" entries apply to every domain)."""
        return {**self.aliases.get("*", {}), **self.aliases.get(domain, {})}

    def expected_classes(self, domain: str) -> tuple[str, ...]:
        """The classes a domain's images must cover for every protocol to be runnable."""
        if self.source_domains is None:
            return self.classes
        need: set[str] = set()
        for p in self.protocols.values():
            if domain in self.source_domains:
                i = self.source_domains.index(domain)
                need.update(p.known if p.source_classes is None else p.source_classes[i])
            if domain in self.targets:
                need.update((p.known if p.target_known is None else p.target_known) + p.unknown)
        return tuple(c for c in self.classes if c in need)

    def fingerprint(self) -> str:
        """A short hash of everything that decides which images belong to which class."""
        data = {
            "name": self.name,
            "version": self.version,
            "layout": self.layout,
            "domains": self.domains,
            "classes": self.classes,
            "dirnames": self.dirnames,
            "aliases": {k: dict(v) for k, v in self.aliases.items()},
            "domain_aliases": dict(self.domain_aliases),
            "optional": self.optional_domains,
            "ignore_extra": self.ignore_extra_classes,
            "expected": {d: self.expected_classes(d) for d in self.domains},
        }
        return hashlib.sha1(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _validate(s: BenchmarkSpec) -> None:
    def fail(msg: str) -> None:
        raise ValueError(f"benchmark spec {s.name!r}: {msg}")

    def check_names(what: str, names: Sequence[str], allowed: Sequence[str]) -> None:
        if len(set(names)) != len(names):
            fail(
                f"{what} lists a name twice: {sorted(n for n in set(names) if names.count(n) > 1)}"
            )
        if bad := [n for n in names if n not in allowed]:
            fail(f"{what} names {bad}, which are not among {list(allowed)}")

    if not s.domains or not s.classes:
        fail("needs at least one domain and one class")
    check_names("domains", s.domains, s.domains)
    check_names("classes", s.classes, s.classes)
    if "{}" not in s.template:
        fail(f"template {s.template!r} needs a '{{}}' for the class text")
    check_names("text", list(s.text), s.classes)
    check_names("aliases", [k for k in s.aliases if k != "*"], s.domains)
    for mapping in s.aliases.values():
        check_names("alias targets", sorted(set(mapping.values())), s.classes)
    check_names("domain_aliases targets", sorted(set(s.domain_aliases.values())), s.domains)
    check_names("optional_domains", s.optional_domains, s.domains)
    check_names("lookalikes", list(s.lookalikes), s.classes)
    check_names("look-alike targets", sorted(set(s.lookalikes.values())), s.classes)
    if same := [c for c, other in s.lookalikes.items() if c == other]:
        fail(f"lookalikes maps {same} to themselves")
    check_names("ignore_extra_classes", s.ignore_extra_classes, s.domains)
    if (s.source_domains is None) != (s.target_domains is None):
        fail("give both source_domains and target_domains, or neither (leave-one-domain-out)")
    if s.source_domains is not None and s.target_domains is not None:
        check_names("source_domains", s.source_domains, s.domains)
        check_names("target_domains", s.target_domains, s.domains)
        if both := set(s.source_domains) & set(s.target_domains):
            fail(f"domains {sorted(both)} are both sources and targets")
    n_sources = len(s.source_domains) if s.source_domains is not None else len(s.domains) - 1
    if not s.protocols:
        fail("defines no protocol")
    for name, p in s.protocols.items():
        where = f"protocol {name!r}"
        check_names(f"{where} known", p.known, s.classes)
        check_names(f"{where} unknown", p.unknown, s.classes)
        if not p.known or not p.unknown:
            fail(f"{where} needs at least one known and one unknown class")
        if both := set(p.known) & set(p.unknown):
            fail(f"{where} has classes both known and unknown: {sorted(both)}")
        if p.target_known is not None:
            check_names(f"{where} target_known", p.target_known, p.known)
        if p.source_classes is not None:
            if len(p.source_classes) != n_sources:
                fail(f"{where} gives {len(p.source_classes)} source class sets, needs {n_sources}")
            for i, group in enumerate(p.source_classes, 1):
                check_names(f"{where} src{i} classes", group, p.known)
            if unseen := set(p.known) - {c for g in p.source_classes for c in g}:
                fail(f"{where}: known classes no source domain sees: {sorted(unseen)}")


def _check_keys(data: Mapping[str, Any], allowed: Sequence[str], where: str) -> None:
    if not isinstance(data, Mapping):
        raise ValueError(f"{where}: expected a mapping, got {type(data).__name__}")
    if bad := [k for k in data if k not in allowed]:
        raise ValueError(f"{where}: unknown key {bad[0]!r}; allowed keys: {', '.join(allowed)}")


def _names(value: Any, what: str = "names", where: str = "spec") -> tuple[str, ...]:
    """A YAML list of names; a lone string (``known: tshirt``) is refused, not read letter by
    letter."""
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise ValueError(
            f"{where}: `{what}:` must be a list, e.g. `{what}: [{value}]`, got {value!r}"
        )
    return tuple(str(v) for v in value)


def _folder_names(names: Sequence[str], what: str, where: str) -> None:
    """Names that become folder and run-folder names must be one plain path component: a ``/``
    or ``..`` would read outside the data root and write outside the runs folder."""
    for name in names:
        if not name.strip() or name in (".", "..") or any(c in name for c in "/\\\0"):
            raise ValueError(
                f"{where}: `{what}:` entry {name!r} is not a plain folder name (no '/', '\\', "
                f"'..' or empty names); name the folder itself, e.g. {Path(name).name or 'photo'!r}"
            )


def _protocol(name: str, data: Mapping[str, Any], sources: Sequence[str] | None, where: str):
    _check_keys(data, _PROTOCOL_KEYS, f"{where} protocol {name!r}")
    groups = data.get("source_classes")
    if isinstance(groups, Mapping):  # {source domain: classes}, only for fixed sources
        if sources is None or sorted(groups) != sorted(sources):
            raise ValueError(f"{where} protocol {name!r}: source_classes keys must be {sources}")
        groups = [groups[d] for d in sources]
    target_known = data.get("target_known", "all")
    return ProtocolSpec(
        name=name,
        known=_names(data["known"], "known", where),
        unknown=_names(data["unknown"], "unknown", where),
        source_classes=None
        if groups is None
        else tuple(_names(g, "source_classes", where) for g in groups),
        target_known=None if target_known == "all" else _names(target_known, "target_known", where),
        description=str(data.get("description", "")).strip(),
    )


def _str_map(m: Mapping[Any, Any] | None) -> Mapping[str, str]:
    return MappingProxyType({str(k): str(v) for k, v in (m or {}).items()})


def spec_from_dict(data: Mapping[str, Any], *, where: str = "spec") -> BenchmarkSpec:
    """Build a :class:`BenchmarkSpec` from parsed YAML; unknown keys are an error."""
    _check_keys(data, _SPEC_KEYS, where)
    if missing := [k for k in _REQUIRED_KEYS if k not in data]:
        raise ValueError(f"{where}: missing key(s) {', '.join(missing)}")
    opt = data.get
    sources = _names(opt("source_domains")) if opt("source_domains") is not None else None
    protocols = {str(k): _protocol(str(k), v, sources, where) for k, v in data["protocols"].items()}
    return BenchmarkSpec(
        name=str(data["name"]),
        description=" ".join(str(opt("description", "")).split()),
        citation=" ".join(str(opt("citation", "")).split()),
        domains=_names(data["domains"]),
        classes=_names(data["classes"]),
        protocols=MappingProxyType(protocols),
        layout=str(data["layout"]),
        template=str(opt("template", "a photo of a {}.")),
        text=_str_map(opt("text")),
        aliases=MappingProxyType({str(d): _str_map(m) for d, m in (opt("aliases") or {}).items()}),
        domain_aliases=_str_map(opt("domain_aliases")),
        dirnames=_names(opt("dirnames") or ()),
        source_domains=sources,
        target_domains=_names(opt("target_domains")) if opt("target_domains") else None,
        optional_domains=_names(opt("optional_domains") or ()),
        ignore_extra_classes=_names(opt("ignore_extra_classes") or ()),
        lookalikes=_str_map(opt("lookalikes")),
        version=int(opt("version", 1)),
    )


def load_spec(path: Path | str) -> BenchmarkSpec:
    """Read one benchmark spec YAML file."""
    path = Path(path)
    return spec_from_dict(yaml.safe_load(path.read_text()), where=str(path))


def load_folder_spec(yaml_path: Path | str, data_root: Path | str | None = None) -> BenchmarkSpec:
    """The ``folder`` benchmark: any ``<root>/<domain>/<class>/...`` tree plus a small YAML.

    The YAML names ``known`` and ``unknown`` classes (known in label order) and may give
    ``domains`` (default: the sorted folder names under ``data_root``), ``daml`` (with
    ``source_classes``: one list per source, and ``target_known``), ``template``, ``text`` and
    ``aliases`` (folder name -> class, or domain -> {folder: class}).
    """
    yaml_path = Path(yaml_path)
    where = str(yaml_path)
    data = yaml.safe_load(yaml_path.read_text()) or {}
    _check_keys(data, FOLDER_KEYS, where)
    for key in ("known", "unknown"):
        if not data.get(key):
            raise ValueError(f"{where}: missing `{key}:` (a list of class folder names)")
    if "domains" in data:
        domains = _names(data["domains"], "domains", where)
    elif data_root is not None and Path(data_root).is_dir():
        domains = tuple(data_folders(Path(data_root)))
    else:
        raise ValueError(f"{where}: list `domains:` in the YAML or pass --data-root DIR")
    known, unknown = (
        list(_names(data["known"], "known", where)),
        list(_names(data["unknown"], "unknown", where)),
    )
    for what, names in (("domains", domains), ("known", known), ("unknown", unknown)):
        _folder_names(names, what, where)
    protocols: dict[str, Any] = {"full": {"known": known, "unknown": unknown}}
    if "daml" in data:
        daml = data["daml"] or {}
        _check_keys(daml, _FOLDER_DAML_KEYS, f"{where} daml")
        if "source_classes" not in daml:
            raise ValueError(f"{where}: `daml:` needs `source_classes:` (one list per source)")
        protocols["daml"] = {"known": known, "unknown": unknown, **daml}
    aliases = data.get("aliases") or {}
    if any(not isinstance(v, Mapping) for v in aliases.values()):
        aliases = {"*": aliases}  # a flat {folder: class} mapping applies to every domain
    spec = {
        "name": "folder",
        "description": data.get("description", f"user folder benchmark ({yaml_path.name})"),
        "layout": "domain_folders",
        "domains": list(domains),
        "classes": known + unknown,
        "protocols": protocols,
        **{k: data[k] for k in ("template", "text") if k in data},
        "aliases": aliases,
    }
    return spec_from_dict(spec, where=where)


@dataclass(frozen=True)
class BenchmarkEntry:
    """A registered benchmark; ``spec`` is None for ``folder`` (built from the user's YAML)."""

    name: str
    description: str
    spec: BenchmarkSpec | None = None


PACKAGED_SPECS = (
    "pacs",
    "vlcs",
    "office_home",
    "mini_domainnet",
    "multi_dataset",
    "digits_dg",
    "digits",
    "glyphs",
)

BENCHMARKS: Registry[BenchmarkEntry] = Registry("benchmark")
for _name in PACKAGED_SPECS:
    _spec = spec_from_dict(
        yaml.safe_load((resources.files(__package__) / "specs" / f"{_name}.yaml").read_text()),
        where=f"specs/{_name}.yaml",
    )
    if _spec.name != _name:
        raise ValueError(f"specs/{_name}.yaml declares name {_spec.name!r}")
    BENCHMARKS.add(_name, BenchmarkEntry(_name, _spec.description, _spec))
BENCHMARKS.add(
    "folder",
    BenchmarkEntry(
        "folder",
        "any <root>/<domain>/<class>/ image tree; known/unknown classes from a YAML (--classes)",
    ),
)


def get_benchmark(
    name: str, *, classes_file: Path | str | None = None, data_root: Path | str | None = None
) -> BenchmarkSpec:
    """The spec of a registered benchmark (``folder`` needs ``classes_file``)."""
    entry = BENCHMARKS.get(name)
    if entry.spec is not None:
        if classes_file is not None:
            raise ValueError(f"--classes only applies to the `folder` benchmark, not {name!r}")
        return entry.spec
    if classes_file is None:
        raise ValueError(
            "the `folder` benchmark needs a YAML naming its classes: pass --classes FILE "
            "with `known: [...]` and `unknown: [...]`"
        )
    return load_folder_spec(classes_file, data_root)
