"""From the experiment config to typed arguments: a run's method and its pseudo-unknown sources.

The whole :class:`~seeclip.run_config.RunConfig` stops here; :mod:`seeclip.methods` and
:mod:`seeclip.pseudo` get only the sections and values they name.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from seeclip.backbone import Backbone, has_weights
from seeclip.config import ConfigError
from seeclip.datasets import BENCHMARKS
from seeclip.features import PseudoSources
from seeclip.methods import Method, MethodEnv
from seeclip.methods.registry import build_method, has_semantic_queries, trains_on_pseudo_unknowns
from seeclip.pseudo import PSEUDO_UNKNOWNS, PseudoContext
from seeclip.run_config import RunConfig
from seeclip.run_data import EMBEDDED, RunData, cache_root, default_data_root


def pseudo_context(
    cfg: RunConfig,
    run: RunData,
    indices: np.ndarray,
    labels: np.ndarray,
    *,
    pool: str | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> PseudoContext:
    """What a pseudo-unknown source of ``cfg`` is built from: the features of the manifest rows
    ``indices`` (source images only) and the config's settings. Training and ``seeclip
    generate`` both build their sources through here, so one setting means one pool."""
    return PseudoContext(
        run.features(indices),
        torch.as_tensor(labels),
        backbone=run.backbone,
        class_texts=run.class_texts,
        template=run.spec.template,
        seed=cfg.seed,
        diffusion=cfg.diffusion,
        pool=pool,
        sd_model=cfg.train.sd_model,
        sd_prompt=cfg.train.sd_prompt,
        sd_projection=cfg.train.sd_projection,
        sd_strength=cfg.train.sd_strength,
        sd_image_size=cfg.train.sd_image_size,
        sd_every=cfg.train.sd_every,
        image_paths=run.image_paths(indices) if cfg.train.sd_strength < 1 else (),
        cache_dir=cache_root(cache_dir),
        progress=progress,
    )


def check_inputs(cfg: RunConfig) -> None:
    """Stop before any data is read when the config cannot give a meaningful run here: a real
    benchmark without its data root or with random CLIP weights, or the text-to-image model of
    ``train.pseudo_unknowns=sd_images`` or ``sd_online`` not on this machine, or
    ``sd_online`` asked of a method without learned semantic queries."""
    d = cfg.data
    if d.benchmark not in EMBEDDED and BENCHMARKS.get(d.benchmark).spec is not None:
        if d.data_root is None:
            default_data_root(d.benchmark)  # raises: the images are the user's
        if not has_weights(cfg.backbone.name, cfg.backbone.pretrained):
            raise ConfigError(
                f"{d.benchmark} with random {cfg.backbone.name} weights would measure nothing: "
                f"pass real CLIP weights, e.g. --backbone ViT-B-16 --pretrained openai, or "
                f"backbone.pretrained=PATH (a local checkpoint)"
            )
    source = cfg.train.pseudo_unknowns
    if not trains_on_pseudo_unknowns(cfg.method):  # zeroshot, coop, cocoop: the key is unused
        return
    if source == "sd_online" and not (
        has_semantic_queries(cfg.method) and cfg.prompt.semantic_tokens
    ):
        raise ConfigError(
            f"train.pseudo_unknowns=sd_online follows SeeCLIP's learned semantic queries; "
            f"method={cfg.method} (prompt.semantic_tokens={cfg.prompt.semantic_tokens}) has "
            f"none: use train.pseudo_unknowns=sd_images (the same generator, fixed queries)"
        )
    if source == "sd_online" and cfg.train.sd_strength < 1:
        raise ConfigError(
            f"train.sd_strength={cfg.train.sd_strength} (SDEdit from source images) is the "
            f"offline pool's option; sd_online samples from noise: use sd_images with it, or "
            f"leave train.sd_strength at 1"
        )
    if source in ("sd_images", "sd_online"):
        from seeclip.generate.sd_pipeline import locate_pipeline

        locate_pipeline(cfg.train.sd_model)


def pseudo_sources(
    cfg: RunConfig, run: RunData, *, cache_dir: str | Path | None = None, progress: bool = True
) -> PseudoSources:
    """The run's pseudo-unknown sources: training ones from the training features, the
    held-out ones of model selection from source-validation features only (built on use)."""
    name = cfg.train.pseudo_unknowns
    factory = PSEUDO_UNKNOWNS.get(name)
    data = run.data

    def context(indices: np.ndarray, labels: np.ndarray, pool: str | None) -> PseudoContext:
        return pseudo_context(
            cfg, run, indices, labels, pool=pool, cache_dir=cache_dir, progress=progress
        )

    def val_source():
        stored = name in ("images", "pool")  # made ahead of time, from training images
        if stored and not cfg.train.val_pseudo_pool:
            raise ValueError(
                f"selection=val_h with train.pseudo_unknowns={name} needs "
                f"train.val_pseudo_pool=PATH, a pool made from source-validation images only "
                f"(`seeclip generate ... --from val`); the training pool would score the model "
                f"on what it trained on"
            )
        pool = cfg.train.val_pseudo_pool if stored else cfg.train.pseudo_pool
        # drawn once before training, when no learned query exists: the offline generator
        held_out = PSEUDO_UNKNOWNS.get("sd_images") if name == "sd_online" else factory
        return held_out(context(data.source_val, data.source_val_labels, pool))

    return PseudoSources(
        name,
        lambda: factory(
            context(data.source_train, data.source_train_labels, cfg.train.pseudo_pool)
        ),
        val_source,
    )


def make_method(
    cfg: RunConfig,
    run: RunData,
    *,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    pseudo: PseudoSources | None = None,
) -> Method:
    """Build ``cfg.method`` on the run's backbone, with the config sections it asks for
    (``pseudo``: its pseudo-unknown sources; default :func:`pseudo_sources`)."""
    if pseudo is None:
        pseudo = pseudo_sources(cfg, run, cache_dir=cache_dir, progress=progress)
    return method_for(
        cfg, run.backbone, run.class_texts, run.spec.template, pseudo=pseudo, progress=progress
    )


def method_for(
    cfg: RunConfig,
    backbone: Backbone,
    class_texts: tuple[str, ...],
    template: str,
    *,
    pseudo: PseudoSources | None,
    progress: bool = True,
) -> Method:
    """``cfg.method`` on ``backbone`` for these known classes (no data needed: a fitted run's
    state is loaded into it afterwards, as :mod:`seeclip.predict` does)."""
    env = MethodEnv(
        backbone=backbone,
        class_texts=class_texts,
        template=template,
        seed=cfg.seed,
        pseudo=pseudo,
        progress=progress,
    )
    sections = {
        "zeroshot": cfg.zeroshot,
        "prompt": cfg.prompt,
        "loss": cfg.loss,
        "train": cfg.train,
        "diffusion": cfg.diffusion,
    }
    return build_method(cfg.method, env, sections)
