"""The paper's semantic-guided diffusion, online: pseudo-unknowns that follow the model.

At a refresh step the generator takes source images of each domain (random training rows of
that domain, as a batch holds), lets the model's *current* learned queries attend over their
patch tokens (``model.semantic_summaries``: SeeCLIP's v_sem before F_key), perturbs those
summaries (``diffusion.sigma``), projects them into the text-to-image model's conditioning
(``train.sd_projection``) with the positive prompt ``train.sd_prompt`` and the known class names
as the negative prompt, and samples at guidance ``diffusion.guidance`` for
``diffusion.sample_steps`` steps. The images go through the frozen CLIP (rounded to the feature
cache's float16) and enter the batch with label C. The sampling call is the offline pool's
(:func:`seeclip.generate.image_pool.sample_images`); only where the tokens come from differs.

``train.sd_every`` sets how often: 1 = every step (the paper's), N = every N steps (the steps
between draw from the last set with replacement), 0 = once per epoch, a set of
``diffusion.pool_per_domain`` images per domain. Refreshes count from each epoch's first step,
and every random draw comes from the trainer's generator, so a run resumed at an epoch
boundary is the uninterrupted run. The held-out pseudo-unknowns of model selection
(``selection=val_h``) come from the offline generator on source-validation images: they are
drawn once, before training, when no learned query exists yet.
"""

from __future__ import annotations

import torch
from torch import Tensor

from seeclip import distributed
from seeclip.features import Features
from seeclip.generate.feature_config import FeatureDiffusionConfig
from seeclip.generate.sd_pipeline import ImageDiffusionConfig
from seeclip.pseudo.base import PseudoContext, by_domain

__all__ = ["OnlineImageUnknowns", "sd_online_unknowns"]

_SEED_RANGE = 2**62


def sd_online_unknowns(ctx: PseudoContext) -> OnlineImageUnknowns:
    """The online generator of ``ctx``: its pipeline is loaded now, its images drawn in training."""
    from seeclip.generate.sd_conditioning import conditioning_projection, known_classes_prompt
    from seeclip.generate.sd_pipeline import load_pipeline

    if ctx.backbone is None or not ctx.class_texts or not ctx.sd_model:
        raise ValueError("sd_online pseudo-unknowns need the backbone, class texts and sd_model")
    config = ctx.diffusion if ctx.diffusion is not None else FeatureDiffusionConfig()
    icfg = ImageDiffusionConfig(
        model=ctx.sd_model,
        prompt=ctx.sd_prompt,
        sigma=config.sigma,
        guidance=config.guidance,
        steps=config.sample_steps,
        projection=ctx.sd_projection,
        image_size=ctx.sd_image_size,
    )
    device = distributed.device()
    pipe = load_pipeline(
        icfg.model, device=device, dtype=icfg.torch_dtype(device), progress=ctx.progress
    )
    return OnlineImageUnknowns(
        ctx.features,
        pipe=pipe,
        backbone=ctx.backbone,
        cfg=icfg,
        projection=conditioning_projection(icfg, pipe, ctx.backbone),
        negative=known_classes_prompt(ctx.class_texts),
        every=ctx.sd_every,
        pool_per_domain=config.pool_per_domain,
    )


