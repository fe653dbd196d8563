"""Image files as a torch Dataset: PIL loading plus a backbone's preprocessing."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset


class ImageReadError(RuntimeError):
    """An image file could not be decoded."""


def load_image(path: Path) -> Image.Image:
    """Opens ``path`` as RGB, with an error that names the file and the fix."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as err:
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
