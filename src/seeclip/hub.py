"""Finding pretrained CLIP weights locally first, and failing fast when offline.

open_clip would otherwise try the network (with retries and long timeouts) before saying
anything useful. Here: a cached file is used directly; when nothing is cached and the hub is
unreachable (``HF_HUB_OFFLINE`` set, or a 3-second connection probe fails) we raise at once
with instructions.
"""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path
from urllib.parse import urlparse

import open_clip

_PROBE_TIMEOUT_S = 3.0
# pretrained-cfg key -> create_model_and_transforms keyword
_PREPROCESS_KWARGS = {
    "mean": "image_mean",
    "std": "image_std",
    "interpolation": "image_interpolation",
    "resize_mode": "image_resize_mode",
}
_HF_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights are neither in a local cache nor downloadable right now."""


def hf_cache_dir() -> Path:
    """huggingface_hub's cache folder, read from the environment at call time."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface"
    )
    return Path(home).expanduser() / "hub"


def _offline_env() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _hf_endpoint_host() -> str:
    try:
        from huggingface_hub import constants

        return urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    except ImportError:  # pragma: no cover - huggingface_hub ships with open_clip
        return "huggingface.co"


def _probe(host: str, port: int = 443) -> str | None:
    """None when ``host`` (or the configured HTTPS proxy) accepts a TCP connection, else why not.

    Runs in a daemon thread so that a hanging DNS lookup cannot exceed the timeout either.
    """
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    if proxy:
        parsed = urlparse(proxy if "://" in proxy else f"http://{proxy}")
        host, port = parsed.hostname or host, parsed.port or 80
    result: list[str | None] = ["timed out"]

    def connect() -> None:
        try:
            socket.create_connection((host, port), timeout=_PROBE_TIMEOUT_S).close()
            result[0] = None
        except OSError as err:
            result[0] = f"{type(err).__name__}: {err}"

    worker = threading.Thread(target=connect, daemon=True)
    worker.start()
    worker.join(_PROBE_TIMEOUT_S + 0.5)
    return result[0] if not worker.is_alive() else f"no answer from {host} in {_PROBE_TIMEOUT_S}s"


def _require_network(what: str, host: str, cache: Path) -> None:
    reason = "HF_HUB_OFFLINE is set" if _offline_env() else _probe(host)
    if reason is None:
        return
    raise WeightsUnavailableError(
        f"could not load {what}: not in the local cache and the network is unreachable "
        f"({reason}). Download them on a connected machine (they are cached under {cache}) "
        "or pass --pretrained /path/to/checkpoint.safetensors"
    )


def cached_hf_file(repo_id: str, filenames: list[str]) -> str | None:
    """The first of ``filenames`` of ``repo_id`` in the local Hugging Face cache (no network)."""
    from huggingface_hub import try_to_load_from_cache

    for filename in filenames:
        path = try_to_load_from_cache(repo_id, filename, cache_dir=str(hf_cache_dir()))
        if isinstance(path, str) and os.path.isfile(path):
            return path
    return None


def _hub_filenames(filename: str) -> list[str]:
    """The file names open_clip would try for one hub entry, safetensors first."""
    if not filename:
        return list(_HF_WEIGHTS)
    if filename.endswith((".bin", ".pth")):
        return [filename[:-4] + ".safetensors", filename]
    return [filename]


def resolve_tag(arch: str, tag: str) -> dict:
    """Keyword arguments for ``open_clip.create_model_and_transforms`` loading ``tag``.

    A cached file is passed as a path (no network access at all); the tag's preprocessing and
    QuickGELU setting are passed explicitly so that they survive that substitution.
    """
    cfg = open_clip.get_pretrained_cfg(arch, tag)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(arch)
        known = ", ".join(tags) if tags else "none (pass a local checkpoint file)"
        raise ValueError(f"unknown pretrained tag {tag!r} for {arch}; known tags: {known}")
    kwargs = {arg: cfg[key] for key, arg in _PREPROCESS_KWARGS.items() if key in cfg}
    kwargs["force_quick_gelu"] = bool(cfg.get("quick_gelu", False))
    what = f"pretrained weights {tag!r} for {arch}"
    if cfg.get("file"):
        return {**kwargs, "pretrained": cfg["file"]}
    hub_id = cfg.get("hf_hub", "")
    if hub_id:
        repo_id, filename = os.path.split(hub_id)
        path = cached_hf_file(repo_id, _hub_filenames(filename))
        if path:
            return {**kwargs, "pretrained": path}
        _require_network(what, _hf_endpoint_host(), hf_cache_dir())
        return {**kwargs, "pretrained": tag}
    url = cfg.get("url", "")
    cached = Path("~/.cache/clip").expanduser() / os.path.basename(url)
    if cached.is_file():
        return {**kwargs, "pretrained": str(cached)}
    _require_network(what, urlparse(url).hostname or "", cached.parent)
    return {**kwargs, "pretrained": tag}


def resolve_hf_hub_name(name: str) -> str:
    """``hf-hub:org/repo`` -> ``local-dir:<cached snapshot>`` when config and weights are cached."""
    repo_id = name[len("hf-hub:") :]
    config = cached_hf_file(repo_id, ["open_clip_config.json"])
    weights = cached_hf_file(repo_id, list(_HF_WEIGHTS))
    if config and weights and Path(config).parent == Path(weights).parent:
        return f"local-dir:{Path(config).parent}"
    _require_network(f"model {name}", _hf_endpoint_host(), hf_cache_dir())
    return name
