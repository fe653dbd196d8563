"""Image-space semantic-guided diffusion as a pseudo-unknown source, run on demand (docs/method.md).

The paper's generator: for source images of each domain, K semantic summaries of their spatial
tokens are perturbed (sigma) and projected into a text-to-image model's text conditioning, with
"a <domain> of an unknown object" as the positive prompt and the known class names as the
negative one, at guidance g. The images go through the CLIP like any data. The pool is made
once per (source features, settings, model, seed) under ``<cache root>/pools/images/`` and
resumed if interrupted; ``seeclip generate --backend image`` writes the same pools ahead of time.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import torch

from seeclip import distributed
from seeclip.generate.feature_config import FeatureDiffusionConfig
from seeclip.generate.sd_pipeline import ImageDiffusionConfig
from seeclip.paths import seeclip_home
from seeclip.pseudo.base import PseudoContext
from seeclip.pseudo.pools import DomainPool, image_pool_features

__all__ = ["pick_sources", "sd_image_unknowns", "write_sd_pool"]


def pick_sources(domains: tuple[str, ...], n: int, generator: torch.Generator) -> list[int]:
    """A seeded pick of up to ``n`` rows per domain (sorted domains), without replacement."""
    rows = []
    for d in sorted(set(domains)):
        idx = [i for i, x in enumerate(domains) if x == d]
        rows += [idx[j] for j in torch.randperm(len(idx), generator=generator)[:n].tolist()]
    return rows


def sd_image_unknowns(ctx: PseudoContext) -> DomainPool:
    """Generate (or reuse) an image pool from ``ctx``'s source features; encode it."""
    manifest = write_sd_pool(ctx)
    feats = image_pool_features(
        ctx.backbone, manifest, cache_dir=ctx.cache_dir, progress=ctx.progress
    )
    return DomainPool(feats)


def write_sd_pool(
    ctx: PseudoContext,
    *,
    out_dir: str | Path | None = None,
    device: str | None = None,
    overwrite: bool = True,
) -> Path:
    """Draw ``ctx``'s image pool and return its ``manifest.csv``: the one generation path of
    ``train.pseudo_unknowns=sd_images`` and ``seeclip generate --backend image``.

    ``out_dir`` None: the pool's cache folder, ``<cache root>/pools/images/sd-<hash>`` keyed by
    the semantic tokens, domains, class texts, settings and seed (training finds a pool that
    ``generate`` drew ahead of time there); a named folder holds the same images, and a pool
    of other inputs in it is replaced only with ``overwrite``.
    """
    from seeclip.generate.denoiser import semantic_queries, semantic_summaries
    from seeclip.generate.image_pool import generate_image_pool
    from seeclip.generate.sd_conditioning import conditioning_projection
    from seeclip.generate.sd_pipeline import load_pipeline

    if ctx.backbone is None or not ctx.class_texts or not ctx.sd_model:
        raise ValueError("sd_images pseudo-unknowns need the backbone, class texts and sd_model")
    config = ctx.diffusion if ctx.diffusion is not None else FeatureDiffusionConfig()
    seed = ctx.seed if config.seed is None else config.seed  # diffusion.seed wins over the run's
    icfg = ImageDiffusionConfig(
        model=ctx.sd_model,
        prompt=ctx.sd_prompt,
        sigma=config.sigma,
        guidance=config.guidance,
        steps=config.sample_steps,
        batch_size=16,
        projection=ctx.sd_projection,
        strength=ctx.sd_strength,
        image_size=ctx.sd_image_size,
    )
    device = device or distributed.device()  # --device
    if icfg.strength < 1.0 and len(ctx.image_paths) != len(ctx.features):
        raise ValueError("sd_strength < 1 (SDEdit) needs the source image of every feature row")
    gen = torch.Generator().manual_seed(seed)
    features = ctx.features
    rows = pick_sources(features.domains, config.pool_per_domain, gen)
    queries = semantic_queries(features.tokens.float(), config.k, gen)
    tokens = semantic_summaries(features.tokens[rows].float(), queries)
    domains = [features.domains[i] for i in rows]
    if out_dir is None:
        root = Path(ctx.cache_dir) if ctx.cache_dir else seeclip_home()
        key = hashlib.sha256(tokens.numpy().tobytes())
        settings = asdict(icfg)
        if settings["strength"] == 1.0:  # text-to-image: pools made before the option keep keys
            del settings["strength"]
        key.update(json.dumps([domains, ctx.class_texts, settings, seed]).encode())
        out_dir = root / "pools" / "images" / f"sd-{key.hexdigest()[:16]}"
    pipe = load_pipeline(
        icfg.model, device=device, dtype=icfg.torch_dtype(device), progress=ctx.progress
    )
    with distributed.main_first():  # torchrun: rank 0 draws the pool, the others find it drawn
        return generate_image_pool(
            pipe,
            tokens,
            domains,
            [f"{d}:{i}" for d, i in zip(domains, rows, strict=True)],
            ctx.class_texts,
            out_dir=Path(out_dir),
            cfg=icfg,
            seed=seed,
            progress=ctx.progress,
            overwrite=overwrite,  # the cache folder: a stale pool there is remade
            projection=conditioning_projection(icfg, pipe, ctx.backbone),
            init_images=[_read(ctx.image_paths[i]) for i in rows] if icfg.strength < 1 else None,
        )


def _read(path: str):
    from seeclip.datasets.images import load_image

    return load_image(Path(path))
