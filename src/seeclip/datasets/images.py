"""Image files as a torch Dataset: PIL loading plus a backbone's preprocessing."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from torch import Tensor
from torch.utils.data import Dataset

# what `seeclip prepare` lists as images and `seeclip predict` picks up from a folder
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})


# how an image file becomes pixels (part of the feature cache's key: a change re-encodes)
LOADER = "rgb, exif orientation applied"


class ImageReadError(RuntimeError):
    """An image file could not be decoded."""


def to_rgb(img: Image.Image) -> Image.Image:
    """``img`` as 8-bit RGB with its real values.

    PIL's ``convert("RGB")`` clips 16- and 32-bit greyscale (modes ``I;16*``, ``I``) at 255, so
    a 16-bit PNG would come out all white; those are rescaled from their bit depth instead
    (``I``: 16-bit if any value exceeds 255), and float images (``F``) from [0, 1] when they
    lie in it, else clipped to [0, 255].
    """
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        a = np.asarray(img, dtype=np.float64)
        if img.mode == "F":
            scale = 255.0 if a.size and a.min() >= 0.0 and a.max() <= 1.0 else 1.0
        else:
            scale = 255.0 / 65535.0 if img.mode != "I" or (a.size and a.max() > 255) else 1.0
        a = np.clip(np.rint(a * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(a).convert("RGB")  # uint8 [H, W]: mode L
    return img.convert("RGB")


def load_image(path: Path) -> Image.Image:
    """Opens ``path`` as RGB, upright as a viewer shows it (a camera's EXIF orientation is
    applied), with an error that names the file and the fix."""
    try:
        with Image.open(path) as img:
            return to_rgb(ImageOps.exif_transpose(img))
    except FileNotFoundError as err:
        raise ImageReadError(
            f"image {path} is gone since `seeclip prepare` listed it; rerun `seeclip prepare` "
            "for this data root to list the images that are there now"
        ) from err
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise ImageReadError(
            f"cannot read image {path}: {err}. Rerun `seeclip prepare ... --skip-corrupt` "
            "to drop unreadable files from the dataset manifest"
        ) from err


class ImageFiles(Dataset):
    """``root / rel_paths[i]`` loaded with PIL and passed through ``transform``.

    Items are tensors only; their order is the order of ``rel_paths``.
    """

    def __init__(
        self, root: Path, rel_paths: Sequence[str], transform: Callable[[Image.Image], Tensor]
    ) -> None:
        self.root = Path(root)
        self.rel_paths = list(rel_paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.rel_paths)

    def __getitem__(self, index: int) -> Tensor:
        return self.transform(load_image(self.root / self.rel_paths[index]))
