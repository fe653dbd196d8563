"""The feature-space generator: its config and the trained model bundle (fit, sample, save).

Training and sampling follow docs/method.md, "Pseudo-unknowns"; the representation and the
conditioning are described in :mod:`seeclip.generate.denoiser`. Pools built from it live in
:mod:`seeclip.generate.feature_diffusion`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from seeclip.features import Features
from seeclip.generate.denoiser import (
    Denoiser,
    Standardizer,
    TokenCells,
    cosine_alpha_bar,
    ddim_sample,
    ddpm_loss,
    semantic_queries,
    semantic_summaries,
)
from seeclip.generate.feature_config import FeatureDiffusionConfig

_AUTO_GRID_MAX_DIM = 4096  # grid=None keeps every token while (N + 1) * d stays below this
CHUNK = 512  # rows per DDIM batch (the summary noise and x_T are drawn per chunk)


TRAIN_FIELDS = (  # the fields that change the trained generator; the rest only change sampling
    "k",
    "grid",
    "width",
    "depth",
    "timesteps",
    "train_steps",
    "batch_size",
    "lr",
    "cond_dropout",
)


def resolve_grid(grid: int | None, n_tokens: int, d: int) -> int:
    """The token grid actually used (``None`` -> 0 for small token sets, else 2)."""
    if grid is not None:
        return grid
    return 0 if (n_tokens + 1) * d <= _AUTO_GRID_MAX_DIM else 2


class FeatureGenerator:
    """A trained feature-space diffusion model with its encoder, decoder and fixed queries."""

    def __init__(
        self,
        model: Denoiser,
        *,
        cells: TokenCells,
        queries: Tensor,
        x_norm: Standardizer,
        v_norm: Standardizer,
        alpha_bar: Tensor,
        domains: tuple[str, ...],
    ) -> None:
        self.model = model.eval()
        self.cells = cells
        self.queries = queries  # [K, d] unit vectors
        self.x_norm = x_norm  # of x = [global, cells] flattened
        self.v_norm = v_norm  # of the flattened summaries [K * d]
        self.alpha_bar = alpha_bar
        self.domains = domains  # sorted source domains (embedding order)

    # ------------------------------------------------------------ representation
    def encode(self, global_: Tensor, tokens: Tensor) -> Tensor:
        """Standardised x [n, D] from global [n, d] and tokens [n, N, d]."""
        return self.x_norm(_flatten(global_, tokens, self.cells))

    def decode(self, x: Tensor, source_tokens: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(global [n, d] normalised, tokens [n, N, d]) from standardised x.

        With ``source_tokens`` (pooled grids) each token also gets its source image's deviation
        from its cell mean, so generated tokens are not piecewise constant.
        """
        raw = self.x_norm.inverse(x)
        d = self.queries.shape[1]
        tokens = self.cells.unpool(raw[:, d:].reshape(len(x), self.cells.n_cells, d))
        if source_tokens is not None and self.cells.n_cells < self.cells.n_tokens:
            src = source_tokens.float()
            tokens = tokens + src - self.cells.unpool(self.cells.pool(src))
        return F.normalize(raw[:, :d], dim=-1), tokens

    def conditions(self, tokens: Tensor, sigma: float, generator: torch.Generator) -> Tensor:
        """Standardised semantic summaries [n, K, d], perturbed by N(0, sigma^2 I)."""
        v = self.v_norm(semantic_summaries(tokens, self.queries).flatten(1))
        if sigma > 0:
            v = v + sigma * torch.randn(v.shape, generator=generator)
        return v.reshape(len(tokens), *self.queries.shape)

    def domain_index(self, domains: tuple[str, ...] | list[str]) -> Tensor:
        lookup = {d: i for i, d in enumerate(self.domains)}
        return torch.tensor([lookup[d] for d in domains])

    # ------------------------------------------------------------------ training
    @classmethod
    def fit(
        cls,
        features: Features,
        labels: Tensor,
        class_text: Tensor,
        *,
        config: FeatureDiffusionConfig,
        seed: int,
        progress: bool = True,
    ) -> tuple[FeatureGenerator, list[float]]:
        """Train on source features (labels 0..C-1, class_text [C, d]); returns the loss curve."""
        n, n_tokens, d = features.tokens.shape
        gen = torch.Generator().manual_seed(seed)
        cells = TokenCells.grid(n_tokens, resolve_grid(config.grid, n_tokens, d))
        queries = semantic_queries(features.tokens, config.k, gen)
        domains = tuple(sorted(set(features.domains)))
        x = _flatten(features.global_, features.tokens, cells)
        v = semantic_summaries(features.tokens, queries).flatten(1)
        x_norm, v_norm = Standardizer.fit(x), Standardizer.fit(v)
        x, v = x_norm(x), v_norm(v).reshape(n, config.k, d)
        dom = torch.tensor([domains.index(x) for x in features.domains])
        text = F.normalize(class_text.float(), dim=-1)[labels.long()]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = Denoiser(x.shape[1], d, config.k, len(domains), config.width, config.depth)
        alpha_bar = cosine_alpha_bar(config.timesteps)
        opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / config.train_steps))
        )
        losses: list[float] = []
        model.train()
        bar = tqdm(range(config.train_steps), desc="diffusion: train", disable=not progress)
        for _ in bar:
            idx = torch.randint(n, (config.batch_size,), generator=gen)
            loss = ddpm_loss(
                model,
                alpha_bar,
                x[idx],
                v[idx],
                dom[idx],
                text[idx],
                cond_dropout=config.cond_dropout,
                generator=gen,
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
        generator = cls(
            model,
            cells=cells,
            queries=queries,
            x_norm=x_norm,
            v_norm=v_norm,
            alpha_bar=alpha_bar,
            domains=domains,
        )
        return generator, losses

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def generate(
        self,
        features: Features,
        rows: Tensor,
        text_pos: Tensor,
        text_neg: Tensor,
        *,
        sigma: float,
        guidance: float,
        steps: int,
        clip_x0: float,
        detail: bool,
        generator: torch.Generator,
        bar: tqdm | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Pseudo-unknowns conditioned on source images ``rows`` of ``features``.

        Args:
            features: the source features (the conditioning images).
            rows: [n] source indices; each output is conditioned on its row's image and domain.
            text_pos: [n, d] positive text ("unknown" prompt); text_neg: [n, d] negative.
            sigma, guidance, steps, clip_x0, detail: as in :class:`FeatureDiffusionConfig`.
            generator: seeds the summary noise and the initial x_T (drawn per chunk of 512).
        """
        out_g, out_t = [], []
        for i in range(0, len(rows), CHUNK):
            r = rows[i : i + CHUNK]
            tokens = features.tokens[r]
            v = self.conditions(tokens, sigma, generator)
            dom = self.domain_index([features.domains[j] for j in r.tolist()])
            pos = F.normalize(text_pos[i : i + CHUNK].float(), dim=-1)
            neg = F.normalize(text_neg[i : i + CHUNK].float(), dim=-1)
            x = ddim_sample(
                self.model,
                self.alpha_bar,
                v,
                dom,
                pos,
                neg,
                guidance=guidance,
                steps=steps,
                clip_x0=clip_x0,
                generator=generator,
                bar=bar,
            )
            g, t = self.decode(x, tokens if detail else None)
            out_g.append(g)
            out_t.append(t)
        return torch.cat(out_g), torch.cat(out_t)

    # ----------------------------------------------------------------- storage
    def state(self) -> tuple[dict[str, Tensor], dict]:
        """(tensors for safetensors, JSON-able metadata) that :meth:`from_state` reads back."""
        tensors = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        tensors |= {
            "queries": self.queries,
            "x_mean": self.x_norm.mean,
            "x_std": self.x_norm.std,
            "v_mean": self.v_norm.mean,
            "v_std": self.v_norm.std,
            "alpha_bar": self.alpha_bar,
            "cell": self.cells.cell,
        }
        m = self.model
        meta = {
            "domains": list(self.domains),
            "dims": [m.out.out_features, self.queries.shape[1], self.queries.shape[0]],
            "width": m.width,
            "depth": len(m.blocks),
        }
        return {k: v.contiguous() for k, v in tensors.items()}, meta

    @classmethod
    def from_state(cls, tensors: dict[str, Tensor], meta: dict) -> FeatureGenerator:
        dim, d, k = meta["dims"]
        model = Denoiser(dim, d, k, len(meta["domains"]), meta["width"], meta["depth"])
        model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        return cls(
            model,
            cells=TokenCells(tensors["cell"]),
            queries=tensors["queries"],
            x_norm=Standardizer(tensors["x_mean"], tensors["x_std"]),
            v_norm=Standardizer(tensors["v_mean"], tensors["v_std"]),
            alpha_bar=tensors["alpha_bar"],
            domains=tuple(meta["domains"]),
        )


def _flatten(global_: Tensor, tokens: Tensor, cells: TokenCells) -> Tensor:
    """Raw x [n, d + C * d] = [global, token cells] (not standardised)."""
    parts = [
        torch.cat([global_[i : i + CHUNK].float(), cells.pool(tokens[i : i + CHUNK]).flatten(1)], 1)
        for i in range(0, tokens.shape[0], CHUNK)
    ]
    return torch.cat(parts)


__all__ = ["FeatureDiffusionConfig", "FeatureGenerator", "TRAIN_FIELDS", "resolve_grid"]
