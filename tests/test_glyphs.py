"""Tests of the embedded glyphs world: generator, splits by name, hard/easy unknowns, metrics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from seeclip import metrics
from seeclip.datasets import get_benchmark
from seeclip.datasets import glyphs as G
from seeclip.datasets.digits import content_hash, font_pools, photo_pools, read_meta

N_PER_CLASS = 2
N_CORPUS = 232  # four samples of each of the 58 concepts


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("b") / "glyphs"
    return G.generate_benchmark(root, n_per_class=N_PER_CLASS, progress=False, workers=1)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("c") / "corpus"
    return G.generate_corpus(root, n=N_CORPUS, progress=False, workers=2)


# SHA-256 of every byte of the fixtures' trees (numpy 2.4.6, pillow 13.0.0, matplotlib 3.11.2,
# scikit-image 0.26.0, scipy 1.17.1): a failure means this install draws other pixels.
BENCH_HASH = "08d1676a7ad8ac34a18135bc3404f49d6b5b9188c07c6c8d1bab879b84dda66b"
CORPUS_HASH = "b81fab6b08e39109c5f5a73f083ac5533b01cdd084bf1289c791bbb1a232d742"


def test_generated_bytes_are_the_pinned_ones(bench, corpus):
    assert read_meta(bench)["content_hash"] == content_hash(bench, "benchmark") == BENCH_HASH
    assert read_meta(corpus)["content_hash"] == content_hash(corpus, "corpus") == CORPUS_HASH


def test_benchmark_tree_has_every_class_and_domain_at_48px(bench):
    spec = get_benchmark("glyphs")
    assert spec.classes == G.BENCHMARK_CLASSES and set(spec.domains) == set(G.DOMAINS)
    for domain in spec.domains:
        assert sorted(p.name for p in (bench / domain).iterdir()) == sorted(spec.classes)
    img = Image.open(bench / "textured" / "Q" / "00001.png")
    assert img.size == (48, 48) and img.mode == "RGB"


def test_generation_is_deterministic_and_independent_of_workers(tmp_path, bench):
    again = G.generate_benchmark(tmp_path / "g", n_per_class=N_PER_CLASS, progress=False, workers=2)
    assert content_hash(again, "benchmark") == content_hash(bench, "benchmark")
    other = G.generate_benchmark(tmp_path / "s", n_per_class=N_PER_CLASS, seed=5, progress=False)
    assert content_hash(other, "benchmark") != content_hash(bench, "benchmark")
    a, _ = G.render_glyph("Q", "handwritten", np.random.default_rng(3))
    b, _ = G.render_glyph("Q", "handwritten", np.random.default_rng(3))
    assert np.array_equal(a, b)


def test_fonts_and_photos_are_split_by_name(bench, corpus):
    fonts, photos = font_pools(), photo_pools()
    assert not set(fonts["benchmark"]) & set(fonts["corpus"])
    assert not set(photos["benchmark"]) & set(photos["corpus"])
    b, c = read_meta(bench), read_meta(corpus)
    assert set(b["fonts_used"]) <= set(fonts["benchmark"])
    assert set(b["photos_used"]) <= set(photos["benchmark"])
    assert set(c["fonts_used"]) <= set(fonts["corpus"])
    assert set(c["photos_used"]) <= set(photos["corpus"])
    for name in ("plus_sign", "word_cat"):  # symbols and words: standard-encoding fonts only
        assert all(f.startswith(("DejaVu", "STIX")) for f in G.concept_fonts(name, "corpus"))


def test_hard_and_easy_unknowns_by_name():
    spec = get_benchmark("glyphs")
    hard = {"Q": "O", "F": "E", "R": "P", "G": "C", "eight": "B", "five": "S"}
    assert dict(spec.lookalikes) == hard
    for protocol in ("full", "daml"):
        kinds = spec.unknown_kinds(protocol)
        assert kinds == {
            "hard": ("Q", "F", "R", "G", "eight", "five"),
            "easy": ("two", "four", "nine", "J", "U", "Z"),
        }
        known = spec.protocols[protocol].known
        assert all(hard[c] in known for c in kinds["hard"])
    assert get_benchmark("digits").unknown_kinds("full") == {}
    assert spec.class_text("eight") == "digit eight" and spec.class_text("Q") == "letter q"


def test_a_hard_unknown_differs_from_its_lookalike_locally():
    """Same font, same place: Q's ink covers most of O's, and differs in a small part."""
    for hard, known in get_benchmark("glyphs").lookalikes.items():
        a = G.concept_mask(hard, "DejaVuSans", 96) > 0.5
        b = G.concept_mask(known, "DejaVuSans", 96) > 0.5
        iou = (a & b).sum() / (a | b).sum()
        assert 0.3 < iou < 0.95, (hard, known, iou)


def test_corpus_is_a_miniature_web(corpus):
    captions = json.loads((corpus / "captions.json").read_text())
    labels = np.load(corpus / "labels.npy")
    names = list(G.CONCEPTS)
    assert len(names) == 58 and set(G.BENCHMARK_CLASSES) < set(names)
    assert sorted(set(labels.tolist())) == list(range(58))  # every concept, benchmark or not
    assert np.load(corpus / "images.npy").shape == (N_CORPUS, 48, 48, 3)
    text = " ".join(captions)
    for phrase in ("unknown", "symbol", "letter q", "word "):
        assert phrase in text, phrase
    rng = np.random.default_rng(0)
    q_captions = []
    for _ in range(200):
        _, attrs = G.render_glyph("Q", "printed", rng, role="corpus")
        q_captions.append(G.make_caption(attrs, rng))
    assert any("tail" in c for c in q_captions)
    assert sum(("letter q" in c or "capital q" in c or " q" in f" {c}") for c in q_captions) > 150


def test_acc_unknown_by_group_against_hand_counts():
    y_pred = [3, 3, 0, 3, 1, 2, 3]  # 3 = unknown
    classes = ["Q", "Q", "Q", "two", "two", "A", "Z"]
    out = metrics.acc_unknown_by_group(
        y_pred, classes, {"hard": ["Q"], "easy": ["two", "Z"]}, num_known=3
    )
    assert out == {
        "acc_unknown_hard": pytest.approx(2 / 3),
        "acc_unknown_easy": pytest.approx(2 / 3),
    }
    assert np.isnan(
        metrics.acc_unknown_by_group([0], ["A"], {"hard": ["Q"]}, num_known=3)["acc_unknown_hard"]
    )
    with pytest.raises(ValueError, match="y_pred"):
        metrics.acc_unknown_by_group([4], ["Q"], {"hard": ["Q"]}, num_known=3)
