"""Captions for the pretraining corpus: each names the digit, its style and often its colour."""

from __future__ import annotations

import re

import numpy as np

from seeclip.datasets.digits.render import DIGIT_WORDS

# Adjectives and trailing phrases naming each style; STYLE_KEYWORDS finds the style in a caption.
STYLE_ADJECTIVES: dict[str, tuple[str, ...]] = {
    "handwritten": ("handwritten", "hand-drawn"),
    "printed": ("printed", "typeset"),
    "textured": ("textured",),
    "outline": ("outline", "hollow", "outlined"),
}
STYLE_PHRASES: dict[str, tuple[str, ...]] = {
    "handwritten": ("written by hand", "drawn by hand"),
    "printed": ("in a printed font", "typeset in {font}"),
    "textured": ("on a photo background", "on a textured photo background"),
    "outline": ("drawn in outline", "with a hollow outline"),
}
STYLE_KEYWORDS: dict[str, tuple[str, ...]] = {
    "handwritten": ("handwritten", "hand-drawn", "by hand"),
    "printed": ("printed", "typeset"),
    "textured": ("textured", "photo background"),
    "outline": ("outline", "hollow"),
}
CAPTION_TEMPLATES: tuple[str, ...] = (
    "a {adj} digit {word}",
    "a {adj} {word}",
    "the number {num} in {colour}, {adj}",
    "a photo of the {adj} digit {word}",
    "a photo of the number {num}, {adj}",
    "the digit {word} ({num}), {adj}",
    "a {colour} {adj} {num}",
    "{word}: a {adj} numeral",
    "an image of a {colour} {word} {phrase}",
    "the numeral {num} {phrase}",
    "a {colour} digit {word} {phrase}",
    "the number {word}, {phrase}",
    "a {adj} number {num} on {background}",
    "{num}, a {adj} {word} in {colour}",
)


def fix_articles(text: str) -> str:
    """Fix 'a' before vowel sounds ('an outline', 'an eight'; 'a one' stays)."""
    return re.sub(r"\b([Aa]) (?=(?!one\b)[aeiou])", r"\1n ", text)


_CM_NAMES = {
    "cmr10": "Roman",
    "cmb10": "Bold",
    "cmti10": "Italic",
    "cmss10": "Sans",
    "cmtt10": "Typewriter",
    "cmmi10": "Math Italic",
}


def font_label(stem: str) -> str:
    """A readable font name without digits ('cmr10' -> 'Computer Modern Roman')."""
    if stem in _CM_NAMES:
        return f"Computer Modern {_CM_NAMES[stem]}"
    words = re.sub(r"(?<=[a-z])(?=[A-Z])|-", " ", stem.replace("DejaVu", "Dejavu")).split()
    names = {"Dejavu": "DejaVu", "STIXGeneral": "STIX", "Bol": "Bold", "Ita": "Italic"}
    return " ".join(names.get(w, w) for w in words) or "a plain font"


def make_caption(attrs: dict, rng: np.random.Generator) -> str:
    """A random caption naming the digit (word and/or numeral), its style and often its colour."""
    domain = attrs["domain"]
    template = CAPTION_TEMPLATES[int(rng.integers(len(CAPTION_TEMPLATES)))]
    adjs, phrases = STYLE_ADJECTIVES[domain], STYLE_PHRASES[domain]
    word = DIGIT_WORDS[attrs["digit"]]
    fields = {
        "adj": adjs[int(rng.integers(len(adjs)))],
        "phrase": phrases[int(rng.integers(len(phrases)))],
        "word": word,
        "num": str(attrs["digit"]),
        "colour": attrs["colour"],
    }
    background = attrs.get("background")
    fields["background"] = {"photo": "a photo", "gradient": "a gradient background"}.get(
        background, f"a {background} background"
    )
    fields["phrase"] = fields["phrase"].format(font=font_label(attrs.get("font") or ""))
    return fix_articles(template.format(**fields))
