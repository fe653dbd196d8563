"""The embedded ``glyphs`` world: letters, digits, symbols, shapes and words in four styles.

- :mod:`~seeclip.datasets.glyphs.render`: one image of one concept in one style.
- :mod:`~seeclip.datasets.glyphs.captions`: web-like captions for the pretraining corpus.
- :mod:`~seeclip.datasets.glyphs.writer`: the benchmark tree and the corpus on disk.
"""

from seeclip.datasets.glyphs.captions import ATTRIBUTES, make_caption, nouns
from seeclip.datasets.glyphs.render import (
    CONCEPTS,
    DOMAINS,
    IMAGE_SIZE,
    KINDS,
    Concept,
    concept_fonts,
    concept_mask,
    render_glyph,
)
from seeclip.datasets.glyphs.writer import (
    BENCHMARK_CLASSES,
    GENERATOR_VERSION,
    generate_benchmark,
    generate_corpus,
    renderer_hash,
)

__all__ = [
    "ATTRIBUTES",
    "BENCHMARK_CLASSES",
    "CONCEPTS",
    "DOMAINS",
    "GENERATOR_VERSION",
    "IMAGE_SIZE",
    "KINDS",
    "Concept",
    "concept_fonts",
    "concept_mask",
    "generate_benchmark",
    "generate_corpus",
    "make_caption",
    "nouns",
    "render_glyph",
    "renderer_hash",
]
