"""Loaders that turn a dataset tree on disk into samples, one loader per layout (``LAYOUTS``).

- ``domain_folders`` (PACS, VLCS, Office-Home, Digits-DG, digits, folder): DomainBed style
  ``<root>/<Dataset>/<domain>/<class>/<image>`` (suffixes: ``IMAGE_EXTENSIONS``); the data root
  may be the folder holding ``<Dataset>`` or ``<Dataset>`` itself (the spec's ``dirnames`` are
  tried, then the root). A domain may hold split subfolders instead of class folders: ``train``
  -> "train", ``val`` and ``crossval`` -> "val", ``test`` -> "test" (a ``full`` folder next to
  them repeats them and is skipped). Without split subfolders every image is "all". A lone
  ``images`` subfolder (Office-31) is descended into.
- ``mini_domainnet``: ``<root>/domainnet/splits_mini/<domain>_{train,test}.txt``, lines
  ``<domain>/<class>/<file> <label>``, images under ``<root>/domainnet/``. The class is the
  path's class folder; the file's labels are only checked for consistency (one label per class),
  because the protocol is defined by class name, not by the file's numbering.
- ``image_lists`` (Multi-Dataset): per domain a DAML-style list ``<domain>.txt`` or
  ``<domain>_list.txt`` (also under ``lists/``, also under a name from ``domain_aliases``) with
  lines ``<path relative to the dataset folder> <label>`` in the unified label space (class =
  ``classes[label]``), split "all"; a domain without a list may be a class-folder tree instead.

Class folders match a class name exactly, through the spec's ``aliases``, or ignoring case when
that is unambiguous. Every problem raises :class:`DataLayoutError` naming what is wrong and the
fix: wrong data root, missing domain, domain without images, missing or empty class folders,
unexpected class folders (an error unless an alias maps them, or the domain is listed in
``ignore_extra_classes``, e.g. 345-class DomainNet trees), listed images missing on disk.
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath

from seeclip.datasets.images import IMAGE_EXTENSIONS
from seeclip.datasets.specs import BENCHMARKS, FOLDER_KEYS, BenchmarkSpec
from seeclip.paths import data_folders
from seeclip.registry import Registry

SPLITS = ("train", "val", "test", "all")
_SPLIT_DIRS = {"train": "train", "val": "val", "crossval": "val", "test": "test"}
_LIST_NAMES = ("{}.txt", "{}_list.txt", "lists/{}.txt", "lists/{}_list.txt")


@dataclass(frozen=True)
class Sample:
    """One image: ``path`` is relative to the manifest root (posix); ``split`` is in SPLITS."""

    path: str
    class_name: str
    domain: str
    split: str


class DataLayoutError(ValueError):
    """A dataset tree that does not match its benchmark's layout; the message names the fix."""


LayoutLoader = Callable[[BenchmarkSpec, Path], list[Sample]]
LAYOUTS: Registry[LayoutLoader] = Registry("layout")


def load_samples(spec: BenchmarkSpec, data_root: Path | str) -> list[Sample]:
    """Scan ``data_root`` with the spec's layout loader; paths come back relative to it."""
    root = Path(data_root).expanduser().absolute()
    if not root.is_dir():
        raise DataLayoutError(
            f"data root {root} is not a folder: expected {expected_layout(spec, str(root))} "
            f"(pass --data-root pointing at {_hint(spec)})"
        )
    return LAYOUTS.get(spec.layout)(spec, root)


def expected_layout(spec: BenchmarkSpec, root: str = "<data-root>") -> str:
    """The on-disk layout a spec expects, in one line."""
    base = f"{root}/{spec.dirnames[0]}" if spec.dirnames else root
    if spec.layout == "mini_domainnet":
        return f"{base}/splits_mini/<domain>_{{train,test}}.txt and {base}/<domain>/<class>/*.jpg"
    if spec.layout == "image_lists":
        return f"{base}/<domain>.txt (lines '<path> <label>') or {base}/<domain>/<class>/*.jpg"
    return f"{base}/<domain>/<class>/*.jpg"


def describe_benchmark(name: str) -> str:
    """A few lines for ``seeclip list``: domains, classes, protocols and expected layout."""
    entry = BENCHMARKS.get(name)
    s = entry.spec
    if s is None:
        return (
            f"{name}: {entry.description}\n"
            "layout: <data-root>/<domain>/<class>/*.jpg|png; YAML keys: " + ", ".join(FOLDER_KEYS)
        )
    protos = ", ".join(
        f"{p.name} ({len(p.known)} known/{len(p.unknown)} unknown)" for p in s.protocols.values()
    )
    targets = "" if s.target_domains is None else f"; targets: {', '.join(s.targets)}"
    sources = "" if s.source_domains is None else f"; sources: {', '.join(s.source_domains)}"
    return (
        f"{name}: {s.description}\n"
        f"domains: {', '.join(s.domains)}{sources}{targets}\n"
        f"classes: {len(s.classes)}; protocols: {protos}\n"
        f"layout: {expected_layout(s)}"
    )


