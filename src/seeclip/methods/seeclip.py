"""SeeCLIP (arXiv 2511.16979): everything that makes the method, in one file.

- **Model**: known prompts ``[SOS][dom][sem_1..sem_K] <class> . [EOS]`` built per image from
  K semantic tokens (queries attending over the patch tokens, each projected by its own
  F_key) and a domain token; one learned unknown prompt ``[SOS][dom][v_1..v_m] unknown .``.
- **Loss** (the "duplex" objective): L = L_ali + alpha L_rep + beta L_coh + gamma L_reg
  (:func:`seeclip_loss`; the terms are plain functions in :mod:`seeclip.losses`), with
  pseudo-unknowns labelled C from ``train.pseudo_unknowns``.
- **What decides unknown**: :data:`RULE`, the argmax over the C known prompts and the unknown
  prompt (:class:`~seeclip.methods.scoring.UnknownPromptArgmax`).
- **Config sections**: ``prompt`` (k, m, semantic_tokens, text_precision, shared_prefix),
  ``loss`` (alpha, beta, gamma, margin, reg_reduction) and ``train`` (:mod:`seeclip.config`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seeclip.config import ConfigError, TrainConfig, check_choices
from seeclip.features import PromptOutput
from seeclip.losses import alignment_loss, cohesion_loss, l1_penalty, repulsion_loss
from seeclip.methods.base import MethodEnv
from seeclip.methods.prompt_model import (
    PromptConfig,
    PromptModel,
    learner,
    normal_parameter,
    seeded,
)
from seeclip.methods.prompts import PromptTemplate, encode_prompts
from seeclip.methods.scoring import UnknownPromptArgmax
from seeclip.methods.shared_prefix import Suffixes, encode_shared_prefix, supports_shared_prefix
from seeclip.trainer import PromptTrainer

__all__ = [
    "LossConfig",
    "RULE",
    "DomainToken",
    "SeeCLIPModel",
    "SemanticTokens",
    "build",
    "seeclip_loss",
    "seeclip_terms",
    "seeclip_weights",
]


@dataclass(frozen=True)
class LossConfig:
    alpha: float = 1.0  # weight of L_rep (repulsion of the unknown prompt)
    beta: float = 0.5  # weight of L_coh (cohesion of unknown and known prompts)
    gamma: float = 0.01  # weight of L_reg (L1 on F_key)
    margin: float = 0.5  # L_rep hinge margin on cos(t_u, t_y)
    # L_reg over the F_key entries: mean (gamma independent of the widths; gamma L_reg ~5e-4 on
    # tiny-digits) or sum (the paper's L1 norm as written; at gamma 0.01 it dominates L_ali)
    reg_reduction: Literal["mean", "sum"] = "mean"

    def __post_init__(self) -> None:
        check_choices(self, "loss")
        for name in ("alpha", "beta", "gamma"):
            if getattr(self, name) < 0:
                raise ConfigError(f"loss.{name} must be >= 0, got {getattr(self, name)}")


RULE = UnknownPromptArgmax()  # the paper's decision: argmax over C known + 1 unknown prompt
PSEUDO_UNKNOWNS = True  # trains on train.pseudo_unknowns (its unknown prompt learns from them)
SEMANTIC_QUERIES = True  # learned queries the online generator follows (prompt.semantic_tokens)


class SemanticTokens(nn.Module):
    """Semantic-aware prompt enhancement (docs/method.md, Model).

    a_ik = softmax_i(f_i . q_k), v_k = sum_i a_ik f_i, sem_k = F_key,k(v_k).

    Args:
        d: joint embedding width of the patch tokens f_i.
        d_text: token-embedding width of the text encoder.
        k: number of queries K.
    """

    def __init__(self, d: int, d_text: int, k: int = 4) -> None:
        super().__init__()
        self.queries = normal_parameter(k, d)
        self.f_key = nn.ModuleList(nn.Linear(d, d_text) for _ in range(k))

    def attention(self, tokens: Tensor) -> Tensor:
        """a [B, K, N]: each query's softmax over the N patches."""
        q = self.queries
        return torch.einsum("bnd,kd->bkn", tokens.to(q.dtype), q).softmax(dim=-1)

    def summaries(self, tokens: Tensor) -> Tensor:
        """v_sem [B, K, d] = attention-pooled patch tokens (what the pseudo-unknowns perturb)."""
        return self.attention(tokens) @ tokens.to(self.queries.dtype)

    def project(self, v: Tensor) -> Tensor:
        """[B, K, d] -> [B, K, d_text], through each query's own F_key,k."""
        return torch.stack([f(v[:, i]) for i, f in enumerate(self.f_key)], dim=1)

    def forward(self, tokens: Tensor) -> Tensor:
        """Semantic tokens [B, K, d_text] from patch tokens [B, N, d]."""
        return self.project(self.summaries(tokens))


