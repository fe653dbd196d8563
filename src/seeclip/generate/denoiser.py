"""The feature-space diffusion model: representation, fixed semantic queries, DDPM and DDIM.

What is denoised, per sample: ``x = [global (d), token cells (C x d)]`` flattened and
standardised per dimension with source statistics. ``C = N`` keeps every patch token; a grid
``G`` averages them into ``G x G`` cells (a 2-D partition of the square patch grid, or equal runs
of the token sequence when ``N`` is not a square) and decoding copies each cell back to its
tokens, so the method always receives ``[n, N, d]``.

Conditioning: K semantic summaries ``v_k = sum_i softmax_i(cos(f_i, q_k) / 0.1) f_i`` with FIXED
queries ``q_k`` (spherical k-means centroids of source patch tokens, because SeeCLIP's learned
queries do not exist before it is trained), standardised per dimension; a learned embedding of
the source domain; and a CLIP text feature (the class prompt in training, replaced by a learned
null with probability ``cond_dropout`` so that classifier-free guidance is defined).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

QUERY_TEMPERATURE = 0.1  # softmax temperature of the fixed queries' cosine attention
_CHUNK = 512  # rows per step when a computation runs over the whole source set


class TokenCells:
    """Pools N patch tokens into C cells and back; token i belongs to cell ``cell[i]``."""

    def __init__(self, cell: Tensor) -> None:
        self.cell = cell.long()  # [N]
        self.n_tokens = len(cell)
        self.n_cells = int(cell.max()) + 1
        counts = torch.bincount(self.cell, minlength=self.n_cells).float()
        self.average = F.one_hot(self.cell, self.n_cells).T.float() / counts[:, None]  # [C, N]

    @classmethod
    def grid(cls, n_tokens: int, grid: int) -> TokenCells:
        """G x G cells (``grid=0``: every token is its own cell, C = N).

        A square patch grid (N = s^2, G <= s) is partitioned in 2-D; otherwise the token
        sequence is cut into G * G nearly equal runs.
        """
        pos = torch.arange(n_tokens)
        side = math.isqrt(n_tokens)
        if grid == 0:
            return cls(pos)
        if side * side == n_tokens and grid <= side:
            row, col = pos // side, pos % side
            return cls((row * grid // side) * grid + col * grid // side)
        if grid * grid <= n_tokens:
            return cls(pos * grid * grid // n_tokens)
        raise ValueError(f"a {grid}x{grid} token grid needs at least {grid * grid} tokens")

    def pool(self, tokens: Tensor) -> Tensor:
        """[n, N, d] -> [n, C, d] cell means."""
        return torch.einsum("cn,bnd->bcd", self.average, tokens.float())

    def unpool(self, cells: Tensor) -> Tensor:
        """[n, C, d] -> [n, N, d]: every token takes its cell's value."""
        return cells[:, self.cell]


def semantic_queries(
    tokens: Tensor, k: int, generator: torch.Generator, *, max_tokens: int = 8192, iters: int = 25
) -> Tensor:
    """K unit query directions: spherical k-means (k-means++ start) of source patch tokens.

    Args:
        tokens: [n, N, d] source patch tokens.
        k: number of queries.
        generator: seeds the token subsample and the k-means++ draws.
        max_tokens: tokens drawn (without replacement) for the clustering.
        iters: Lloyd iterations.
    """
    flat = tokens.reshape(-1, tokens.shape[-1])
    take = torch.randperm(flat.shape[0], generator=generator)[:max_tokens]
    x = F.normalize(flat[take].float(), dim=-1)
    if x.shape[0] < k:
        raise ValueError(f"{x.shape[0]} source tokens cannot give {k} semantic queries")
    centres = x[torch.randint(x.shape[0], (1,), generator=generator)]
    for _ in range(k - 1):  # k-means++: next centre drawn by squared cosine distance
        dist = (1 - (x @ centres.T).max(dim=1).values).clamp_min(0) ** 2
        pick = torch.multinomial(dist + 1e-12, 1, generator=generator)
        centres = torch.cat([centres, x[pick]])
    for _ in range(iters):
        assign = (x @ centres.T).argmax(dim=1)
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        empty = sums.norm(dim=1) == 0
        centres = torch.where(empty[:, None], centres, F.normalize(sums, dim=-1))
    return centres


def semantic_summaries(tokens: Tensor, queries: Tensor) -> Tensor:
    """v [n, K, d]: the model's query attention (SemanticTokens.summaries) on cosines / 0.1."""
    out = []
    for i in range(0, tokens.shape[0], _CHUNK):
        t = tokens[i : i + _CHUNK].float()
        logits = torch.einsum("bnd,kd->bkn", F.normalize(t, dim=-1), queries)
        out.append((logits / QUERY_TEMPERATURE).softmax(dim=-1) @ t)
    return torch.cat(out)


@dataclass
class Standardizer:
    """Per-dimension (x - mean) / std with source statistics."""

    mean: Tensor
    std: Tensor

    @classmethod
    def fit(cls, x: Tensor) -> Standardizer:
        return cls(x.mean(dim=0), x.std(dim=0).clamp_min(1e-6))

    def __call__(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std

    def inverse(self, z: Tensor) -> Tensor:
        return z * self.std + self.mean


def cosine_alpha_bar(timesteps: int, s: float = 0.008) -> Tensor:
    """abar_t for t = 1..T (Nichol & Dhariwal 2021), betas capped at 0.999; index t-1."""
    t = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
    return torch.cumprod(1 - betas, dim=0).float()


def _timestep_embedding(t: Tensor, dim: int) -> Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.sin(), args.cos()], dim=-1)


