"""Rendering of one digit image in one of the four styles of the embedded ``digits`` world.

Four visibly different domains of the ten digits, all from data that pip packages ship:

- ``handwritten``: scikit-learn's ``load_digits`` (8x8 scans), upsampled smoothly, small affine,
  random foreground/background colours.
- ``printed``: glyphs of the fonts matplotlib bundles, random affine and colours.
- ``textured``: the MNIST-M recipe, ``|photo crop - glyph * 255|`` on scikit-image's bundled
  sample photographs.
- ``outline``: hollow glyphs (dilated glyph minus glyph) on a plain or gradient background.

Fonts, photographs and handwritten scans are split into two disjoint pools by name (``ROLES``):
the ``benchmark`` pool is never used by the ``corpus`` pool, so a CLIP pretrained on the corpus
still meets new fonts, photos and writers in the benchmark. The fonts are listed by name, not
discovered, so every install renders from the same ones (a missing one is an error).
"""

from __future__ import annotations

import functools
import glob
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

DIGIT_WORDS: tuple[str, ...] = (
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
)
DOMAINS: tuple[str, ...] = ("handwritten", "printed", "textured", "outline")
ROLES: tuple[str, ...] = ("benchmark", "corpus")

# Fonts by file stem: every one draws the ten digits with matplotlib 3.8 to 3.11 (cmti10 only
# does from 3.11 on, so it is left out: the corpus must not depend on the matplotlib version).
FONTS: tuple[str, ...] = (
    "DejaVuSans",
    "DejaVuSans-Bold",
    "DejaVuSans-BoldOblique",
    "DejaVuSans-Oblique",
    "DejaVuSansMono",
    "DejaVuSansMono-Bold",
    "DejaVuSansMono-BoldOblique",
    "DejaVuSansMono-Oblique",
    "DejaVuSerif",
    "DejaVuSerif-Bold",
    "DejaVuSerif-BoldItalic",
    "DejaVuSerif-Italic",
    "STIXGeneral",
    "STIXGeneralBol",
    "STIXGeneralBolIta",
    "STIXGeneralItalic",
    "cmb10",
    "cmmi10",
    "cmr10",
    "cmss10",
    "cmtt10",
)
# Fonts reserved for the benchmark; the others are corpus-only.
BENCHMARK_FONTS: tuple[str, ...] = (
    "DejaVuSans-BoldOblique",
    "DejaVuSansMono",
    "DejaVuSerif-Italic",
    "STIXGeneralBol",
    "cmss10",
    "cmtt10",
)
# skimage.data photos that load offline; brick, grass, gravel and moon are left out because
# their mid-grey texture makes |crop - 255| look like the crop and hides the digit.
PHOTOS: tuple[str, ...] = (
    "astronaut",
    "camera",
    "cell",
    "chelsea",
    "clock",
    "coffee",
    "coins",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "rocket",
    "stereo_motorcycle",
)
BENCHMARK_PHOTOS: tuple[str, ...] = ("camera", "coffee", "immunohistochemistry")
HANDWRITTEN_BENCHMARK_FRACTION = 0.25  # share of each class's sklearn scans kept for the benchmark

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 30),
    "orange": (250, 140, 20),
    "purple": (130, 40, 170),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "grey": (128, 128, 128),
    "pink": (245, 130, 190),
    "cyan": (30, 210, 220),
    "brown": (130, 80, 30),
}
_PALETTE_NAMES = tuple(PALETTE)
_PALETTE_RGB = np.array([PALETTE[n] for n in _PALETTE_NAMES], dtype=np.float32)

_AFFINE = {  # (max rotation in degrees, scale range, max shift as a fraction of the size, shear)
    "handwritten": (12.0, (0.85, 1.1), 0.08, 0.15),
    "printed": (18.0, (0.75, 1.15), 0.12, 0.25),
    "textured": (15.0, (0.85, 1.15), 0.10, 0.2),
    "outline": (15.0, (0.8, 1.15), 0.10, 0.2),
}


def _check(digit: int, domain: str, role: str) -> None:
    if not 0 <= int(digit) <= 9:
        raise ValueError(f"digit must be in 0..9, got {digit}")
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; choose one of {DOMAINS}")
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; choose one of {ROLES}")


def _canvas(image_size: int) -> int:
    """Side of the glyph bank canvas: 2x supersampled for small images."""
    return 2 * image_size if image_size <= 64 else image_size


