"""Where seeclip keeps generated data, manifests and feature caches."""

from __future__ import annotations

import os
from pathlib import Path


def seeclip_home() -> Path:
    """The root of seeclip's working files: ``$SEECLIP_HOME`` or ``~/.cache/seeclip``."""
    env = os.environ.get("SEECLIP_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "seeclip"


# Folders that archivers and file managers add next to the data: never a domain or a class.
JUNK_FOLDERS = frozenset({"__MACOSX", "$RECYCLE.BIN", "System Volume Information"})


def data_folders(path: Path) -> dict[str, Path]:
    """The sub-folders of ``path`` that can hold data, by name, sorted: hidden folders (``.x``)
    and archiver leftovers (``__MACOSX``, see :data:`JUNK_FOLDERS`) are left out."""
    return {
        p.name: p
        for p in sorted(Path(path).iterdir())
        if p.is_dir() and not p.name.startswith(".") and p.name not in JUNK_FOLDERS
    }
