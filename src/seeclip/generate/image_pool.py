"""The offline pool of image-space pseudo-unknowns on disk: generating, resuming and reading it.

Layout: ``out_dir/<domain>/unknown/<i:06d>.png``, ``manifest.csv`` and ``pool.json``.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from tqdm import tqdm

from seeclip.datasets.images import to_rgb
from seeclip.generate.sd_conditioning import (
    build_conditioning,
    domain_prompt,
    known_classes_prompt,
    token_projection,
)
from seeclip.generate.sd_pipeline import ImageDiffusionConfig, pipeline_device, pipeline_name
from seeclip.io import write_json, write_text, write_with

__all__ = [
    "MANIFEST_FIELDS",
    "POOL_FORMAT",
    "ImagePool",
    "generate_image_pool",
    "load_image_pool",
    "sample_images",
]

POOL_FORMAT = 1
MANIFEST_FIELDS = (
    "path",
    "domain",
    "source",
    "prompt",
    "negative_prompt",
    "seed",
    "sigma",
    "guidance",
    "steps",
    "model",
)


@dataclass(frozen=True)
class ImagePool:
    """A generated pool: image paths relative to ``root`` (feed them to the feature cache)."""

    root: Path
    paths: tuple[str, ...]
    domains: tuple[str, ...]
    sources: tuple[str, ...]  # id of the source image each pseudo-unknown was derived from


def load_image_pool(manifest: Path | str) -> ImagePool:
    """Reads a pool's ``manifest.csv`` (or the folder holding it)."""
    path = Path(manifest)
    path = path / "manifest.csv" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"no image pool manifest at {path}; run `seeclip generate` first")
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    return ImagePool(
        path.parent,
        tuple(r["path"] for r in rows),
        tuple(r["domain"] for r in rows),
        tuple(r["source"] for r in rows),
    )


def _derive_seed(seed: int, i: int, stream: str) -> int:
    digest = hashlib.sha256(f"{seed}\0{i}\0{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _fingerprint(
    pipe,
    tokens: Tensor,
    domains,
    sources,
    negative: str,
    cfg,
    seed: int,
    projection: Tensor,
    init_images=None,
) -> str:
    h = hashlib.sha256()
    for image in init_images or ():
        h.update(np.asarray(image).tobytes())
    h.update(tokens.detach().float().cpu().contiguous().numpy().tobytes())
    if cfg.projection != "random":  # the random map is a function of cfg; others are not
        h.update(projection.contiguous().numpy().tobytes())
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "batch_size"}
    if settings.get("strength") == 1.0:  # text-to-image: pools made before the option keep theirs
        settings.pop("strength")
    blob = [list(tokens.shape), list(domains), list(sources), negative, settings, seed]
    h.update(json.dumps([blob, pipeline_name(pipe)], sort_keys=True).encode())
    return h.hexdigest()