def _render_font(path: str, size: int) -> np.ndarray:
    """The ten digits of a font as float32 [10, size, size] masks, ~60% of the canvas tall."""
    probe = ImageFont.truetype(path, 100)
    box = probe.getbbox("0")
    height = max(box[3] - box[1], 1)
    font = ImageFont.truetype(path, max(4, round(100 * 0.62 * size / height)))
    out = np.zeros((10, size, size), dtype=np.float32)
    for d in range(10):
        page = Image.new("L", (3 * size, 3 * size), 0)
        ImageDraw.Draw(page).text((size, size), str(d), font=font, fill=255)
        arr = np.asarray(page, dtype=np.float32) / 255.0
        ys, xs = np.nonzero(arr > 0.05)
        if len(ys) == 0:
            continue
        glyph = arr[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1][:size, :size]
        top, left = (size - glyph.shape[0]) // 2, (size - glyph.shape[1]) // 2
        out[d, top : top + glyph.shape[0], left : left + glyph.shape[1]] = glyph
    return out


def _descriptor(masks: np.ndarray) -> np.ndarray:
    """Scale-free 12x12 descriptors of glyph masks, for checking a font's digits."""
    out = []
    for m in masks:
        ys, xs = np.nonzero(m > 0.3)
        if len(ys) == 0:
            out.append(np.zeros(144, np.float32))
            continue
        crop = Image.fromarray(m[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1] * 255)
        v = np.asarray(crop.convert("L").resize((12, 12), Image.BILINEAR), np.float32).ravel()
        out.append((v - v.mean()) / (v.std() + 1e-6))
    return np.stack(out)


@functools.lru_cache(maxsize=1)
def usable_fonts() -> dict[str, str]:
    """Matplotlib's bundled fonts whose '0'..'9' really draw the ten digits: stem -> path.

    The check that chose :data:`FONTS` (a test keeps it true); rendering uses the list.

    A font passes when every digit draws something, no two digits look alike and most glyphs
    are nearest (among the ten) to the same digit of DejaVu Sans; symbol fonts and fonts
    without digit glyphs fail.
    """
    import matplotlib

    ttf_dir = os.path.join(matplotlib.get_data_path(), "fonts", "ttf")
    paths = {Path(p).stem: p for p in sorted(glob.glob(os.path.join(ttf_dir, "*.ttf")))}
    reference = _descriptor(_render_font(paths["DejaVuSans"], 48))
    fonts = {}
    for stem, path in paths.items():
        try:
            masks = _render_font(path, 48)
        except OSError:
            continue
        if (masks.reshape(10, -1).max(axis=1) < 0.5).any():
            continue
        desc = _descriptor(masks)
        unit = desc / np.linalg.norm(desc, axis=1, keepdims=True)
        twins = (unit @ unit.T)[~np.eye(10, dtype=bool)].max()
        hits = (np.argmax(desc @ reference.T, axis=1) == np.arange(10)).sum()
        if twins < 0.95 and hits >= 6:  # slanted fonts confuse a few digits, symbol fonts most
            fonts[stem] = path
    return fonts


@functools.lru_cache(maxsize=1)
def font_paths() -> dict[str, str]:
    """Stem -> path of every font in :data:`FONTS`, from matplotlib's bundled fonts."""
    import matplotlib

    ttf_dir = os.path.join(matplotlib.get_data_path(), "fonts", "ttf")
    paths = {stem: os.path.join(ttf_dir, f"{stem}.ttf") for stem in FONTS}
    missing = sorted(stem for stem, path in paths.items() if not os.path.isfile(path))
    if missing:
        raise FileNotFoundError(
            f"matplotlib {matplotlib.__version__} lacks the font(s) {', '.join(missing)} that "
            f"the digits world draws with; install matplotlib>=3.8"
        )
    return paths


@functools.lru_cache(maxsize=1)
def font_pools() -> dict[str, tuple[str, ...]]:
    """Font stems per role, in file-name order; the two pools are disjoint."""
    fonts = sorted(FONTS, key=lambda stem: f"{stem}.ttf")
    bench = tuple(f for f in fonts if f in BENCHMARK_FONTS)
    return {"benchmark": bench, "corpus": tuple(f for f in fonts if f not in BENCHMARK_FONTS)}


@functools.lru_cache(maxsize=1)
def photo_pools() -> dict[str, tuple[str, ...]]:
    """Photo names (``skimage.data`` functions) per role; the two pools are disjoint."""
    bench = tuple(p for p in PHOTOS if p in BENCHMARK_PHOTOS)
    return {"benchmark": bench, "corpus": tuple(p for p in PHOTOS if p not in BENCHMARK_PHOTOS)}


@functools.lru_cache(maxsize=1)
def _handwritten() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    data = load_digits()
    return data.images.astype(np.float32) / 16.0, data.target.astype(np.int64)


