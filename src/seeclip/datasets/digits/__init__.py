"""The embedded ``digits`` world: four styles of the ten digits, drawn offline from pip data.

- :mod:`~seeclip.datasets.digits.render`: one image in one style (fonts, photos, scans, pools).
- :mod:`~seeclip.datasets.digits.captions`: captions for the pretraining corpus.
- :mod:`~seeclip.datasets.digits.writer`: the benchmark tree and the corpus on disk, with a
  content hash of what was written.
"""

from seeclip.datasets.digits.captions import (
    CAPTION_TEMPLATES,
    STYLE_ADJECTIVES,
    STYLE_KEYWORDS,
    STYLE_PHRASES,
    font_label,
    make_caption,
)
from seeclip.datasets.digits.render import (
    BENCHMARK_FONTS,
    BENCHMARK_PHOTOS,
    DIGIT_WORDS,
    DOMAINS,
    FONTS,
    PALETTE,
    PHOTOS,
    ROLES,
    colour_name,
    font_paths,
    font_pools,
    handwritten_pools,
    photo_pools,
    render_digit,
    usable_fonts,
)
from seeclip.datasets.digits.writer import (
    GENERATOR_VERSION,
    content_hash,
    generate_benchmark,
    generate_corpus,
    installed_versions,
    read_meta,
    renderer_hash,
)

__all__ = [
    "BENCHMARK_FONTS",
    "BENCHMARK_PHOTOS",
    "CAPTION_TEMPLATES",
    "DIGIT_WORDS",
    "DOMAINS",
    "FONTS",
    "GENERATOR_VERSION",
    "PALETTE",
    "PHOTOS",
    "ROLES",
    "STYLE_ADJECTIVES",
    "STYLE_KEYWORDS",
    "STYLE_PHRASES",
    "colour_name",
    "content_hash",
    "font_label",
    "font_paths",
    "font_pools",
    "generate_benchmark",
    "generate_corpus",
    "handwritten_pools",
    "installed_versions",
    "make_caption",
    "photo_pools",
    "read_meta",
    "render_digit",
    "renderer_hash",
    "usable_fonts",
]
