"""Where seeclip keeps generated data, manifests and feature caches."""

from __future__ import annotations

import os
from pathlib import Path


def seeclip_home() -> Path:
    """The root of seeclip's working files: ``$SEECLIP_HOME`` or ``~/.cache/seeclip``."""
    env = os.environ.get("SEECLIP_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "seeclip"