def _title(spec: BenchmarkSpec) -> str:
    return spec.dirnames[0].split("/")[0] if spec.dirnames else spec.name


def _hint(spec: BenchmarkSpec) -> str:
    if spec.dirnames:
        return f"the folder that contains {spec.dirnames[0].split('/')[0]}"
    return "the folder that holds the domain folders"


def _required(spec: BenchmarkSpec) -> list[str]:
    return [d for d in spec.domains if d not in spec.optional_domains]


def _find_base(spec: BenchmarkSpec, root: Path, probe: Callable[[Path], bool]) -> Path:
    for cand in [root / d for d in spec.dirnames] + [root]:
        if cand.is_dir() and probe(cand):
            return cand
    raise DataLayoutError(
        f"no {_title(spec)} data under {root}: expected {expected_layout(spec, str(root))} "
        f"with domains {', '.join(_required(spec))} (pass --data-root pointing at {_hint(spec)})"
    )


def _child_dirs(path: Path) -> dict[str, Path]:
    return data_folders(path)


def _domain_dir(spec: BenchmarkSpec, base: Path, domain: str) -> Path | None:
    names = [domain] + [a for a, d in spec.domain_aliases.items() if d == domain]
    children = _child_dirs(base)
    for name in names:
        if (base / name).is_dir() and ("/" in name or name in children):
            return base / name
    for name in names:  # ignoring case, when only one folder fits
        hits = [p for n, p in children.items() if n.lower() == name.lower()]
        if len(hits) == 1:
            return hits[0]
    return None


def _split_dirs(domain_dir: Path) -> list[tuple[str, Path]]:
    children = _child_dirs(domain_dir)
    if set(children) == {"images"}:
        return _split_dirs(children["images"])
    lowered = {n.lower(): p for n, p in children.items()}
    if children and set(lowered) <= {*_SPLIT_DIRS, "full"}:
        parts = [(_SPLIT_DIRS[n], p) for n, p in sorted(lowered.items()) if n != "full"]
        return parts or [("all", lowered["full"])]
    return [("all", domain_dir)]


def _images(folder: Path) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in filenames:
            if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS:
                out.append(Path(dirpath) / f)
    return sorted(out)


def _match_folders(
    folders: Sequence[str], classes: Sequence[str], aliases: Mapping[str, str]
) -> tuple[dict[str, str], list[str]]:
    """Folder -> class (exact, alias, or unambiguous case-insensitive match) and the rest."""
    folder_case = Counter(f.lower() for f in folders)
    by_lower: dict[str, set[str]] = defaultdict(set)
    for c in classes:
        by_lower[c.lower()].add(c)
    for a, c in aliases.items():
        by_lower[a.lower()].add(c)
    matched, unmatched = {}, []
    for f in folders:
        if f in classes:
            matched[f] = f
        elif f in aliases:
            matched[f] = aliases[f]
        elif folder_case[f.lower()] == 1 and len(by_lower.get(f.lower(), ())) == 1:
            matched[f] = next(iter(by_lower[f.lower()]))
        else:
            unmatched.append(f)
    return matched, unmatched