def generate_image_pool(
    pipe,
    semantic_tokens: Tensor,
    domains: Sequence[str],
    source_ids: Sequence[str],
    known_class_names: Sequence[str],
    *,
    out_dir: Path | str,
    cfg: ImageDiffusionConfig | None = None,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    projection: Tensor | None = None,
    init_images: Sequence | None = None,
) -> Path:
    """Generates one pseudo-unknown image per row of ``semantic_tokens``; returns the manifest.

    Row i's tokens v_i are perturbed, v~_i = v_i + eps with eps ~ N(0, sigma^2 I) seeded by
    (seed, i), and condition SD with :func:`~seeclip.generate.sd_conditioning.build_conditioning`
    ("a <domain> of an unknown object" + the projected tokens against the known class names);
    the latents are seeded by (seed, i) too. Every image depends only on (seed, i, its tokens,
    its domain), so an interrupted run resumes where it stopped.

    Args:
        pipe: a ``StableDiffusionPipeline`` (:func:`~seeclip.generate.sd_pipeline.load_pipeline`,
            or :func:`seeclip.testing.build_tiny_pipeline` in tests).
        semantic_tokens: clean semantic tokens [n, K, d] of n source images (CLIP joint space).
        domains: source domain of each row (fills the positive prompt; the image's domain).
        source_ids: id of each row's source image (e.g. its manifest path), recorded only.
        known_class_names: the known classes, joined into the negative prompt.
        out_dir: the pool folder; an unfinished pool with the same inputs is resumed.
        cfg: sampling settings (None: the defaults).
        seed: row i uses seeds derived from (seed, i) for its perturbation and its latents.
        overwrite: replace a pool in ``out_dir`` that was made from other inputs.
        progress: show a tqdm bar.
        projection: the map P [d, D] of the tokens into the text conditioning
            (:func:`~seeclip.generate.sd_conditioning.conditioning_projection`); None: the
            seeded random map of ``cfg.projection_seed`` (``cfg.projection`` must be "random").
        init_images: with ``cfg.strength < 1`` (SDEdit), row i's source image (PIL or uint8
            array [H, W, 3]), noised to ``strength`` of the schedule and denoised from there.

    Returns:
        ``out_dir / "manifest.csv"`` with columns :data:`MANIFEST_FIELDS`, written last.
    """
    cfg = cfg if cfg is not None else ImageDiffusionConfig()
    tokens = semantic_tokens.detach().float().cpu()
    n = tokens.shape[0]
    if tokens.dim() != 3 or tokens.shape[1] < 1:
        raise ValueError(f"semantic_tokens must be [n, K >= 1, d], got {tuple(tokens.shape)}")
    if len(domains) != n or len(source_ids) != n:
        raise ValueError(f"{n} token rows but {len(domains)} domains, {len(source_ids)} sources")
    if not known_class_names:
        raise ValueError("known_class_names is empty: the negative prompt needs the known classes")
    width = pipe.text_encoder.config.hidden_size
    if projection is None:
        if cfg.projection != "random":
            raise ValueError(
                f"projection={cfg.projection!r} needs its matrix: pass projection="
                "conditioning_projection(cfg, pipe, backbone)"
            )
        projection = token_projection(tokens.shape[2], width, seed=cfg.projection_seed)
    projection = projection.detach().float().cpu()
    if tuple(projection.shape) != (tokens.shape[2], width):
        raise ValueError(
            f"projection must be [{tokens.shape[2]}, {width}], got {tuple(projection.shape)}"
        )
    if cfg.strength < 1.0 and (init_images is None or len(init_images) != n):
        raise ValueError(
            f"strength {cfg.strength} < 1 (SDEdit) needs init_images, one source "
            f"image per token row ({n})"
        )
    out = Path(out_dir)
    negative = known_classes_prompt(known_class_names)
    inits = init_images if cfg.strength < 1.0 else None
    fingerprint = _fingerprint(
        pipe, tokens, domains, source_ids, negative, cfg, seed, projection, inits
    )
    manifest = out / "manifest.csv"
    _claim(out, fingerprint, overwrite, _pool_meta(pipe, tokens, cfg, seed, negative, fingerprint))
    if manifest.is_file():
        return manifest

    model = pipeline_name(pipe)
    rel = [f"{d}/unknown/{i:06d}.png" for i, d in enumerate(domains)]
    todo = [i for i in range(n) if not (out / rel[i]).is_file()]
    for d in sorted(set(domains)):
        (out / d / "unknown").mkdir(parents=True, exist_ok=True)
    with tqdm(
        total=n, initial=n - len(todo), desc="generating", unit="img", disable=not progress
    ) as bar:
        for start in range(0, len(todo), cfg.batch_size):
            batch = todo[start : start + cfg.batch_size]
            clean = tokens[batch]
            noise = torch.stack(
                [
                    torch.randn(
                        clean.shape[1:],
                        generator=torch.Generator().manual_seed(_derive_seed(seed, i, "tokens")),
                    )
                    for i in batch
                ]
            )
            images = sample_images(
                pipe,
                clean,
                noise,
                [domains[i] for i in batch],
                negative,
                cfg=cfg,
                projection=projection,
                latent_seeds=[_derive_seed(seed, i, "latents") for i in batch],
                init_images=None if inits is None else [inits[i] for i in batch],
            )
            for i, image in zip(batch, images, strict=True):
                write_with(out / rel[i], lambda tmp, image=image: image.save(tmp, format="PNG"))
            bar.update(len(batch))

    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(MANIFEST_FIELDS)
    for i in range(n):
        row = (rel[i], domains[i], source_ids[i], domain_prompt(cfg, domains[i]), negative)
        writer.writerow(
            (*row, _derive_seed(seed, i, "latents"), cfg.sigma, cfg.guidance, cfg.steps, model)
        )
    write_text(manifest, text.getvalue())
    return manifest


