"""Feature cache: the frozen image encoder runs once per image, ever.

An entry is a folder ``cache_dir/name`` holding ``global.npy`` [N, d], ``tokens.npy`` [N, T, d]
(both float16, read back as memmaps) and ``meta.json``. The key hashes the backbone's weights,
its preprocessing and every file's (relative path, size, mtime_ns); a changed key rebuilds the
entry. Builds go to a temporary sibling folder that is renamed into place only when complete.

Size and mtime miss a file replaced by another of the same size with its mtime restored
(``cp -p``, ``rsync -t``, some archive tools). Every entry also stores a digest of the files'
*contents*; with ``verify=True`` (``--verify-cache``, or ``SEECLIP_VERIFY_CACHE=1``) it is
recomputed on use and a mismatch rebuilds the entry. The default trusts size and mtime, because
reading every image again on each run costs as much I/O as encoding it.

Two processes that need one entry do not both encode it: the builder holds a lock
(``<entry>.lock``) and the other waits for it, then reads the finished entry. The space for the
two arrays is checked and reserved on disk before encoding starts, so a full disk is a one-line
error with the size needed, never a "Bus error" from a memory map, and the half-built entry is
removed.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader
from tqdm import tqdm

from seeclip import distributed
from seeclip.datasets.images import LOADER, ImageFiles
from seeclip.io import ensure_space, file_lock, reserve

__all__ = ["CachedFeatures", "cache_key", "encode_cached"]

log = logging.getLogger(__name__)

_DTYPE = np.float16
_FORMAT = 1  # bump when the entry layout changes


@dataclass(frozen=True)
class CachedFeatures:
    """Cached image features, row i belonging to ``paths[i]``.

    Attributes:
        global_: L2-normalised global features [N, d] (float16 memmap).
        tokens: spatial tokens in the joint space [N, T, d] (float16 memmap).
        paths: relative image paths, in row order.
        key: the cache key the entry was built for.
    """

    global_: np.ndarray
    tokens: np.ndarray
    paths: tuple[str, ...]
    key: str
    _rows: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_rows", {p: i for i, p in enumerate(self.paths)})

    def __len__(self) -> int:
        return len(self.paths)

    def index_of(self, paths: Sequence[str]) -> np.ndarray:
        """Row indices (int64) of ``paths``; a path not in the cache is a KeyError."""
        try:
            return np.array([self._rows[p] for p in paths], dtype=np.int64)
        except KeyError as err:
            raise KeyError(f"{err.args[0]!r} is not in this feature cache") from None

    def torch(self, indices: Sequence[int] | np.ndarray | Tensor) -> tuple[Tensor, Tensor]:
        """(global [k, d], tokens [k, T, d]) as float32 tensors for rows ``indices``."""
        idx = np.asarray(indices.cpu() if isinstance(indices, Tensor) else indices, dtype=np.int64)
        glob = torch.from_numpy(np.ascontiguousarray(self.global_[idx])).float()
        toks = torch.from_numpy(np.ascontiguousarray(self.tokens[idx])).float()
        return glob, toks


# --------------------------------------------------------------------------- key
def _preprocess_repr(transform: object) -> str:
    # Function reprs carry memory addresses that differ between processes.
    return re.sub(r" at 0x[0-9a-fA-F]+", "", repr(transform))


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _key_parts(backbone, root: Path, rel_paths: Sequence[str]) -> dict[str, str]:
    files = hashlib.sha256()
    for rel in rel_paths:
        try:
            st = (Path(root) / rel).stat()
        except FileNotFoundError:
            raise FileNotFoundError(
                f"image {Path(root) / rel} is gone since `seeclip prepare` listed it; rerun "
                "`seeclip prepare` for this data root to list the images that are there now"
            ) from None
        files.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return {
        "weights": backbone.fingerprint,
        "preprocess": _sha(f"{LOADER}\n{_preprocess_repr(backbone.preprocess)}"),
        "data": files.hexdigest(),
    }


def _key_from_parts(parts: dict[str, str]) -> str:
    return _sha(json.dumps({"format": _FORMAT, **parts}, sort_keys=True))


def content_digest(root: Path, rel_paths: Sequence[str]) -> str:
    """sha256 over each file's relative path and the sha256 of its bytes, in list order."""
    digest = hashlib.sha256()
    for rel in rel_paths:
        digest.update(f"{rel}\0".encode())
        digest.update(hashlib.sha256((Path(root) / rel).read_bytes()).digest())
    return digest.hexdigest()


