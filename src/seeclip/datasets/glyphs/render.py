"""Rendering of one image of the embedded ``glyphs`` world: a concept in one of four styles.

The world's concepts (:data:`CONCEPTS`) are the 26 capital letters, the ten digits, ten
typographic symbols, six geometric shapes and six short words. The benchmark uses 24 of them
(``specs/glyphs.yaml``); the pretraining corpus draws all of them, as web data holds far more
than any benchmark. Four domains, drawn from data that pip packages ship:

- ``printed``: the glyph in one of matplotlib's bundled fonts, random affine and colours;
- ``outline``: the hollow glyph (dilated glyph minus glyph) on a plain or gradient background;
- ``textured``: MNIST-M's ``|photo crop - glyph|`` on scikit-image's sample photographs;
- ``handwritten``: an elastic hand-drawn stroke: the font glyph's skeleton, bent by a smooth
  random displacement field and drawn with a round pen of random width, on grainy paper.

Fonts and photos are split by name between the benchmark and the corpus exactly as in the
``digits`` world (:func:`seeclip.datasets.digits.font_pools`), so a CLIP pretrained on the
corpus meets new fonts, photos and hands in the benchmark. Images are 48 px: the smallest side
that gives the tiny CLIP's output-stride-8 image tower a 6x6 grid (36 spatial tokens).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from seeclip.datasets.digits.render import (
    DIGIT_WORDS,
    DOMAINS,
    ROLES,
    font_paths,
    font_pools,
    paint,
    to_pil,
    warp_mask,
)

__all__ = [
    "CONCEPTS",
    "DOMAINS",
    "IMAGE_SIZE",
    "KINDS",
    "ROLES",
    "Concept",
    "concept_fonts",
    "concept_mask",
    "render_glyph",
]

IMAGE_SIZE = 48
KINDS = ("letter", "digit", "symbol", "shape", "word")


@dataclass(frozen=True)
class Concept:
    """One thing the world can draw: its name (the class name), kind and the text it prints."""

    name: str
    kind: str  # one of KINDS
    text: str  # the characters drawn (shapes: the shape's name)


def _concepts() -> dict[str, Concept]:
    out = [Concept(c, "letter", c) for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ"]
    out += [Concept(w, "digit", str(i)) for i, w in enumerate(DIGIT_WORDS)]
    symbols = {
        "plus_sign": "+",
        "equals_sign": "=",
        "percent_sign": "%",
        "ampersand": "&",
        "hash_sign": "#",
        "at_sign": "@",
        "question_mark": "?",
        "exclamation_mark": "!",
        "dollar_sign": "$",
        "asterisk": "*",
    }
    out += [Concept(name, "symbol", ch) for name, ch in symbols.items()]
    out += [
        Concept(s, "shape", s) for s in ("circle", "square", "triangle", "star", "arrow", "diamond")
    ]
    out += [Concept(f"word_{w}", "word", w) for w in ("cat", "sun", "box", "map", "key", "dog")]
    return {c.name: c for c in out}


CONCEPTS: dict[str, Concept] = _concepts()
# Symbols and words print only in fonts with a standard encoding: the Computer Modern TTFs map
# several ASCII symbol codes to other glyphs.
_PLAIN_FONT_PREFIXES = ("DejaVu", "STIX")


def _check(name: str, domain: str, role: str) -> Concept:
    if name not in CONCEPTS:
        raise ValueError(f"unknown glyph concept {name!r}; see seeclip.datasets.glyphs.CONCEPTS")
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; choose one of {DOMAINS}")
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; choose one of {ROLES}")
    return CONCEPTS[name]


def concept_fonts(name: str, role: str) -> tuple[str, ...]:
    """The fonts of ``role``'s pool that may draw concept ``name`` (all of them for shapes)."""
    pool = font_pools()[role]
    if CONCEPTS[name].kind in ("symbol", "word"):
        return tuple(f for f in pool if f.startswith(_PLAIN_FONT_PREFIXES))
    return pool


def _centre(arr: np.ndarray, size: int) -> np.ndarray:
    """Crop ``arr`` to its ink and paste it centred on a [size, size] canvas."""
    out = np.zeros((size, size), dtype=np.float32)
    ys, xs = np.nonzero(arr > 0.05)
    if len(ys) == 0:
        return out
    glyph = arr[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1][:size, :size]
    top, left = (size - glyph.shape[0]) // 2, (size - glyph.shape[1]) // 2
    out[top : top + glyph.shape[0], left : left + glyph.shape[1]] = glyph
    return out


def _shape(name: str, size: int) -> np.ndarray:
    """A filled geometric shape, ~62% of the canvas, as a float32 [size, size] mask."""
    page = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(page)
    c, r = size / 2, 0.31 * size
    if name == "circle":
        draw.ellipse((c - r, c - r, c + r, c + r), fill=255)
    elif name == "square":
        s = 0.85 * r
        draw.rectangle((c - s, c - s, c + s, c + s), fill=255)
    elif name == "diamond":
        draw.polygon([(c, c - r), (c + 0.75 * r, c), (c, c + r), (c - 0.75 * r, c)], fill=255)
    elif name == "triangle":
        draw.polygon([(c, c - r), (c + r, c + 0.8 * r), (c - r, c + 0.8 * r)], fill=255)
    elif name == "star":
        angles = np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, r, 0.42 * r)
        draw.polygon(
            [(c + q * np.cos(a), c - q * np.sin(a)) for a, q in zip(angles, radii, strict=True)],
            fill=255,
        )
    elif name == "arrow":
        h, w = 0.28 * r, 0.55 * r
        draw.polygon(
            [
                (c - r, c - h),
                (c + r - w, c - h),
                (c + r - w, c - 2.2 * h),
                (c + r, c),
                (c + r - w, c + 2.2 * h),
                (c + r - w, c + h),
                (c - r, c + h),
            ],
            fill=255,
        )
    return np.asarray(page, dtype=np.float32) / 255.0


