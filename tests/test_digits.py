"""Tests of the embedded digits benchmark and captioned corpus (tiny sizes, CPU, seconds)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from seeclip.datasets import digits as D

N_PER_CLASS = 3
N_CORPUS = 50


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    return D.generate_benchmark(
        tmp_path_factory.mktemp("b") / "digits", n_per_class=N_PER_CLASS, progress=False
    )


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return D.generate_corpus(tmp_path_factory.mktemp("c") / "corpus", n=N_CORPUS, progress=False)


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.png"))}


# SHA-256 of every byte of the trees the fixtures write. They were measured with numpy 2.4.6,
# pillow 13.0.0, matplotlib 3.11.2, scikit-image 0.26.0, scipy 1.17.1, scikit-learn 1.9.1 and
# match pillow 10.4-13, matplotlib 3.8-3.11, scikit-image 0.23-0.26 too (docs/results.md). A
# failure here means this install draws other pixels than the one the docs' tables came from.
BENCH_HASH = "7e8a5231a58faa10db4c667804bd97c735b3feb927d5a330029af149d70bc656"
CORPUS_HASH = "68e9f879f3b46eba008ebf5bcbdc6122aecd8d68855d4e2cbc9c8c5f48d1e9d4"


def test_generated_bytes_are_the_pinned_ones(bench, corpus):
    meta = D.read_meta(bench)
    assert meta["content_hash"] == D.content_hash(bench, "benchmark") == BENCH_HASH, meta["install"]
    assert D.read_meta(corpus)["content_hash"] == D.content_hash(corpus, "corpus") == CORPUS_HASH


def test_a_tree_is_reused_only_if_its_bytes_and_renderer_match(tmp_path, monkeypatch):
    root = D.generate_benchmark(tmp_path / "d", n_per_class=1, progress=False)
    png = root / "printed" / "two" / "00000.png"
    good = png.read_bytes()
    png.write_bytes(good[:-8])  # a damaged or hand-edited image
    D.generate_benchmark(root, n_per_class=1, progress=False)
    assert png.read_bytes() == good
    meta = D.read_meta(root)
    meta["renderer"] = "0" * 12  # written by other rendering code (same version number)
    (root / "meta.json").write_text(json.dumps(meta))
    D.generate_benchmark(root, n_per_class=1, progress=False)
    assert D.read_meta(root)["renderer"] == D.renderer_hash()


def test_every_listed_font_draws_the_ten_digits():
    assert set(D.FONTS) <= set(D.usable_fonts())
    assert set(D.BENCHMARK_FONTS) <= set(D.FONTS)


def test_benchmark_layout(bench):
    assert sorted(p.name for p in bench.iterdir() if p.is_dir()) == sorted(D.DOMAINS)
    for domain in D.DOMAINS:
        classes = sorted(p.name for p in (bench / domain).iterdir())
        assert classes == sorted(D.DIGIT_WORDS)
        for word in D.DIGIT_WORDS:
            files = sorted((bench / domain / word).iterdir())
            assert [f.name for f in files] == [f"{i:05d}.png" for i in range(N_PER_CLASS)]
            with Image.open(files[0]) as im:
                assert im.mode == "RGB" and im.size == (32, 32)
    meta = json.loads((bench / "meta.json").read_text())
    assert meta["seed"] == 0 and meta["n_per_class"] == N_PER_CLASS and meta["image_size"] == 32
    assert meta["domains"] == list(D.DOMAINS) and meta["classes"] == list(D.DIGIT_WORDS)
    assert set(meta["fonts_used"]) <= set(meta["fonts"]["benchmark"])
    assert set(meta["photos_used"]) <= set(meta["photos"]["benchmark"])
    assert not list(bench.parent.glob(".digits.tmp-*"))  # the temporary folder was renamed


def test_benchmark_determinism(bench, tmp_path):
    again = D.generate_benchmark(tmp_path / "same", n_per_class=N_PER_CLASS, progress=False)
    other = D.generate_benchmark(
        tmp_path / "other", n_per_class=N_PER_CLASS, seed=5, progress=False
    )
    ref = _tree_bytes(bench)
    assert _tree_bytes(again) == ref
    other_bytes = _tree_bytes(other)
    assert other_bytes.keys() == ref.keys()
    assert sum(other_bytes[k] != ref[k] for k in ref) > 0.9 * len(ref)


def test_benchmark_idempotent(bench):
    meta, png = bench / "meta.json", bench / "printed" / "seven" / "00000.png"
    before = (meta.stat().st_mtime_ns, png.stat().st_mtime_ns)
    assert D.generate_benchmark(bench, n_per_class=N_PER_CLASS, progress=False) == bench
    assert (meta.stat().st_mtime_ns, png.stat().st_mtime_ns) == before


def test_regenerates_when_parameters_change(tmp_path):
    root = D.generate_benchmark(tmp_path / "d", n_per_class=1, progress=False)
    D.generate_benchmark(root, n_per_class=2, progress=False)
    assert json.loads((root / "meta.json").read_text())["n_per_class"] == 2
    assert len(list((root / "outline" / "two").iterdir())) == 2
    (tmp_path / "foreign").mkdir()
    with pytest.raises(FileExistsError):
        D.generate_benchmark(tmp_path / "foreign", n_per_class=1, progress=False)


def test_render_is_order_independent():
    a, attrs_a = D.render_digit(4, "textured", np.random.default_rng([9, 2, 4, 0]))
    D.render_digit(1, "printed", np.random.default_rng(3))
    b, attrs_b = D.render_digit(4, "textured", np.random.default_rng([9, 2, 4, 0]))
    assert a.dtype == np.uint8 and a.shape == (32, 32, 3)
    assert np.array_equal(a, b) and attrs_a == attrs_b
    big, _ = D.render_digit(4, "outline", np.random.default_rng(0), image_size=48)
    assert big.shape == (48, 48, 3)
    with pytest.raises(ValueError):
        D.render_digit(4, "cursive", np.random.default_rng(0))


def test_corpus(corpus):
    images = np.load(corpus / "images.npy")
    labels, domains = np.load(corpus / "labels.npy"), np.load(corpus / "domains.npy")
    captions = json.loads((corpus / "captions.json").read_text())
    assert images.shape == (N_CORPUS, 32, 32, 3) and images.dtype == np.uint8
    assert labels.shape == domains.shape == (N_CORPUS,) and len(captions) == N_CORPUS
    assert set(labels.tolist()) == set(range(10)) and set(domains.tolist()) == {0, 1, 2, 3}
    assert len(set(captions)) > 0.8 * N_CORPUS  # templates and synonyms vary
    for caption, digit, d in zip(captions, labels, domains, strict=True):
        assert re.search(rf"\b({D.DIGIT_WORDS[digit]}|{digit})\b", caption), caption
        others = [w for k, w in enumerate(D.DIGIT_WORDS) if k != digit] + [
            str(k) for k in range(10) if k != digit
        ]
        assert not re.search(rf"\b({'|'.join(others)})\b", caption), caption
        style = D.DOMAINS[d]
        assert any(k in caption for k in D.STYLE_KEYWORDS[style]), caption
        for other in D.DOMAINS:
            if other != style:
                assert not any(k in caption for k in D.STYLE_KEYWORDS[other]), caption
    meta = json.loads((corpus / "meta.json").read_text())
    assert meta["n"] == N_CORPUS and meta["seed"] == 1
    # everything the corpus drew on comes from the corpus pools, never the held-out ones
    assert set(meta["fonts_used"]) <= set(meta["fonts"]["corpus"])
    assert set(meta["photos_used"]) <= set(meta["photos"]["corpus"])
    assert not set(meta["fonts_used"]) & set(meta["fonts"]["benchmark"])


def test_pools_are_disjoint_and_respected():
    fonts, photos, hw = D.font_pools(), D.photo_pools(), D.handwritten_pools()
    assert len(fonts["corpus"]) >= 10 and len(fonts["benchmark"]) >= 4
    assert not set(fonts["corpus"]) & set(fonts["benchmark"])
    assert not set(photos["corpus"]) & set(photos["benchmark"])
    assert "LastResortHE-Regular" not in D.usable_fonts()  # draws boxes, not digits
    assert "cmsy10" not in D.usable_fonts()  # maps '0'..'9' to symbols
    for digit in range(10):
        assert not set(hw["corpus"][digit]) & set(hw["benchmark"][digit])
    for k in range(40):
        domain, digit = D.DOMAINS[k % 4], k % 10
        for role in D.ROLES:
            _, attrs = D.render_digit(digit, domain, np.random.default_rng([k]), role=role)
            assert attrs["font"] is None or attrs["font"] in fonts[role]
            assert attrs["photo"] is None or attrs["photo"] in photos[role]
            assert attrs["sample_index"] is None or attrs["sample_index"] in hw[role][digit]
            assert attrs["colour"] in D.PALETTE


def test_colour_names():
    assert D.colour_name(np.array([250, 10, 10])) == "red"
    assert D.colour_name(np.array([0, 0, 0])) == "black"
    rng = np.random.default_rng(0)
    for _ in range(20):
        img, attrs = D.render_digit(8, "printed", rng)
        corners = img[[0, 0, -1, -1], [0, -1, 0, -1]].astype(float)
        assert attrs["background"] in D.PALETTE
        assert D.colour_name(corners.mean(axis=0)) == attrs["background"]


def _style_features(images: np.ndarray) -> np.ndarray:
    x = images.astype(np.float32) / 255.0
    grey = x.mean(axis=3)
    grad = np.abs(np.diff(grey, axis=1)).mean(axis=(1, 2)) + np.abs(np.diff(grey, axis=2)).mean(
        axis=(1, 2)
    )
    border = np.concatenate([x[:, 0], x[:, -1], x[:, :, 0], x[:, :, -1]], axis=1)
    return np.stack(
        [
            grey.std(axis=(1, 2)),
            grad,
            border.std(axis=1).mean(axis=1),
            (x.max(axis=3) - x.min(axis=3)).mean(axis=(1, 2)),
        ],
        axis=1,
    )


def test_domains_differ(bench):
    feats, ys = [], []
    for d, domain in enumerate(D.DOMAINS):
        imgs = np.stack(
            [np.asarray(Image.open(p)) for p in sorted((bench / domain).rglob("*.png"))]
        )
        feats.append(_style_features(imgs))
        ys += [d] * len(imgs)
    x, y = np.concatenate(feats), np.array(ys)
    x = (x - x.mean(axis=0)) / x.std(axis=0)
    train = np.arange(len(y)) % 2 == 0
    centroids = np.stack([x[train & (y == d)].mean(axis=0) for d in range(4)])
    pred = ((x[~train, None] - centroids) ** 2).sum(axis=2).argmin(axis=1)
    assert (pred == y[~train]).mean() > 0.6  # chance is 0.25