class DomainToken(nn.Module):
    """[dom] = F_dom(mean_i f_i) (docs/method.md, Model): [B, N, d] -> [B, d_text]."""

    def __init__(self, d: int, d_text: int) -> None:
        super().__init__()
        self.f_dom = nn.Linear(d, d_text)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.f_dom(tokens.to(self.f_dom.weight.dtype).mean(dim=1))


class SeeCLIPModel(PromptModel):
    """SeeCLIP's prompts (docs/method.md, Model), one per image and class plus one unknown.

    Known: ``[SOS][dom][sem_1..sem_K] <class text> . [EOS]``; unknown:
    ``[SOS][dom][v_1..v_m] unknown . [EOS]``. All B x (C + 1) prompts are encoded in one call.

    Args:
        backbone: the frozen backbone.
        class_texts: text of each known class, in label order.
        k: number of semantic tokens K.
        m: number of learnable unknown-context vectors.
        semantic_tokens: False replaces the K semantic tokens by K shared learned context
            vectors (the "plain learned context" ablation; no F_key, so L_reg is 0).
        unknown_word: the word that closes the unknown prompt.
        text_precision: the text tower's arithmetic (``prompt.text_precision``).
        shared_prefix: encode each image's ``[SOS][dom][sem_1..sem_K]`` once and every class
            text (and the unknown prompt's ``[v_1..v_m] unknown .``, which continues
            ``[SOS][dom]``) against its cached keys and values
            (:mod:`~seeclip.methods.shared_prefix`; exact). False, or a text tower it does not
            support: all B x (C + 1) prompts in one call of the full path.
    """

    def __init__(
        self,
        backbone,
        class_texts: Sequence[str],
        *,
        k: int = 4,
        m: int = 4,
        semantic_tokens: bool = True,
        unknown_word: str = "unknown",
        text_precision: str = "fp32",
        shared_prefix: bool = True,
    ) -> None:
        super().__init__(backbone, len(class_texts), True, text_precision)
        self.shared_prefix = shared_prefix
        d, w = backbone.embed_dim, backbone.text_width
        self.semantic: SemanticTokens | None = SemanticTokens(d, w, k) if semantic_tokens else None
        self.ctx = None if semantic_tokens else normal_parameter(k, w)
        self.domain = DomainToken(d, w)
        self.unknown_ctx = normal_parameter(m, w)
        self.known_prompts = PromptTemplate(backbone, class_texts, 1 + k)
        self.unknown_prompt = PromptTemplate(backbone, [unknown_word], 1 + m)
        self.to(backbone.device)

    @property
    def has_semantic_queries(self) -> bool:
        return self.semantic is not None

    def semantic_summaries(self, tokens: Tensor) -> Tensor:
        """v_sem [B, K, d]: the current queries' attention-pooled patch tokens [B, N, d] (what
        the online generator perturbs into pseudo-unknowns)."""
        if self.semantic is None:
            raise ValueError("prompt.semantic_tokens=false: this model has no semantic queries")
        return self.semantic.summaries(tokens)

    def f_key_weights(self) -> list[Tensor]:
        return [] if self.semantic is None else [f.weight for f in self.semantic.f_key]

    def forward(self, global_: Tensor, tokens: Tensor) -> PromptOutput:
        """Logits [B, C + 1] and text [B, C + 1, d] from global [B, d] and tokens [B, N, d]."""
        b = tokens.shape[0]
        dom = self.domain(tokens).unsqueeze(1)  # [B, 1, w]
        if self.semantic is not None:
            sem = self.semantic(tokens)  # [B, K, w]
        else:
            sem = self.ctx.expand(b, -1, -1)
        ctx = torch.cat([dom, sem], dim=1)  # [B, 1 + K, w]
        if self.shared_prefix and supports_shared_prefix(self.backbone):
            prefix, known = self.known_prompts.split(ctx)  # [SOS][dom][sem_1..K] per image
            # [v_1..v_m] unknown . [EOS], the same for every image, after [SOS][dom]
            u = self.unknown_prompt
            unknown_tokens = torch.cat([self.unknown_ctx.to(u.suffix.dtype), u.suffix[0]])
            unknown = Suffixes(unknown_tokens.unsqueeze(0), u.eot_index, prefix_len=2)
            text = encode_shared_prefix(
                self.backbone, prefix, [known, unknown], autocast=self.text_autocast
            )
            return self._output(global_, text)
        known = self.known_prompts.assemble(ctx, per_image=True)
        unknown_ctx = torch.cat([dom, self.unknown_ctx.expand(b, -1, -1)], dim=1)
        unknown = self.unknown_prompt.assemble(unknown_ctx, per_image=True)
        text = encode_prompts(
            self.backbone,
            [known, unknown],
            [self.known_prompts.eot_index, self.unknown_prompt.eot_index],
            autocast=self.text_autocast,
        )
        return self._output(global_, text)