@functools.lru_cache(maxsize=64)
def _font(stem: str, size: int) -> ImageFont.FreeTypeFont:
    """The font at the point size that makes its capital H ~62% of a ``size`` canvas tall."""
    path = font_paths()[stem]
    box = ImageFont.truetype(path, 100).getbbox("H")
    return ImageFont.truetype(path, max(4, round(100 * 0.62 * size / max(box[3] - box[1], 1))))


@functools.lru_cache(maxsize=8192)
def concept_mask(name: str, font: str, size: int) -> np.ndarray:
    """The ink of concept ``name`` in ``font`` as a centred float32 [size, size] mask (read-only).

    Letters, digits and symbols share one point size per font (cap height ~62% of the canvas);
    words are shrunk to fit 85% of the width; shapes do not depend on the font.
    """
    concept = CONCEPTS[name]
    if concept.kind == "shape":
        mask = _shape(concept.text, size)
    else:
        font_obj = _font(font, size)
        if concept.kind == "word":
            width = font_obj.getbbox(concept.text)[2]
            if width > 0.85 * size:
                points = max(4, int(font_obj.size * 0.85 * size / width))
                font_obj = ImageFont.truetype(font_paths()[font], points)
        page = Image.new("L", (3 * size, 3 * size), 0)
        ImageDraw.Draw(page).text((size // 2, size), concept.text, font=font_obj, fill=255)
        mask = _centre(np.asarray(page, dtype=np.float32) / 255.0, size)
    mask.setflags(write=False)
    return mask


@functools.lru_cache(maxsize=8192)
def _rings(name: str, font: str, size: int) -> tuple[Image.Image, Image.Image]:
    """Two hollow versions (thin, thick ring) of a concept's mask, as PIL 'L' images."""
    from scipy.ndimage import grey_dilation

    glyph = concept_mask(name, font, size)
    out = []
    for radius in (max(1, size // 24), max(2, size // 14)):
        yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
        dilated = grey_dilation(glyph, footprint=(yy**2 + xx**2) <= radius**2)
        out.append(to_pil(np.clip(dilated - glyph, 0.0, 1.0)[None])[0])
    return out[0], out[1]


@functools.lru_cache(maxsize=8192)
def _skeleton_distance(name: str, font: str, size: int) -> np.ndarray:
    """Distance (px) from every canvas pixel to the skeleton of the concept's glyph.

    A shape is drawn by its contour (the skeleton of a filled disc is a point).
    """
    from scipy.ndimage import distance_transform_edt
    from skimage.morphology import skeletonize

    if CONCEPTS[name].kind == "shape":
        ink = np.asarray(_rings(name, font, size)[0], dtype=np.float32) / 255.0
    else:
        ink = concept_mask(name, font, size)
    skeleton = skeletonize(ink > 0.5)
    if not skeleton.any():
        return np.full((size, size), float(size), dtype=np.float32)
    return distance_transform_edt(~skeleton).astype(np.float32)


def _hand_drawn(name: str, font: str, size: int, rng: np.random.Generator) -> Image.Image:
    """The glyph's skeleton bent by a smooth random field and drawn with a round pen."""
    from scipy.ndimage import map_coordinates, zoom

    distance = _skeleton_distance(name, font, size)
    amplitude = rng.uniform(0.02, 0.05) * size  # displacement std, px
    coarse = rng.normal(0.0, amplitude, size=(2, 5, 5))
    field = np.stack([zoom(c, size / 5, order=3)[:size, :size] for c in coarse])
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    bent = map_coordinates(distance, [yy + field[0], xx + field[1]], order=1, mode="nearest")
    pen = rng.uniform(size / 40, size / 16)  # pen radius, px
    if CONCEPTS[name].kind == "word":
        pen *= 0.5  # a word's letters are about half as tall as a single character
    stroke = np.clip(pen + 0.5 - bent, 0.0, 1.0)
    return to_pil(stroke[None].astype(np.float32))[0]


def render_glyph(
    name: str,
    domain: str,
    rng: np.random.Generator,
    *,
    image_size: int = IMAGE_SIZE,
    role: str = "benchmark",
) -> tuple[np.ndarray, dict]:
    """Draw concept ``name`` in ``domain``'s style from the ``role``'s fonts and photos.

    Returns:
        A uint8 [image_size, image_size, 3] image and its attributes: ``concept``, ``kind``,
        ``domain``, ``role``, ``font``, ``colour`` (palette name of the glyph's colour),
        ``background`` (a palette name, ``"gradient"`` or ``"photo"``) and ``photo`` (None
        unless ``textured``).
    """
    concept = _check(name, domain, role)
    size = 2 * image_size if image_size <= 64 else image_size  # glyphs drawn 2x supersampled
    fonts = concept_fonts(name, role)
    font = fonts[int(rng.integers(len(fonts)))]
    if domain == "handwritten":
        src = _hand_drawn(name, font, size, rng)
    elif domain == "outline":
        src = _rings(name, font, size)[int(rng.integers(2))]
    else:
        src = to_pil(concept_mask(name, font, size)[None])[0]
    mask = warp_mask(src, domain, rng, image_size)
    img, painted = paint(mask, domain, rng, role=role)
    attrs = {
        "concept": name,
        "kind": concept.kind,
        "domain": domain,
        "role": role,
        "font": None if concept.kind == "shape" else font,
        **painted,
    }
    return img, attrs
