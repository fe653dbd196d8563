"""Feature cache: encode once, detect staleness, never leave a half-built entry."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from seeclip.backbone import build_backbone
from seeclip.cache import cache_key, encode_cached
from seeclip.datasets.images import ImageReadError

torch.set_num_threads(1)

NAMES = ["a.png", "sub/b.png", "c.jpg", "d.png", "e.png"]


@pytest.fixture(scope="module")
def backbone():
    return build_backbone("tiny-vit", seed=0)


def _write_image(path: Path, seed: int, size: int = 40) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size + seed, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


@pytest.fixture
def images(tmp_path):
    root = tmp_path / "images"
    for i, name in enumerate(NAMES):
        _write_image(root / name, seed=i)
    return root


class CountingEncoder:
    """Wraps ``backbone.encode_image`` and counts the images it sees."""

    def __init__(self, backbone, monkeypatch):
        self.images = 0
        self._encode = backbone.encode_image
        monkeypatch.setattr(backbone, "encode_image", self)

    def __call__(self, images):
        self.images += images.shape[0]
        return self._encode(images)


def _encode(backbone, root, tmp_path, **kwargs):
    options = {"cache_dir": tmp_path / "cache", "name": "toy/tiny-vit", "batch_size": 2}
    options.update(kwargs)
    return encode_cached(backbone, root, NAMES, progress=False, **options)


def test_builds_once_and_matches_direct_encoding(backbone, images, tmp_path, monkeypatch):
    counter = CountingEncoder(backbone, monkeypatch)
    first = _encode(backbone, images, tmp_path)
    assert counter.images == len(NAMES)
    second = _encode(backbone, images, tmp_path)
    assert counter.images == len(NAMES)  # served from disk
    assert second.key == first.key == cache_key(backbone, images, NAMES)

    assert isinstance(second.global_, np.memmap) and isinstance(second.tokens, np.memmap)
    assert second.global_.dtype == np.float16 and second.tokens.dtype == np.float16
    assert second.global_.shape == (5, 64) and second.tokens.shape == (5, 16, 64)
    assert second.paths == tuple(NAMES)

    batch = torch.stack([backbone.preprocess(Image.open(images / n).convert("RGB")) for n in NAMES])
    with torch.inference_mode():
        glob, tokens = backbone.encode_image(batch)
    np.testing.assert_allclose(second.global_, glob.numpy(), rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(second.tokens, tokens.numpy(), rtol=2e-3, atol=2e-3)

    meta = json.loads((tmp_path / "cache" / "toy" / "tiny-vit" / "meta.json").read_text())
    assert meta["key"] == first.key and meta["paths"] == NAMES
    assert meta["tokens_shape"] == [5, 16, 64] and meta["dtype"] == "float16"
    assert meta["backbone"] == {"name": "tiny-vit", "arch": "tiny-vit", "pretrained": None}


def test_index_and_torch_views(backbone, images, tmp_path):
    feats = _encode(backbone, images, tmp_path)
    idx = feats.index_of(["d.png", "a.png"])
    assert idx.tolist() == [3, 0] and idx.dtype == np.int64
    glob, tokens = feats.torch(idx)
    assert glob.dtype == torch.float32 and glob.shape == (2, 64) and tokens.shape == (2, 16, 64)
    assert torch.equal(glob[1], torch.from_numpy(feats.global_[0].astype(np.float32)))
    with pytest.raises(KeyError, match="missing.png"):
        feats.index_of(["missing.png"])


def test_changed_file_rebuilds(backbone, images, tmp_path, monkeypatch, caplog):
    before = _encode(backbone, images, tmp_path)
    _write_image(images / "c.jpg", seed=99, size=48)
    os.utime(images / "c.jpg", ns=(1, 1))  # even an mtime going backwards counts as a change
    counter = CountingEncoder(backbone, monkeypatch)
    with caplog.at_level(logging.INFO, logger="seeclip.cache"):
        after = _encode(backbone, images, tmp_path)
    assert counter.images == len(NAMES) and after.key != before.key
    assert "data changed" in caplog.text
    assert not np.array_equal(after.global_[2], before.global_[2])
    np.testing.assert_array_equal(after.global_[0], before.global_[0])


def test_changed_weights_rebuild(backbone, images, tmp_path, monkeypatch, caplog):
    _encode(backbone, images, tmp_path)
    other = build_backbone("tiny-vit", seed=1)
    counter = CountingEncoder(other, monkeypatch)
    with caplog.at_level(logging.INFO, logger="seeclip.cache"):
        _encode(other, images, tmp_path)
    assert counter.images == len(NAMES)
    assert "weights changed" in caplog.text and "data changed" not in caplog.text


def test_corrupt_image_leaves_no_entry(backbone, images, tmp_path):
    (images / "d.png").write_bytes(b"not an image")  # 4th file: fails in the second batch
    with pytest.raises(ImageReadError) as info:
        _encode(backbone, images, tmp_path)
    assert str(images / "d.png") in str(info.value) and "--skip-corrupt" in str(info.value)
    cache = tmp_path / "cache" / "toy"
    # neither an entry nor a temporary folder (the lock file stays: removing it would race)
    assert [p.name for p in cache.iterdir() if p.suffix != ".lock"] == []


def test_failed_rebuild_keeps_serving_nothing_stale(backbone, images, tmp_path, monkeypatch):
    old = _encode(backbone, images, tmp_path)

    def explode(images):
        raise KeyboardInterrupt

    monkeypatch.setattr(backbone, "encode_image", explode)
    _write_image(images / "a.png", seed=7, size=44)
    with pytest.raises(KeyboardInterrupt):
        _encode(backbone, images, tmp_path)
    folder = tmp_path / "cache" / "toy"
    entries = sorted(p.name for p in folder.iterdir() if p.suffix != ".lock")
    assert entries == ["tiny-vit"]  # the old entry, still keyed to the old files
    meta = json.loads((tmp_path / "cache" / "toy" / "tiny-vit" / "meta.json").read_text())
    assert meta["key"] == old.key != cache_key(backbone, images, NAMES)


def test_empty_or_duplicate_lists_are_rejected(backbone, images, tmp_path):
    with pytest.raises(ValueError, match="no images"):
        encode_cached(backbone, images, [], cache_dir=tmp_path, name="x", progress=False)
    with pytest.raises(ValueError, match="duplicate"):
        encode_cached(backbone, images, ["a.png"] * 2, cache_dir=tmp_path, name="x", progress=False)


# ------------------------------------------------------------------ staleness, every case
ENTRY = ("toy", "tiny-vit")


def _entry(tmp_path: Path) -> Path:
    return tmp_path.joinpath("cache", *ENTRY)


def _fresh(backbone, images, tmp_path):
    """The same images encoded into a cache folder of their own (a fresh encoding)."""
    return _encode(backbone, images, tmp_path / "fresh")


def _assert_encoded_afresh(backbone, images, tmp_path, counter, got):
    assert counter.images == len(NAMES)  # every image went through the encoder again
    fresh = _fresh(backbone, images, tmp_path)
    assert got.paths == fresh.paths == tuple(NAMES) and got.key == fresh.key
    np.testing.assert_array_equal(got.global_, fresh.global_)
    np.testing.assert_array_equal(got.tokens, fresh.tokens)


def _assert_rebuilt(backbone, images, tmp_path, counter, got):
    _assert_encoded_afresh(backbone, images, tmp_path, counter, got)
    meta = json.loads((_entry(tmp_path) / "meta.json").read_text())  # a whole meta.json again
    assert meta["key"] == got.key and meta["paths"] == NAMES
    assert meta["global_shape"] == [5, 64] and meta["tokens_shape"] == [5, 16, 64]
    leftovers = sorted(p.name for p in _entry(tmp_path).parent.iterdir() if p.suffix != ".lock")
    assert leftovers == ["tiny-vit"]  # no temporary or old folder stays behind


def test_changed_preprocessing_rebuilds(backbone, images, tmp_path, monkeypatch, caplog):
    from torchvision import transforms

    before = _encode(backbone, images, tmp_path)
    size = backbone.image_size
    other = transforms.Compose(
        [
            transforms.Resize(size),
            transforms.CenterCrop(size),
            transforms.ToTensor(),
            transforms.Normalize((0.5, 0.5, 0.5), (0.25, 0.25, 0.25)),
        ]
    )
    assert repr(other) != repr(backbone.preprocess)
    monkeypatch.setattr(backbone, "preprocess", other)
    counter = CountingEncoder(backbone, monkeypatch)
    with caplog.at_level(logging.INFO, logger="seeclip.cache"):
        after = _encode(backbone, images, tmp_path)
    assert "preprocess changed" in caplog.text
    assert "weights changed" not in caplog.text and "data changed" not in caplog.text
    assert after.key != before.key
    assert not np.allclose(after.global_, before.global_, atol=1e-2)  # the new transform ran
    _assert_rebuilt(backbone, images, tmp_path, counter, after)
    # the fresh encoding itself is the new transform's, computed without the cache
    batch = torch.stack([other(Image.open(images / n).convert("RGB")) for n in NAMES])
    with torch.inference_mode():
        glob, tokens = counter._encode(batch)
    np.testing.assert_allclose(after.global_, glob.numpy(), rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(after.tokens, tokens.numpy(), rtol=2e-3, atol=2e-3)


def _drop(key):
    def edit(meta):
        del meta[key]
        return meta

    return edit


META_DAMAGE = {
    "not_json": lambda text: "{ this is not json",
    "truncated": lambda text: text[: len(text) // 2],
    "empty": lambda text: "",
    "a_list": lambda text: "[1, 2, 3]",
    "no_global_shape": _drop("global_shape"),
    "no_tokens_shape": _drop("tokens_shape"),
    "no_paths": _drop("paths"),
    "no_key": _drop("key"),
    "no_content": _drop("content"),
    "no_parts": _drop("parts"),
    "parts_null": lambda meta: {**meta, "parts": None},
    "shapes_null": lambda meta: {**meta, "global_shape": None, "tokens_shape": None},
}


@pytest.mark.parametrize("damage", list(META_DAMAGE))
def test_unreadable_or_partial_meta_is_stale_and_rebuilt(
    damage, backbone, images, tmp_path, monkeypatch, caplog
):
    _encode(backbone, images, tmp_path)
    meta_path = _entry(tmp_path) / "meta.json"
    text = meta_path.read_text()
    edit = META_DAMAGE[damage]
    if damage.startswith(("no_", "parts_", "shapes_")):
        meta_path.write_text(json.dumps(edit(json.loads(text))))
    else:
        meta_path.write_text(edit(text))
    counter = CountingEncoder(backbone, monkeypatch)
    with caplog.at_level(logging.INFO, logger="seeclip.cache"):
        after = _encode(backbone, images, tmp_path)
    assert "is stale" in caplog.text
    _assert_rebuilt(backbone, images, tmp_path, counter, after)


def _fewer_rows(entry: Path, file: str) -> None:
    array = np.load(entry / file)
    np.save(entry / file, array[:-1])  # a valid .npy with one row fewer than meta says


def _meta_shape(entry: Path, key: str, shape: list[int]) -> None:
    meta = json.loads((entry / "meta.json").read_text())
    meta[key] = shape
    (entry / "meta.json").write_text(json.dumps(meta))


ARRAY_DAMAGE = {
    "global_fewer_rows": lambda e: _fewer_rows(e, "global.npy"),
    "tokens_fewer_rows": lambda e: _fewer_rows(e, "tokens.npy"),
    "meta_global_shape": lambda e: _meta_shape(e, "global_shape", [5, 32]),
    "meta_tokens_shape": lambda e: _meta_shape(e, "tokens_shape", [5, 4, 64]),
    "tokens_missing": lambda e: (e / "tokens.npy").unlink(),
    "global_not_npy": lambda e: (e / "global.npy").write_bytes(b"garbage"),
}


@pytest.mark.parametrize("damage", list(ARRAY_DAMAGE))
def test_arrays_that_do_not_match_meta_are_rebuilt(
    damage, backbone, images, tmp_path, monkeypatch, caplog
):
    _encode(backbone, images, tmp_path)
    ARRAY_DAMAGE[damage](_entry(tmp_path))
    counter = CountingEncoder(backbone, monkeypatch)
    with caplog.at_level(logging.INFO, logger="seeclip.cache"):
        after = _encode(backbone, images, tmp_path)
    assert "is stale" in caplog.text and "weights changed" not in caplog.text
    _assert_rebuilt(backbone, images, tmp_path, counter, after)


def _dead_pid() -> int:
    """The id of a process that has exited (and been reaped)."""
    import subprocess
    import sys

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    with pytest.raises(ProcessLookupError):
        os.kill(child.pid, 0)
    return child.pid


def test_leftovers_of_dead_builds_are_removed_and_a_live_build_is_kept(
    backbone, images, tmp_path, monkeypatch
):
    entry = _entry(tmp_path)
    entry.parent.mkdir(parents=True)
    dead, alive = _dead_pid(), os.getppid()  # the parent of this test process is running
    assert alive != os.getpid()
    made = {
        f"tiny-vit.tmp-{dead}": True,  # a build killed while encoding
        f"tiny-vit.old-{dead}": True,  # a build killed while swapping its entry in
        f"tiny-vit.tmp-{alive}": False,  # another process's build in progress: not ours
        f"tiny-vit.old-{alive}": False,
        "tiny-vit.tmp-notapid": False,
        "other.tmp-1": False,  # another entry's folder
    }
    for name in made:
        (entry.parent / name).mkdir()
        (entry.parent / name / "global.npy").write_bytes(b"half written")
    counter = CountingEncoder(backbone, monkeypatch)
    got = _encode(backbone, images, tmp_path)
    left = {p.name for p in entry.parent.iterdir()}
    for name, removed in made.items():
        assert (name not in left) == removed, name
    assert "tiny-vit" in left
    _assert_encoded_afresh(backbone, images, tmp_path, counter, got)