def sample_images(
    pipe,
    clean: Tensor,
    noise: Tensor,
    domains: Sequence[str],
    negative: str,
    *,
    cfg: ImageDiffusionConfig,
    projection: Tensor,
    latent_seeds: Sequence[int],
    init_images: Sequence | None = None,
) -> list[Image.Image]:
    """One pipeline call: B images from clean semantic tokens [B, K, d] perturbed by
    ``cfg.sigma * noise``, against the ``negative`` prompt, each latent seeded by its own seed.

    The one sampling step of both generators: the offline pool (:func:`generate_image_pool`)
    and the online one that follows the model in training (:mod:`seeclip.pseudo.sd_online`).
    ``init_images`` (with ``cfg.strength`` < 1): SDEdit from these images, one per row.
    """
    pos, neg = build_conditioning(
        pipe,
        clean + cfg.sigma * noise,
        clean,
        domains,
        negative,
        cfg=cfg,
        projection=projection,
    )
    device = pipeline_device(pipe)
    common = dict(
        prompt_embeds=pos,
        negative_prompt_embeds=neg,
        guidance_scale=cfg.guidance,
        num_inference_steps=cfg.steps,
        generator=[torch.Generator(device).manual_seed(int(s)) for s in latent_seeds],
    )
    if init_images is None:
        size = cfg.image_size
        return pipe(**common, height=size, width=size).images
    start_from = [_as_pil(image, cfg.image_size) for image in init_images]
    return _img2img(pipe)(**common, image=start_from, strength=cfg.strength).images


def _img2img(pipe):
    """The SDEdit pipeline sharing ``pipe``'s modules (built once per pipe)."""
    if not hasattr(pipe, "_seeclip_img2img"):
        from diffusers import StableDiffusionImg2ImgPipeline

        pipe._seeclip_img2img = StableDiffusionImg2ImgPipeline(**pipe.components)
        pipe._seeclip_img2img.set_progress_bar_config(disable=True)
    return pipe._seeclip_img2img


def _as_pil(image, size: int | None) -> Image.Image:
    pil = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    pil = to_rgb(pil)
    return pil if size is None or pil.size == (size, size) else pil.resize((size, size))


def _pool_meta(pipe, tokens: Tensor, cfg, seed: int, negative: str, fingerprint: str) -> dict:
    norm = float(tokens.norm(dim=-1).mean())
    return {
        "format": POOL_FORMAT,
        "fingerprint": fingerprint,
        "model": pipeline_name(pipe),
        "seed": seed,
        "n": int(tokens.shape[0]),
        "tokens": {"k": int(tokens.shape[1]), "d": int(tokens.shape[2]), "mean_norm": norm},
        # ||sigma * eps|| / ||v|| on average: how far the perturbation moves a token
        "noise_to_signal": cfg.sigma * tokens.shape[2] ** 0.5 / max(norm, 1e-12),
        "conditioning_width": int(pipe.text_encoder.config.hidden_size),
        "negative_prompt": negative,
        "config": dataclasses.asdict(cfg),
        "projection": {
            "random": "seeded semi-orthogonal d->D map, norm-matched to the prompt's tokens",
            "text_inverse": "pseudo-inverse of the backbone's text projection, norm-matched to "
            "the prompt's tokens",
        }[cfg.projection],
    }


def _claim(out: Path, fingerprint: str, overwrite: bool, meta: dict[str, Any]) -> None:
    """Makes ``out`` this pool's folder: new, resumed (same inputs), or replaced (overwrite)."""
    sidecar = out / "pool.json"
    if sidecar.is_file():
        old = json.loads(sidecar.read_text()).get("fingerprint")
        if old == fingerprint:
            return
        if not overwrite:
            raise FileExistsError(
                f"{out} holds a pool made from other inputs or settings; choose another "
                "folder or pass overwrite=True (--overwrite) to replace it"
            )
        shutil.rmtree(out)
    elif out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not an image pool; choose an empty folder")
    out.mkdir(parents=True, exist_ok=True)
    write_json(sidecar, meta, indent=1)