@dataclass
class _Problems:
    empty: list[str] = field(default_factory=list)
    missing: dict[str, list[str]] = field(default_factory=dict)
    extra: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    duplicate: list[str] = field(default_factory=list)
    not_on_disk: list[str] = field(default_factory=list)

    def raise_if_any(self, spec: BenchmarkSpec, base: Path) -> None:
        title, user = _title(spec), spec.name == "folder"
        if self.empty:
            raise DataLayoutError(
                f"{title}: no images in domain(s) {'; '.join(self.empty)}: expected "
                f"<domain>/<class>/*.jpg|png under {base} (re-extract the dataset there)"
            )
        parts = []
        if self.missing:
            listing = "; ".join(f"{d}: {', '.join(cs)}" for d, cs in self.missing.items())
            fix = (
                "add the folders or fix the class lists in your YAML"
                if user
                else f"rename the folders to the class names in seeclip's specs/{spec.name}.yaml, "
                "or re-download the dataset"
            )
            parts.append(
                f"missing or empty class folders under {base}: {listing} "
                f"(each domain needs a folder of images per class; {fix})"
            )
        if extra := {d: list(dict.fromkeys(v)) for d, v in self.extra.items() if v}:
            listing = "; ".join(f"{d}: {', '.join(fs)}" for d, fs in extra.items())
            names = ", ".join(spec.classes[:12]) + (", ..." if len(spec.classes) > 12 else "")
            fix = (
                "list them as known/unknown or map them under `aliases` in your YAML"
                if user
                else "rename them to the expected class names or move them out of the dataset"
            )
            parts.append(
                f"unexpected class folders (or listed classes) under {base}: {listing} "
                f"(expected class names: {names}; {fix})"
            )
        if parts:
            raise DataLayoutError(f"{title}: " + "; and ".join(parts))
        if self.duplicate:
            raise DataLayoutError(
                f"{title}: several folders map to one class: {'; '.join(self.duplicate)} "
                "(keep one folder per class)"
            )
        if self.not_on_disk:
            shown = ", ".join(self.not_on_disk[:10])
            raise DataLayoutError(
                f"{title}: {len(self.not_on_disk)} listed image(s) are not on disk under {base} "
                f"(first: {shown}); extract the images there or fix the lists"
            )


def _scan_domain(
    spec: BenchmarkSpec, root: Path, domain: str, domain_dir: Path, problems: _Problems
) -> list[Sample]:
    expected = set(spec.expected_classes(domain))
    aliases = spec.folder_aliases(domain)
    ignore = domain in spec.ignore_extra_classes
    found: set[str] = set()
    out: list[Sample] = []
    for split, split_dir in _split_dirs(domain_dir):
        folders = _child_dirs(split_dir)
        prefix = "" if split_dir == domain_dir else f"{split_dir.name}/"
        matched, unmatched = _match_folders(list(folders), spec.classes, aliases)
        seen: dict[str, str] = {}
        for folder, cls in matched.items():
            if cls not in expected:
                unmatched.append(folder)
                continue
            if cls in seen:
                problems.duplicate.append(
                    f"{domain}: {prefix}{seen[cls]}, {prefix}{folder} -> {cls}"
                )
                continue
            seen[cls] = folder
            images = _images(folders[folder])
            found.update([cls] if images else [])
            out.extend(Sample(p.relative_to(root).as_posix(), cls, domain, split) for p in images)
        if not ignore:
            problems.extra[domain].extend(prefix + f for f in unmatched)
    if not out:
        problems.empty.append(f"{domain} ({domain_dir})")
    elif missing := [c for c in spec.classes if c in expected and c not in found]:
        problems.missing[domain] = missing
    return out


def _raise_missing_domains(spec: BenchmarkSpec, base: Path, missing: list[str]) -> None:
    if missing:
        raise DataLayoutError(
            f"{_title(spec)}: missing domain(s) under {base}: {', '.join(missing)} (expected "
            f"{expected_layout(replace(spec, dirnames=()), str(base))} for each of "
            f"{', '.join(_required(spec))}; add the missing domain folders)"
        )


@LAYOUTS.register("domain_folders")
def load_domain_folders(spec: BenchmarkSpec, root: Path) -> list[Sample]:
    """DomainBed-style class folders per domain, optionally with train/val/test subfolders."""
    base = _find_base(spec, root, lambda b: any(_domain_dir(spec, b, d) for d in spec.domains))
    dirs = {d: _domain_dir(spec, base, d) for d in spec.domains}
    _raise_missing_domains(spec, base, [d for d in _required(spec) if dirs[d] is None])
    problems, samples = _Problems(), []
    for domain, domain_dir in dirs.items():
        if domain_dir is not None:
            samples += _scan_domain(spec, root, domain, domain_dir, problems)
    problems.raise_if_any(spec, base)
    return samples


def _read_list(path: Path) -> Iterator[tuple[int, str, int]]:
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise DataLayoutError(
                f"{path}:{lineno}: expected '<relative/path> <label>', got {line!r} "
                "(fix or re-download the list file)"
            )
        yield lineno, parts[0], int(parts[1])


def _check_found(spec: BenchmarkSpec, domain: str, samples: list[Sample], where: str, p: _Problems):
    found = {s.class_name for s in samples}
    if not samples:
        p.empty.append(f"{domain} ({where})")
    elif missing := [c for c in spec.expected_classes(domain) if c not in found]:
        p.missing[domain] = missing


