"""Captions of the glyphs corpus, written the way web alt-text is.

A caption names the concept (``the letter q``, ``the number 5``, ``a plus sign``), its style and
often its colour; about a third also name a local attribute that tells a concept from its
look-alike (``a q with a tail``, ``an f open at the bottom``, ``a c open at the right``). Some
do not name the concept at all and say what web text says of things it cannot name: ``an
unknown symbol``, ``some other sign``, ``a symbol``. That happens mostly for the symbols,
shapes and words, so "unknown" and "other" come to mean "not one of the named characters".
"""

from __future__ import annotations

import numpy as np

from seeclip.datasets.digits.captions import (
    STYLE_ADJECTIVES,
    STYLE_PHRASES,
    fix_articles,
    font_label,
)
from seeclip.datasets.glyphs.render import CONCEPTS

__all__ = ["ATTRIBUTES", "GENERIC_CAPTIONS", "UNNAMED_RATE", "make_caption", "nouns"]

# Local details that tell look-alikes apart (and a few more, so attributes are not a tell-tale
# of the benchmark's pairs).
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "O": ("round and closed", "without a tail"),
    "Q": ("with a tail", "round with a tail at the bottom"),
    "C": ("open at the right", "without a crossbar"),
    "G": ("with a crossbar", "open at the right with a spur"),
    "E": ("with three bars", "with a bottom bar"),
    "F": ("open at the bottom", "with only two bars"),
    "P": ("without a leg", "with one bowl at the top"),
    "R": ("with a leg", "with a bowl and a leg"),
    "B": ("with a straight left side", "with two bowls"),
    "eight": ("with two loops", "round on both sides"),
    "S": ("curved at the top", "with two curves"),
    "five": ("with a flat top", "with a corner at the top left"),
    "A": ("with a crossbar", "pointed at the top"),
    "H": ("with a crossbar", "with two posts"),
    "T": ("with a bar at the top",),
    "L": ("with a bottom bar", "open at the top"),
    "D": ("with a straight left side", "round at the right"),
    "zero": ("round and closed", "tall and round"),
    "U": ("open at the top", "round at the bottom"),
    "J": ("with a hook at the bottom",),
    "K": ("with two arms",),
    "X": ("with two crossing strokes",),
}
GENERIC_CAPTIONS: tuple[str, ...] = (
    "an unknown symbol",
    "an unknown sign, {adj}",
    "some other symbol",
    "a symbol",
    "a {adj} symbol",
    "another character",
    "an unknown character {phrase}",
    "other: a {colour} {adj} sign",
    "a {colour} symbol",
    "an unknown shape on {background}",
)
# share of captions that do not name the concept, by kind
UNNAMED_RATE = {"letter": 0.04, "digit": 0.04, "symbol": 0.25, "shape": 0.25, "word": 0.25}
TEMPLATES: tuple[str, ...] = (
    "a {adj} {noun}",
    "{noun}, {adj}",
    "a photo of the {adj} {noun}",
    "a photo of {noun}",
    "a {colour} {adj} {noun}",
    "an image of {noun} {phrase}",
    "{noun} in {colour} {phrase}",
    "a {colour} {noun} on {background}",
    "the {noun}",
    "{noun} {phrase}",
)
ATTRIBUTE_TEMPLATES: tuple[str, ...] = (
    "a {adj} {noun} {attr}",
    "{noun} {attr}",
    "a photo of the {noun} {attr}",
    "a {colour} {noun} {attr}, {adj}",
)
ATTRIBUTE_RATE = 0.35


def nouns(name: str) -> tuple[str, ...]:
    """Noun phrases (no article) that name a concept: 'letter q', 'capital q', 'number 5'..."""
    c = CONCEPTS[name]
    low = c.text.lower()
    if c.kind == "letter":
        return (f"letter {low}", f"capital {low}", f"letter {low}", f"{low}")
    if c.kind == "digit":
        return (f"digit {name}", f"number {name}", f"number {c.text}", f"{c.text}")
    if c.kind == "symbol":
        spoken = name.replace("_", " ")
        return (spoken, spoken, f"{c.text} sign", f"symbol {c.text}")
    if c.kind == "shape":
        return (name, f"{name} shape", name)
    return (f"word {c.text}", f"text {c.text}", f"word {c.text}")


def _pick(options, rng: np.random.Generator) -> str:
    return options[int(rng.integers(len(options)))]


def make_caption(attrs: dict, rng: np.random.Generator) -> str:
    """A random caption for a rendered image's attributes (see :func:`render_glyph`)."""
    name, domain = attrs["concept"], attrs["domain"]
    background = attrs.get("background")
    fields = {
        "adj": _pick(STYLE_ADJECTIVES[domain], rng),
        "phrase": _pick(STYLE_PHRASES[domain], rng).format(font=font_label(attrs["font"] or "")),
        "colour": attrs["colour"],
        "background": {"photo": "a photo", "gradient": "a gradient background"}.get(
            background, f"a {background} background"
        ),
    }
    if rng.random() < UNNAMED_RATE[CONCEPTS[name].kind]:
        return fix_articles(_pick(GENERIC_CAPTIONS, rng).format(**fields))
    fields["noun"] = _pick(nouns(name), rng)
    if name in ATTRIBUTES and rng.random() < ATTRIBUTE_RATE:
        fields["attr"] = _pick(ATTRIBUTES[name], rng)
        return fix_articles(_pick(ATTRIBUTE_TEMPLATES, rng).format(**fields))
    return fix_articles(_pick(TEMPLATES, rng).format(**fields))