def seeclip_loss(
    out: PromptOutput,
    labels: Tensor,
    *,
    alpha: float = 1.0,
    beta: float = 0.5,
    gamma: float = 0.01,
    margin: float = 0.5,
    reg_reduction: str = "mean",
    f_key_weights: Iterable[Tensor | nn.Module] = (),
) -> dict[str, Tensor]:
    """The full objective L = L_ali + alpha L_rep + beta L_coh + gamma L_reg.

    L_rep and L_coh use only samples with a known label (a pseudo-unknown has no true
    prompt); a batch without one gets 0 for both.

    Args:
        out: output of a model with ``has_unknown_prompt`` (its last column is read as the
            unknown prompt): logits [B, C + 1], text [B, C + 1, d].
        labels: [B] in 0..C (C = pseudo-unknown).
        alpha, beta, gamma: weights of L_rep, L_coh, L_reg.
        margin: L_rep's margin.
        reg_reduction: L_reg over the F_key entries, ``"sum"`` (the paper's L1 norm) or
            ``"mean"``.
        f_key_weights: what L_reg penalises (``model.f_key_weights()``).

    Returns:
        ``{"total", "ali", "rep", "coh", "reg"}`` and two diagnostics of L_rep, ``"cos_uy"``
        (mean cos(t_u, t_y) over known samples) and ``"rep_active"`` (the share of them above
        the margin: the only ones L_rep acts on), each a scalar tensor.
    """
    c = out.logits.shape[1] - 1
    if out.text.shape[1] != c + 1 or labels.shape != out.logits.shape[:1]:
        raise ValueError("seeclip_loss needs logits [B, C + 1], text [B, C + 1, d], labels [B]")
    labels = labels.to(out.logits.device)
    ali = alignment_loss(out.logits, labels)
    known = labels < c
    zero = out.logits.new_zeros(())
    if bool(known.any()):
        t_u = out.text[known, c]
        t_y = out.text[known, labels[known]]
        rep, coh = repulsion_loss(t_u, t_y, margin=margin), cohesion_loss(t_u, t_y)
        cos = F.cosine_similarity(t_u, t_y, dim=-1).detach()
        cos_uy, active = cos.mean(), (cos > margin).float().mean()
    else:
        rep, coh, cos_uy, active = zero, zero, zero, zero
    reg = l1_penalty(f_key_weights, reduction=reg_reduction).to(zero)
    total = ali + alpha * rep + beta * coh + gamma * reg
    return {
        "total": total,
        "ali": ali,
        "rep": rep,
        "coh": coh,
        "reg": reg,
        "cos_uy": cos_uy,
        "rep_active": active,
    }


def seeclip_weights(*, alpha: float, beta: float, gamma: float) -> dict[str, float]:
    """The weight of each term of :func:`seeclip_loss` in its total (what the trainer's
    gradient shares are computed for)."""
    return {"ali": 1.0, "rep": alpha, "coh": beta, "reg": gamma}


def seeclip_terms(out, labels, *, model: PromptModel, loss: LossConfig):
    """SeeCLIP's objective with the weights of the ``loss`` section and the model's F_key."""
    return seeclip_loss(
        out,
        labels,
        alpha=loss.alpha,
        beta=loss.beta,
        gamma=loss.gamma,
        margin=loss.margin,
        reg_reduction=loss.reg_reduction,
        f_key_weights=model.f_key_weights(),
    )


def build(
    env: MethodEnv, *, prompt: PromptConfig, loss: LossConfig, train: TrainConfig
) -> PromptTrainer:
    """SeeCLIP: semantic tokens + domain token in known prompts, learned unknown prompt."""
    model = seeded(
        env.seed,
        lambda: SeeCLIPModel(
            env.backbone,
            env.class_texts,
            k=prompt.k,
            m=prompt.m,
            semantic_tokens=prompt.semantic_tokens,
            text_precision=prompt.text_precision,
            shared_prefix=prompt.shared_prefix,
        ),
    )
    loss_fn = partial(seeclip_terms, model=model, loss=loss)
    weights = seeclip_weights(alpha=loss.alpha, beta=loss.beta, gamma=loss.gamma)
    return learner(env, model, loss_fn, RULE, prompt=prompt, train=train, term_weights=weights)