@LAYOUTS.register("mini_domainnet")
def load_mini_domainnet(spec: BenchmarkSpec, root: Path) -> list[Sample]:
    """miniDomainNet's ``splits_mini`` files; class = the listed path's class folder."""
    base = _find_base(spec, root, lambda b: (b / "splits_mini").is_dir())
    split_dir = base / "splits_mini"
    files = {(d, sp): split_dir / f"{d}_{sp}.txt" for d in spec.domains for sp in ("train", "test")}
    if absent := [
        f.name for (d, _), f in files.items() if d in _required(spec) and not f.is_file()
    ]:
        raise DataLayoutError(
            f"{_title(spec)}: missing split file(s) in {split_dir}: {', '.join(absent)} "
            f"(copy miniDomainNet's splits_mini/<domain>_{{train,test}}.txt there, from Dassl)"
        )
    problems, samples = _Problems(), []
    label_of: dict[str, int] = {}
    name_of: dict[int, str] = {}
    for domain in spec.domains:
        own: list[Sample] = []
        for sp in ("train", "test"):
            if not files[domain, sp].is_file():
                continue
            for lineno, rel, label in _read_list(files[domain, sp]):
                parts = PurePosixPath(rel).parts
                cls = parts[-2] if len(parts) >= 2 else rel
                if cls not in spec.classes:
                    problems.extra[domain].append(cls)
                    continue
                if (
                    label_of.setdefault(cls, label) != label
                    or name_of.setdefault(label, cls) != cls
                ):
                    raise DataLayoutError(
                        f"{files[domain, sp]}:{lineno}: label {label} for class {cls!r}, but the "
                        f"split files also pair {cls!r} with {label_of[cls]} or {label} with "
                        f"{name_of[label]!r} (use the original, unmodified splits_mini files)"
                    )
                path = base / rel
                if not path.is_file():
                    problems.not_on_disk.append(rel)
                    continue
                own.append(Sample(path.relative_to(root).as_posix(), cls, domain, sp))
        if files[domain, "train"].is_file() or files[domain, "test"].is_file():
            _check_found(spec, domain, own, f"{split_dir}/{domain}_*.txt", problems)
        samples += own
    problems.raise_if_any(spec, base)
    return samples


def _list_file(spec: BenchmarkSpec, base: Path, domain: str) -> Path | None:
    names = [domain] + [a for a, d in spec.domain_aliases.items() if d == domain and "/" not in a]
    for name in names:
        for pattern in _LIST_NAMES:
            if (base / pattern.format(name)).is_file():
                return base / pattern.format(name)
    return None


def _read_domain_list(
    spec: BenchmarkSpec, root: Path, base: Path, domain: str, path: Path, problems: _Problems
) -> list[Sample]:
    expected = set(spec.expected_classes(domain))
    out = []
    for lineno, rel, label in _read_list(path):
        if not 0 <= label < len(spec.classes):
            raise DataLayoutError(
                f"{path}:{lineno}: label {label} is outside 0..{len(spec.classes) - 1} "
                f"(the lists must use the unified {len(spec.classes)}-class labels of {spec.name})"
            )
        cls = spec.classes[label]
        if cls not in expected:
            if domain not in spec.ignore_extra_classes:
                problems.extra[domain].append(f"{cls} (label {label})")
            continue
        image = Path(os.path.normpath(base / rel))  # absolute paths in the list stay absolute
        try:
            rel_to_root = image.relative_to(root).as_posix()
        except ValueError:
            raise DataLayoutError(
                f"{path}:{lineno}: {image} is outside the data root {root} "
                f"(list paths must be relative to {base})"
            ) from None
        if not image.is_file():
            problems.not_on_disk.append(rel)
            continue
        out.append(Sample(rel_to_root, cls, domain, "all"))
    _check_found(spec, domain, out, str(path), problems)
    return out


@LAYOUTS.register("image_lists")
def load_image_lists(spec: BenchmarkSpec, root: Path) -> list[Sample]:
    """DAML-style per-domain image lists, or class folders for a domain without a list."""

    def locate(base: Path, domain: str) -> Path | None:
        return _list_file(spec, base, domain) or _domain_dir(spec, base, domain)

    base = _find_base(spec, root, lambda b: any(locate(b, d) for d in spec.domains))
    where = {d: locate(base, d) for d in spec.domains}
    _raise_missing_domains(spec, base, [d for d in _required(spec) if where[d] is None])
    problems, samples = _Problems(), []
    for domain, path in where.items():
        if path is not None and path.is_file():
            samples += _read_domain_list(spec, root, base, domain, path, problems)
        elif path is not None:
            samples += _scan_domain(spec, root, domain, path, problems)
    problems.raise_if_any(spec, base)
    return samples
