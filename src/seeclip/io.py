"""Atomic writes: a reader sees the old file (or folder) or the new one, never half of one.

Every writer in seeclip goes through these helpers: a temporary sibling is written in full,
then renamed over the destination (``os.replace`` is atomic within one file system). A crash
leaves at most a ``.tmp`` sibling behind, never a truncated file under the real name.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed to ``path``.

    The temporary name keeps ``path``'s suffix, so writers that pick a format from the suffix
    (``np.savez``, ``torch.save``, safetensors) write the right thing.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, obj: Any, *, indent: int | None = 1) -> None:
    """Write ``obj`` as JSON to ``path`` atomically."""
    write_text(path, json.dumps(obj, indent=indent) + "\n")


def write_with(path: str | Path, writer: Callable[[Path], None]) -> None:
    """Call ``writer(tmp)`` on a temporary sibling of ``path``, then rename it to ``path``."""
    with atomic_path(path) as tmp:
        writer(tmp)


@contextmanager
def atomic_dir(root: str | Path, *, marker: str | None = None) -> Iterator[Path]:
    """Yield an empty temporary sibling folder of ``root``; on success it replaces ``root``.

    Args:
        root: the folder to (re)place.
        marker: a file that a folder written by seeclip always holds (e.g. ``meta.json``);
            an existing ``root`` without it is someone else's and is never deleted.
    """
    root = Path(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    if marker and root.exists() and not (root / marker).exists():
        raise FileExistsError(f"{root} exists and was not written by seeclip; remove it first")
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        yield tmp
        if root.exists():  # an older version: move it aside, put the new one in, then delete
            old = Path(tempfile.mkdtemp(prefix=f".{root.name}.old-", dir=root.parent))
            os.replace(root, old / "x")
            os.replace(tmp, root)
            shutil.rmtree(old)
        else:
            os.replace(tmp, root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def tree_hash(root: str | Path, pattern: str = "**/*", *, exclude: tuple[str, ...] = ()) -> str:
    """SHA-256 over the relative paths and bytes of the files under ``root`` (sorted).

    Two trees with the same hash hold byte-identical files under the same names, so a table
    that names the hash names exactly the data it was computed on.
    """
    root = Path(root)
    digest = hashlib.sha256()
    for path in sorted(p for p in root.glob(pattern) if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if rel in exclude:
            continue
        digest.update(rel.encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()