class OnlineImageUnknowns:
    """Pseudo-unknowns drawn by a text-to-image pipeline from the trained model's own tokens.

    The trainer calls :meth:`follow` once with the model, then :meth:`prepare` at every step
    with that step's pseudo-unknown count per domain, then :meth:`sample` per domain.
    """

    def __init__(
        self,
        features: Features,
        *,
        pipe,
        backbone,
        cfg: ImageDiffusionConfig,
        projection: Tensor,
        negative: str,
        every: int = 1,
        pool_per_domain: int = 64,
    ) -> None:
        if every < 0:
            raise ValueError(f"train.sd_every must be >= 0 (0: once per epoch), got {every}")
        self.features, self.pipe, self.backbone = features, pipe, backbone
        self.cfg, self.projection, self.negative = cfg, projection, negative
        self.every, self.pool_per_domain = every, pool_per_domain
        self.rows = by_domain(features.domains)
        self.model = None
        self.images_drawn = 0  # what the run cost, for its record
        self._set: dict[str, tuple[Tensor, Tensor]] = {}

    def follow(self, model) -> None:
        """The model whose learned queries pick the tokens (SeeCLIP's semantic tokens)."""
        summaries = getattr(model, "semantic_summaries", None)
        if summaries is None or not model.has_semantic_queries:
            raise ValueError(
                "train.pseudo_unknowns=sd_online follows the model's learned semantic queries; "
                "this model has none (method seeclip with prompt.semantic_tokens=true has): "
                "use sd_images"
            )
        self.model = model

    def prepare(self, step: int, counts: dict[str, int], generator: torch.Generator) -> None:
        """Step ``step`` of an epoch needs ``counts`` pseudo-unknowns per domain: draw a new
        set when this step is a refresh step."""
        if self.every == 1:  # a step may ask for none (small batches): nothing is drawn
            wanted = {d: n for d, n in counts.items() if n}
            self._set = self._draw(wanted, generator) if wanted else {}
        elif self.every == 0 and step == 0:
            self._set = self._draw({d: self.pool_per_domain for d in self.rows}, generator)
        elif self.every > 1 and step % self.every == 0:
            # a set the size of this step's largest ask; the steps until the next refresh
            # sample it with replacement
            n = max([1, *counts.values()])
            self._set = self._draw({d: n for d in self.rows}, generator)

    def sample(self, domain: str, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        g, t = self._set[domain]
        if self.every == 1:  # drawn for this step: exactly these
            return g[:n], t[:n]
        pick = torch.randint(len(g), (n,), generator=generator)
        return g[pick], t[pick]

    @torch.no_grad()
    def _draw(
        self, sizes: dict[str, int], generator: torch.Generator
    ) -> dict[str, tuple[Tensor, Tensor]]:
        from seeclip.generate.image_pool import sample_images

        if self.model is None:
            raise RuntimeError("OnlineImageUnknowns.follow(model) must come before a draw")
        domains = sorted(sizes)
        rows, names = [], []
        for d in domains:
            idx = self.rows[d]
            rows.append(idx[torch.randint(len(idx), (sizes[d],), generator=generator)])
            names += [d] * sizes[d]
        rows = torch.cat(rows)
        tokens = self.features.tokens[rows].float()
        device = next(self.model.parameters()).device
        was_training = self.model.training
        self.model.eval()
        clean = self.model.semantic_summaries(tokens.to(device)).float().cpu()  # [B, K, d]
        self.model.train(was_training)
        noise = torch.randn(clean.shape, generator=generator)
        seeds = torch.randint(_SEED_RANGE, (len(names),), generator=generator).tolist()
        images = []
        for i in range(0, len(names), self.cfg.batch_size):
            part = slice(i, i + self.cfg.batch_size)
            images += sample_images(
                self.pipe,
                clean[part],
                noise[part],
                names[part],
                self.negative,
                cfg=self.cfg,
                projection=self.projection,
                latent_seeds=seeds[part],
            )
        self.images_drawn += len(images)
        g, t = self._encode(images)
        out, start = {}, 0
        for d in domains:
            out[d] = (g[start : start + sizes[d]], t[start : start + sizes[d]])
            start += sizes[d]
        return out

    def _encode(self, images) -> tuple[Tensor, Tensor]:
        """The frozen CLIP's (global, tokens) of PIL images, as the feature cache stores them."""
        batch = torch.stack([self.backbone.preprocess(im) for im in images])
        g, t = self.backbone.encode_image(batch)
        return g.half().float().cpu(), t.half().float().cpu()