@functools.lru_cache(maxsize=1)
def handwritten_pools() -> dict[str, tuple[np.ndarray, ...]]:
    """Per role, per digit, the sklearn ``load_digits`` indices it may use (disjoint)."""
    _, target = _handwritten()
    order = np.random.default_rng(20240531).permutation(len(target))
    pools: dict[str, list[np.ndarray]] = {"benchmark": [], "corpus": []}
    for d in range(10):
        idx = order[target[order] == d]
        k = int(round(HANDWRITTEN_BENCHMARK_FRACTION * len(idx)))
        pools["benchmark"].append(np.sort(idx[:k]))
        pools["corpus"].append(np.sort(idx[k:]))
    return {role: tuple(p) for role, p in pools.items()}


@functools.lru_cache(maxsize=4)
def _handwritten_bank(size: int) -> list[Image.Image]:
    """All sklearn scans smoothly upsampled to [size, size] stroke masks (PIL 'L' images)."""
    images, _ = _handwritten()
    padded = np.pad(images, ((0, 0), (2, 2), (2, 2)))
    up = np.stack(
        [np.asarray(Image.fromarray(im, "F").resize((size, size), Image.BICUBIC)) for im in padded]
    )
    masks = np.clip((up - 0.2) / 0.5, 0.0, 1.0)
    return [Image.fromarray(m) for m in np.round(masks * 255).astype(np.uint8)]