VERIFY_ENV = "SEECLIP_VERIFY_CACHE"  # what ``--verify-cache`` sets (worker processes inherit it)


def verify_by_default() -> bool:
    """``SEECLIP_VERIFY_CACHE=1`` turns content checks on."""
    return os.environ.get(VERIFY_ENV, "").lower() in ("1", "true", "yes")


def cache_key(backbone, root: Path, rel_paths: Sequence[str]) -> str:
    """sha256 over the backbone fingerprint, its preprocessing and each file's
    (relative path, size, mtime_ns) under ``root``."""
    return _key_from_parts(_key_parts(backbone, root, rel_paths))


# ------------------------------------------------------------------------- entry
# what every finished build writes into meta.json; one missing means an entry to rebuild
_META_FIELDS = frozenset({"key", "parts", "paths", "content", "global_shape", "tokens_shape"})


def _read_meta(entry: Path) -> dict | None:
    """``entry/meta.json`` when it is readable and has every field a finished build writes."""
    try:
        meta = json.loads((entry / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or not _META_FIELDS <= meta.keys():
        return None
    parts, paths = meta["parts"], meta["paths"]
    if not isinstance(parts, dict) or not isinstance(paths, list):
        return None
    if not all(isinstance(meta[k], list) for k in ("global_shape", "tokens_shape")):
        return None
    return meta


def _load(entry: Path, key: str, content: str | None = None) -> CachedFeatures | None:
    """The entry at ``entry`` if it is complete and was built for ``key`` (and, when
    ``content`` is given, from files with that content digest), else None. A missing,
    unreadable or partial ``meta.json``, or arrays of other shapes than it records, are None."""
    meta = _read_meta(entry)
    if meta is None or meta["key"] != key:
        return None
    if content is not None and meta["content"] != content:
        log.warning(
            "feature cache %s: image contents changed with the same size and "
            "mtime (--verify-cache); rebuilding",
            entry,
        )
        return None
    try:
        glob = np.load(entry / "global.npy", mmap_mode="r")
        toks = np.load(entry / "tokens.npy", mmap_mode="r")
    except (OSError, ValueError):
        return None
    if list(glob.shape) != meta["global_shape"] or list(toks.shape) != meta["tokens_shape"]:
        return None
    if len(meta["paths"]) != glob.shape[0]:
        return None
    return CachedFeatures(glob, toks, tuple(meta["paths"]), key)


def _stale_reason(entry: Path, parts: dict[str, str]) -> str | None:
    """Why an existing entry cannot be reused (None when there is no entry at all)."""
    if not entry.exists():
        return None
    meta = _read_meta(entry)
    if meta is None:
        return "entry incomplete or unreadable"
    old = meta["parts"]
    changed = [name for name in ("weights", "preprocess", "data") if old.get(name) != parts[name]]
    if changed:
        return " and ".join(f"{name} changed" for name in changed)
    if meta["key"] != _key_from_parts(parts):
        return "key changed"  # the entry layout (_FORMAT)
    return "arrays missing or not as meta.json records them"


def _remove_dead_builds(entry: Path) -> None:
    """Deletes the ``<entry>.tmp-<pid>`` (an unfinished build) and ``<entry>.old-<pid>`` (an
    entry being replaced) folders left by processes that are gone."""
    leftovers = [
        *entry.parent.glob(f"{entry.name}.tmp-*"),
        *entry.parent.glob(f"{entry.name}.old-*"),
    ]
    for tmp in leftovers:
        pid = tmp.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(tmp, ignore_errors=True)
        except PermissionError:
            pass  # alive, owned by someone else


def encode_cached(
    backbone,
    root: Path,
    rel_paths: Sequence[str],
    *,
    cache_dir: Path,
    name: str,
    batch_size: int = 64,
    num_workers: int = 0,
    progress: bool = True,
    verify: bool | None = None,
) -> CachedFeatures:
    """Features of ``root / rel_paths[i]``, encoded once and cached in ``cache_dir / name``.

    Args:
        backbone: a ``seeclip.backbone.Backbone`` (anything with ``encode_image``,
            ``preprocess``, ``fingerprint``, ``embed_dim``, ``num_patches``).
        root: folder the relative paths are resolved against.
        rel_paths: image paths relative to ``root``; row i of the result is ``rel_paths[i]``.
        cache_dir: root of all feature caches (e.g. ``seeclip_home() / "features"``).
        name: the entry's sub-folder, chosen by the caller (e.g. "pacs/ViT-B-16-openai").
        batch_size: images per encoder call.
        num_workers: DataLoader workers decoding images.
        progress: show a tqdm bar while encoding.
        verify: also compare the files' contents with the entry's (reads every file); None =
            :func:`verify_by_default`.

    Raises:
        seeclip.datasets.images.ImageReadError: an image cannot be decoded (names the file);
            no entry is left behind.
    """
    rel_paths = [str(p) for p in rel_paths]
    if not rel_paths:
        raise ValueError(f"no images to encode for feature cache {name!r}")
    if len(set(rel_paths)) != len(rel_paths):
        raise ValueError(f"duplicate paths in the image list for feature cache {name!r}")
    entry = Path(cache_dir) / name
    parts = _key_parts(backbone, root, rel_paths)
    key = _key_from_parts(parts)
    verify = verify_by_default() if verify is None else verify
    content = content_digest(root, rel_paths) if verify else None
    cached = _load(entry, key, content)
    if distributed.world_size() > 1:  # torchrun: every rank encodes a shard of one entry
        if not distributed.broadcast_flag(cached is None):
            return cached
        return _build_sharded(
            backbone,
            root,
            rel_paths,
            entry,
            parts,
            key,
            content,
            desc=f"encoding {name}",
            batch_size=batch_size,
            num_workers=num_workers,
            progress=progress,
        )
    if cached is not None:
        return cached
    entry.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(entry.with_name(f"{entry.name}.lock")):
        cached = _load(entry, key, content)  # another process may have built it meanwhile
        if cached is not None:
            return cached
        return _build(
            backbone,
            root,
            rel_paths,
            entry,
            parts,
            key,
            content,
            desc=f"encoding {name}",
            batch_size=batch_size,
            num_workers=num_workers,
            progress=progress,
        )


def _build(
    backbone,
    root,
    rel_paths,
    entry,
    parts,
    key,
    content,
    *,
    desc,
    batch_size,
    num_workers,
    progress,
) -> CachedFeatures:
    """Encodes into a temporary sibling, then swaps it in (the caller holds the entry's lock)."""
    reason = _stale_reason(entry, parts)
    if reason is not None:
        log.info("feature cache %s is stale (%s); rebuilding", entry, reason)
    _remove_dead_builds(entry)
    tmp = entry.with_name(f"{entry.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    n, d, t = len(rel_paths), backbone.embed_dim, backbone.num_patches
    ensure_space(tmp, n * d * (1 + t) * np.dtype(_DTYPE).itemsize)
    tmp.mkdir()
    loader = DataLoader(
        ImageFiles(root, rel_paths, backbone.preprocess),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
    )
    try:
        _encode_into(tmp, backbone, loader, len(rel_paths), desc=desc, progress=progress)
        meta = _meta(backbone, root, rel_paths, parts, key, content)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))  # last: marks completion
        _swap_into_place(tmp, entry)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    loaded = _load(entry, key)
    assert loaded is not None, f"feature cache {entry} unreadable right after building it"
    return loaded


def _meta(backbone, root, rel_paths, parts, key, content) -> dict:
    return {
        "format": _FORMAT,
        "key": key,
        "parts": parts,
        "paths": list(rel_paths),
        "content": content if content is not None else content_digest(root, rel_paths),
        "global_shape": [len(rel_paths), backbone.embed_dim],
        "tokens_shape": [len(rel_paths), backbone.num_patches, backbone.embed_dim],
        "dtype": np.dtype(_DTYPE).name,
        "backbone": {
            "name": getattr(backbone, "name", None),
            "arch": getattr(backbone, "arch", None),
            "pretrained": getattr(backbone, "pretrained", None),
        },
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _build_sharded(
    backbone,
    root,
    rel_paths,
    entry,
    parts,
    key,
    content,
    *,
    desc,
    batch_size,
    num_workers,
    progress,
) -> CachedFeatures:
    """torchrun: rank 0 creates (and reserves) the arrays in a temporary folder, every rank
    encodes its contiguous block of rows into them, rank 0 writes ``meta.json`` and swaps the
    entry in; then every rank reads it. The folder must be on a file system all ranks see."""
    n, d, t = len(rel_paths), backbone.embed_dim, backbone.num_patches
    tmp = entry.with_name(f"{entry.name}.tmp-shards")
    error: BaseException | None = None
    if distributed.is_main():
        try:
            entry.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            ensure_space(tmp, n * d * (1 + t) * np.dtype(_DTYPE).itemsize)
            tmp.mkdir()
            for file, shape in (("global.npy", (n, d)), ("tokens.npy", (n, t, d))):
                _open_reserved(tmp / file, shape).flush()  # header and blocks on disk
        except BaseException as err:  # every rank must hear of it, or the others would hang
            error = err
    if distributed.broadcast_flag(error is not None):
        shutil.rmtree(tmp, ignore_errors=True)
        raise error or RuntimeError(f"rank 0 could not create the feature cache entry {entry}")
    rows = distributed.shard(n)
    try:
        glob = np.load(tmp / "global.npy", mmap_mode="r+")
        toks = np.load(tmp / "tokens.npy", mmap_mode="r+")
        files = ImageFiles(root, [rel_paths[i] for i in rows], backbone.preprocess)
        loader = DataLoader(files, batch_size=batch_size, shuffle=False, num_workers=num_workers)
        _encode_rows(
            backbone,
            loader,
            glob,
            toks,
            rows.start,
            len(rows),
            desc=f"{desc} (rank {distributed.rank()})",
            progress=progress,
        )
        glob.flush()
        toks.flush()
        del glob, toks
    except BaseException as err:
        error = err
    if distributed.broadcast_flag(error is not None):
        if distributed.is_main():
            shutil.rmtree(tmp, ignore_errors=True)
        raise error or RuntimeError(f"another rank failed while encoding {entry}; nothing kept")
    if distributed.is_main():
        meta = _meta(backbone, root, rel_paths, parts, key, content)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        _swap_into_place(tmp, entry)
    distributed.barrier()
    loaded = _load(entry, key, content)
    assert loaded is not None, f"feature cache {entry} unreadable right after building it"
    return loaded


def _encode_into(out: Path, backbone, loader: DataLoader, n: int, *, desc: str, progress: bool):
    """Runs the image encoder over ``loader`` into float16 ``.npy`` memmaps in ``out``."""
    d, t = backbone.embed_dim, backbone.num_patches
    glob = _open_reserved(out / "global.npy", (n, d))
    toks = _open_reserved(out / "tokens.npy", (n, t, d))
    _encode_rows(backbone, loader, glob, toks, 0, n, desc=desc, progress=progress)
    glob.flush()
    toks.flush()


def _encode_rows(
    backbone, loader, glob, toks, start: int, n: int, *, desc: str, progress: bool
) -> None:
    """Encodes ``loader``'s ``n`` images into rows ``start .. start + n`` of the two arrays."""
    row = start
    with tqdm(total=n, desc=desc, unit="img", disable=not progress) as bar:
        with torch.inference_mode(), distributed.placed(backbone):
            for images in loader:
                g, tk = backbone.encode_image(images)
                k = g.shape[0]
                glob[row : row + k] = g.float().cpu().numpy()
                toks[row : row + k] = tk.float().cpu().numpy()
                row += k
                bar.update(k)
    if row != start + n:
        raise RuntimeError(f"encoded {row - start} images, expected {n}")


def _open_reserved(path: Path, shape: tuple[int, ...]) -> np.memmap:
    """A float16 ``.npy`` memmap whose blocks are allocated on disk before it is written."""
    array = np.lib.format.open_memmap(path, mode="w+", dtype=_DTYPE, shape=shape)
    with open(path, "r+b") as fh:
        reserve(fh.fileno(), os.path.getsize(path), path)
    return array


def _swap_into_place(tmp: Path, entry: Path) -> None:
    """Replaces ``entry`` by ``tmp``; readers never see a half-written entry."""
    old = None
    if entry.exists():
        old = entry.with_name(f"{entry.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(entry, old)
    os.replace(tmp, entry)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
