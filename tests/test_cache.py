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