class _Block(nn.Module):
    """Pre-norm residual MLP block with FiLM conditioning: h + W silu(LN(h) (1 + a) + b)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False)
        self.film = nn.Linear(width, 2 * width)
        self.fc = nn.Linear(width, width)

    def forward(self, h: Tensor, c: Tensor) -> Tensor:
        scale, shift = self.film(c).chunk(2, dim=-1)
        return h + self.fc(F.silu(self.norm(h) * (1 + scale) + shift))


class Denoiser(nn.Module):
    """x0_hat(x_t, t | summaries, domain, text): an MLP with FiLM-conditioned residual blocks.

    Args:
        dim: size of the flattened representation x.
        d: CLIP joint width (summaries and text features).
        k: number of semantic summaries.
        n_domains: number of source domains.
        width: hidden width.
        depth: number of residual blocks.
    """

    def __init__(self, dim: int, d: int, k: int, n_domains: int, width: int, depth: int) -> None:
        super().__init__()
        self.width = width
        self.inp = nn.Linear(dim, width)
        self.time = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.domain = nn.Embedding(n_domains, width)
        self.text = nn.Linear(d, width)
        self.text_scale = math.sqrt(d)  # unit-norm text features -> unit-variance coordinates
        self.null_text = nn.Parameter(torch.zeros(d))  # the dropped text condition
        self.summaries = nn.Linear(k * d, width)
        self.blocks = nn.ModuleList(_Block(width) for _ in range(depth))
        self.out_norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, dim)
        nn.init.zeros_(self.out.weight)  # starts by predicting x0 = 0 (the source mean)
        nn.init.zeros_(self.out.bias)

    def forward(
        self, x: Tensor, t: Tensor, summaries: Tensor, domain: Tensor, text: Tensor | None
    ) -> Tensor:
        """x [B, dim], t [B] long, summaries [B, K, d], domain [B] long, text [B, d] or None."""
        if text is None:
            text = self.null_text.expand(x.shape[0], -1)
        c = (
            self.time(_timestep_embedding(t, self.width))
            + self.domain(domain)
            + self.text(text * self.text_scale)
            + self.summaries(summaries.flatten(1))
        )
        c = F.silu(c)
        h = self.inp(x)
        for block in self.blocks:
            h = block(h, c)
        return self.out(F.silu(self.out_norm(h)))


def ddpm_loss(
    model: Denoiser,
    alpha_bar: Tensor,
    x0: Tensor,
    summaries: Tensor,
    domain: Tensor,
    text: Tensor,
    *,
    cond_dropout: float,
    generator: torch.Generator,
) -> Tensor:
    """DDPM training loss E ||x0 - x0_hat(x_t, t | c)||^2, text dropped w.p. cond_dropout.

    The network predicts x0 rather than eps (as the DALL-E 2 prior does for CLIP embeddings):
    eps at low noise is full-rank, which an MLP narrower than x cannot pass through, while x0
    lies on the data's low-dimensional manifold. eps = (x_t - sqrt(abar) x0) / sqrt(1 - abar)
    is derived from it wherever it is needed.
    """
    b = x0.shape[0]
    t = torch.randint(len(alpha_bar), (b,), generator=generator)
    noise = torch.randn(x0.shape, generator=generator)
    ab = alpha_bar[t][:, None]
    xt = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    drop = torch.rand(b, generator=generator) < cond_dropout
    text = torch.where(drop[:, None], model.null_text.expand(b, -1), text)
    return F.mse_loss(model(xt, t, summaries, domain, text), x0)


@torch.no_grad()
def ddim_sample(
    model: Denoiser,
    alpha_bar: Tensor,
    summaries: Tensor,
    domain: Tensor,
    text_pos: Tensor,
    text_neg: Tensor,
    *,
    guidance: float,
    steps: int,
    clip_x0: float,
    generator: torch.Generator,
    bar: tqdm | None = None,
) -> Tensor:
    """DDIM (eta = 0) with classifier-free guidance eps' = eps_neg + g (eps_pos - eps_neg).

    Both conditions share the summaries and the domain; they differ in the text. The guided
    x0 estimate is clamped to [-clip_x0, clip_x0] (source-std units) at every step: a large g
    otherwise throws samples far outside the feature distribution.
    """
    n, dim = summaries.shape[0], model.out.out_features
    x = torch.randn(n, dim, generator=generator)
    ts = torch.linspace(len(alpha_bar) - 1, 0, steps).round().long()
    two = (torch.cat([summaries, summaries]), torch.cat([domain, domain]))
    texts = torch.cat([text_pos, text_neg])
    for i, t in enumerate(ts.tolist()):
        ab = alpha_bar[t]
        ab_prev = alpha_bar[ts[i + 1]] if i + 1 < steps else torch.tensor(1.0)
        x0_pos, x0_neg = model(torch.cat([x, x]), torch.full((2 * n,), t), *two, texts).chunk(2)
        eps_pos, eps_neg = ((x - ab.sqrt() * x0_) / (1 - ab).sqrt() for x0_ in (x0_pos, x0_neg))
        eps = eps_neg + guidance * (eps_pos - eps_neg)
        x0 = ((x - (1 - ab).sqrt() * eps) / ab.sqrt()).clamp(-clip_x0, clip_x0)
        eps = (x - ab.sqrt() * x0) / (1 - ab).sqrt()  # consistent with the clamped x0
        x = ab_prev.sqrt() * x0 + (1 - ab_prev).sqrt() * eps
        if bar is not None:
            bar.update()
    return x


__all__ = [
    "Denoiser",
    "Standardizer",
    "TokenCells",
    "cosine_alpha_bar",
    "ddim_sample",
    "ddpm_loss",
    "semantic_queries",
    "semantic_summaries",
]