@functools.lru_cache(maxsize=64)
def _font_bank(font: str, size: int) -> tuple[list[Image.Image], list[list[Image.Image]]]:
    """(10 glyph masks, 2 ring widths x 10 hollow-ring masks) of one font, PIL 'L' images."""
    from scipy.ndimage import grey_dilation

    glyphs = _render_font(font_paths()[font], size)
    rings = []
    for radius in (max(1, size // 24), max(2, size // 14)):
        yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
        disk = (yy**2 + xx**2) <= radius**2
        dilated = grey_dilation(glyphs, footprint=disk[None])
        rings.append(to_pil(np.clip(dilated - glyphs, 0.0, 1.0)))
    return to_pil(glyphs), rings


def to_pil(masks: np.ndarray) -> list[Image.Image]:
    return [Image.fromarray(m) for m in np.round(masks * 255).astype(np.uint8)]


@functools.lru_cache(maxsize=32)
def photo_levels(name: str, image_size: int) -> tuple[np.ndarray, ...]:
    """A bundled photo as RGB uint8 at three scales, short side ~2x, 4x and 8x ``image_size``."""
    import skimage.data

    img = getattr(skimage.data, name)()
    img = img[0] if isinstance(img, tuple) else img
    img = np.asarray(img)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    pil = Image.fromarray(img[..., :3].astype(np.uint8))
    levels = []
    for factor in (2, 4, 8):
        short = max(image_size, min(factor * image_size, min(pil.size)))
        scale = short / min(pil.size)
        w, h = max(image_size, round(pil.width * scale)), max(image_size, round(pil.height * scale))
        levels.append(np.asarray(pil.resize((w, h), Image.BILINEAR)))
    return tuple(levels)


def warp_mask(src: Image.Image, domain: str, rng: np.random.Generator, out: int) -> np.ndarray:
    """Random affine of a [R, R] mask into a float32 [out, out] mask in [0, 1]."""
    max_rot, (lo, hi), max_shift, max_shear = _AFFINE[domain]
    size = src.size[0]
    theta = np.deg2rad(rng.uniform(-max_rot, max_rot))
    scale = rng.uniform(lo, hi)
    aspect = rng.uniform(0.9, 1.1)
    shear = rng.uniform(-max_shear, max_shear)
    shift = rng.uniform(-max_shift, max_shift, size=2) * size
    # forward = rotation @ [[s * aspect, shear * s], [0, s / aspect]]; PIL wants its inverse
    cos, sin = np.cos(theta), np.sin(theta)
    a, b, d = scale * aspect, shear * scale, scale / aspect
    f00, f01, f10, f11 = cos * a, cos * b - sin * d, sin * a, sin * b + cos * d
    k = (size / out) / (f00 * f11 - f01 * f10)  # output pixel -> source pixel
    i00, i01, i10, i11 = f11 * k, -f01 * k, -f10 * k, f00 * k
    half = out / 2
    c0 = size / 2 + shift[0] - (i00 + i01) * half
    c1 = size / 2 + shift[1] - (i10 + i11) * half
    warped = src.transform((out, out), Image.AFFINE, (i00, i01, c0, i10, i11, c1), Image.BILINEAR)
    return np.asarray(warped, dtype=np.float32) * (1.0 / 255.0)


_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def colour_name(rgb: np.ndarray) -> str:
    """The nearest named colour in :data:`PALETTE` (Euclidean distance in RGB)."""
    dist = ((_PALETTE_RGB - np.asarray(rgb, np.float32)) ** 2).sum(axis=1)
    return _PALETTE_NAMES[int(dist.argmin())]


def random_foreground(rng: np.random.Generator) -> np.ndarray:
    base = _PALETTE_RGB[rng.integers(len(_PALETTE_NAMES))]
    return np.clip(base + rng.uniform(-20, 20, size=3), 0, 255).astype(np.float32)


def random_background(fg: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random colour whose luminance differs from ``fg`` enough to keep the digit legible."""
    cand = rng.uniform(0, 255, size=(32, 3)).astype(np.float32)
    ok = (np.abs((cand - fg) @ _LUMA) >= 80) & (((cand - fg) ** 2).sum(axis=1) >= 120**2)
    if ok.any():
        return cand[int(ok.argmax())]
    return np.full(3, 0.0 if fg @ _LUMA > 127 else 255.0, dtype=np.float32)


def render_digit(
    digit: int,
    domain: str,
    rng: np.random.Generator,
    *,
    image_size: int = 32,
    role: str = "benchmark",
) -> tuple[np.ndarray, dict]:
    """Draw one digit in one domain style from the ``role``'s pool of fonts/photos/scans.

    Returns:
        A uint8 [image_size, image_size, 3] image and its attributes: ``digit``, ``domain``,
        ``role``, ``colour`` (palette name of the glyph's colour), ``background`` (a palette
        name, ``"gradient"`` or ``"photo"``), ``font``, ``photo`` and ``sample_index``
        (the sklearn scan), each ``None`` where the domain does not use it.
    """
    _check(digit, domain, role)
    size = _canvas(image_size)
    attrs: dict = {
        "digit": int(digit),
        "domain": domain,
        "role": role,
        "font": None,
        "photo": None,
        "sample_index": None,
    }
    if domain == "handwritten":
        index = int(rng.choice(handwritten_pools()[role][digit]))
        attrs["sample_index"] = index
        src = _handwritten_bank(size)[index]
    else:
        pool = font_pools()[role]
        font = pool[int(rng.integers(len(pool)))]
        attrs["font"] = font
        glyphs, rings = _font_bank(font, size)
        src = rings[int(rng.integers(2))][digit] if domain == "outline" else glyphs[digit]
    mask = warp_mask(src, domain, rng, image_size)
    img, painted = paint(mask, domain, rng, role=role)
    attrs.update(painted)
    return img, attrs


def paint(
    mask: np.ndarray, domain: str, rng: np.random.Generator, *, role: str = "benchmark"
) -> tuple[np.ndarray, dict]:
    """Colour a float32 [S, S] glyph mask in a domain's style (shared by every embedded world).

    ``textured`` blends it into a crop of one of the role's photos (MNIST-M's |crop - glyph|);
    the others draw it in a palette colour on a plain background (``outline`` on a gradient half
    the time, ``handwritten`` with paper grain).

    Returns:
        the uint8 [S, S, 3] image and its ``colour``, ``background`` and ``photo`` attributes.
    """
    image_size = mask.shape[0]
    mask = mask[..., None]
    attrs: dict = {"photo": None}

    if domain == "textured":
        pool = photo_pools()[role]
        photo = pool[int(rng.integers(len(pool)))]
        level = photo_levels(photo, image_size)[int(rng.integers(3))]
        ys = rng.integers(level.shape[0] - image_size + 1, size=4)
        xs = rng.integers(level.shape[1] - image_size + 1, size=4)
        crops = [level[y : y + image_size, x : x + image_size] for y, x in zip(ys, xs, strict=True)]
        # of four crops keep the one whose mean colour is farthest from mid-grey, where
        # |crop - 255| and crop look alike and the digit would vanish
        crop = max(crops, key=lambda c: np.abs(c.mean(axis=(0, 1)) - 127.5).sum())
        crop = crop.astype(np.float32)
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        img = np.abs(crop - mask * 255.0)
        glyph_px = img[mask[..., 0] > 0.5]
        fg = glyph_px.mean(axis=0) if len(glyph_px) else img.reshape(-1, 3).mean(axis=0)
        attrs.update(photo=photo, background="photo")
    else:
        fg = random_foreground(rng)
        bg = random_background(fg, rng)
        attrs["background"] = colour_name(bg)
        if domain == "outline" and rng.random() < 0.5:
            bg2 = random_background(fg, rng)
            angle = rng.uniform(0, 2 * np.pi)
            yy, xx = np.mgrid[0:image_size, 0:image_size] / max(image_size - 1, 1) - 0.5
            t = np.clip(np.cos(angle) * xx + np.sin(angle) * yy + 0.5, 0, 1)[..., None]
            bg = bg * (1 - t) + bg2 * t
            attrs["background"] = "gradient"
        img = bg * (1 - mask) + fg * mask
        if domain == "handwritten":  # scanned-paper grain
            img = img + rng.normal(0, 6, size=img.shape[:2])[..., None]
    attrs["colour"] = colour_name(fg)
    return np.clip(np.round(img), 0, 255).astype(np.uint8), attrs
