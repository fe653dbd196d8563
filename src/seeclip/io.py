"""Atomic writes: a reader sees the old file (or folder) or the new one, never half of one.

Every writer in seeclip goes through these helpers: a temporary sibling is written in full,
then renamed over the destination (``os.replace`` is atomic within one file system). A crash
leaves at most a hidden temporary sibling behind, never a truncated file under the real name,
and the temporary name carries its writer's host and process id: the next write to the same
destination removes the siblings whose writer is gone (killed, crashed), and only those.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import json
import os
import shutil
import socket
import tempfile
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def _host() -> str:
    return "".join(c if c.isalnum() or c == "-" else "_" for c in socket.gethostname())


def _owner() -> str:
    """This writer's tag in temporary names: ``<host>-<pid>``."""
    return f"{_host()}-{os.getpid()}"


def _writer_gone(name: str, marker: str) -> bool:
    """Whether the temporary sibling ``name`` (``...<marker><host>-<pid>-<random>...``) was
    left by a process of this host that no longer runs: its output can never be renamed into
    place. Another host's, a live process's, or a name without an owner: False (left alone)."""
    parts = name.split(marker, 1)[1].split("-") if marker in name else []
    if len(parts) < 3 or "-".join(parts[:-2]) != _host() or not parts[-2].isdigit():
        return False
    try:
        os.kill(int(parts[-2]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def _remove_stranded(parent: Path, prefix: str, marker: str) -> None:
    """Delete the temporary siblings under ``parent`` named ``prefix...`` whose writer is gone."""
    try:
        entries = list(parent.glob(f"{glob.escape(prefix)}*"))
    except OSError:
        return
    for entry in entries:
        if _writer_gone(entry.name, marker):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed to ``path``.

    The temporary name keeps ``path``'s suffix, so writers that pick a format from the suffix
    (``np.savez``, ``torch.save``, safetensors) write the right thing.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.stem}.tmp-"
    _remove_stranded(path.parent, prefix, ".tmp-")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{prefix}{_owner()}-", suffix=path.suffix)
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
    _remove_stranded(root.parent, f".{root.name}.tmp-", ".tmp-")
    _remove_stranded(root.parent, f".{root.name}.old-", ".old-")
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-{_owner()}-", dir=root.parent))
    try:
        yield tmp
        if root.exists():  # an older version: move it aside, put the new one in, then delete
            old = Path(tempfile.mkdtemp(prefix=f".{root.name}.old-{_owner()}-", dir=root.parent))
            os.replace(root, old / "x")
            os.replace(tmp, root)
            shutil.rmtree(old)
        else:
            os.replace(tmp, root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


class NoSpaceError(OSError):
    """Not enough free disk space for a write that is about to start (says how much)."""

    def __init__(self, path: Path, need: int, free: int) -> None:
        super().__init__(errno.ENOSPC, "no space left on device", str(path))
        self.need, self.free = need, free

    def __str__(self) -> str:
        return (
            f"not enough disk space under {Path(self.filename).parent}: this needs "
            f"{_mib(self.need)}, {_mib(self.free)} are free; free some space (or set "
            "SEECLIP_HOME / --cache-dir to a larger disk) and rerun: finished work is kept"
        )


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def ensure_space(path: str | Path, need: int, *, margin: int = 64 * 2**20) -> None:
    """Raise :class:`NoSpaceError` unless the file system of ``path`` (or of its nearest
    existing parent) has ``need`` bytes free plus ``margin``."""
    path = Path(path)
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < need + margin:
        raise NoSpaceError(path, need + margin, free)


def reserve(fd: int, size: int, path: str | Path) -> None:
    """Allocate ``size`` bytes of an open file now, so that a full disk is an error here and
    not a SIGBUS ("Bus error") in the middle of writing a memory map."""
    if size <= 0 or not hasattr(os, "posix_fallocate"):
        return
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise NoSpaceError(Path(path), size, shutil.disk_usage(Path(path).parent).free) from err
        if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # file systems without it
            raise


@contextmanager
def file_lock(path: str | Path, *, wait: bool = True) -> Iterator[bool]:
    """Hold an exclusive ``fcntl.flock`` on ``path`` (created if needed). Yields False, without
    waiting, when another process holds it and ``wait`` is False. The lock dies with the
    process, so a killed holder never blocks anyone."""
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


class UnreadableFileError(ValueError):
    """A weights, checkpoint or pool file that cannot be read safely (a one-line reason)."""


def load_tensors(path: str | Path) -> dict:
    """The tensors of a ``.safetensors`` file, or a one-line :class:`UnreadableFileError`."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        return load_file(str(path), device="cpu")
    except Exception as err:  # safetensors raises its own SafetensorError and OSError/ValueError
        raise UnreadableFileError(
            f"{path} is not a safetensors file ({_first_line(err)}); it may be truncated or "
            "another format: write it again (seeclip saves weights as .safetensors)"
        ) from err


def load_checkpoint(path: str | Path):
    """``torch.load`` with ``weights_only=True`` (no code in the file can run), or a one-line
    :class:`UnreadableFileError` saying why the file was refused."""
    import pickle

    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols before refusing
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # a damaged file, or objects other than tensors
        raise UnreadableFileError(
            f"{path} was refused: it is not a file of tensors only (a damaged checkpoint, or "
            "pickled objects, which seeclip never loads because they could run code); pass a "
            ".safetensors file or a state_dict saved with torch.save"
        ) from err
    except (RuntimeError, EOFError, ValueError, OSError) as err:
        raise UnreadableFileError(
            f"{path} is not a torch checkpoint ({_first_line(err)}); it may be truncated or "
            "another format: pass a .safetensors file or a state_dict saved with torch.save"
        ) from err


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0][:200] if text else type(err).__name__


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
