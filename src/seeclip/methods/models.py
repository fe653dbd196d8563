"""Learnable prompt models on a frozen CLIP: SeeCLIP and its prompt-learning baselines.

Every model maps cached image features (global ``[B, d]``, spatial tokens ``[B, N, d]``) to a
:class:`PromptOutput`. The backbone is registered as a frozen submodule (so ``.to(device)``
moves it) but never appears in :meth:`PromptModel.learnable_parameters` nor in
:meth:`PromptModel.state_dict_learnable`, and it stays in eval mode.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seeclip.methods.prompts import PromptTemplate, encode_prompts

__all__ = [
    "CoCoOpModel",
    "CoOpModel",
    "DomainToken",
    "PromptModel",
    "PromptOutput",
    "SeeCLIPModel",
    "SemanticTokens",
]

_BACKBONE = "backbone."


@dataclass(frozen=True)
class PromptOutput:
    """What a prompt model returns for B images and P prompts (P = C, or C + 1 with unknown)."""

    logits: Tensor  # [B, P] tau * cos(global image feature, t_c(x)); column C = unknown
    text: Tensor  # [B, P, d] L2-normalised text features t_c(x) (a broadcast view if shared)


def _normal(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.randn(*shape) * 0.02)  # N(0, 0.02), METHOD.md 2 and 5


class SemanticTokens(nn.Module):
    """Semantic-aware prompt enhancement (METHOD.md Model 2).

    a_ik = softmax_i(f_i . q_k), v_k = sum_i a_ik f_i, sem_k = F_key,k(v_k).

    Args:
        d: joint embedding width of the patch tokens f_i.
        d_text: token-embedding width of the text encoder.
        k: number of queries K.
    """

    def __init__(self, d: int, d_text: int, k: int = 4) -> None:
        super().__init__()
        self.queries = _normal(k, d)
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
    """[dom] = F_dom(mean_i f_i) (METHOD.md Model 3): [B, N, d] -> [B, d_text]."""

    def __init__(self, d: int, d_text: int) -> None:
        super().__init__()
        self.f_dom = nn.Linear(d, d_text)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.f_dom(tokens.to(self.f_dom.weight.dtype).mean(dim=1))


class PromptModel(nn.Module):
    """Shared plumbing: the frozen backbone, logits, learnable parameters and their state.

    Subclasses define ``forward(global_, tokens) -> PromptOutput``. Learnable parameters are
    created on the backbone's device.
    """

    num_known: int
    has_unknown_prompt: bool

    def __init__(self, backbone, num_known: int, has_unknown_prompt: bool) -> None:
        super().__init__()
        backbone.requires_grad_(False)
        self.backbone = backbone.eval()
        self.num_known = num_known
        self.has_unknown_prompt = has_unknown_prompt
        self.logit_scale = backbone.logit_scale  # tau, a frozen float
        # dtype of torch.autocast around the frozen text tower (None: full precision)
        self.text_autocast: torch.dtype | None = None

    def train(self, mode: bool = True) -> PromptModel:
        """Switches the learnable parts; the frozen backbone stays in eval mode."""
        super().train(mode)
        self.backbone.eval()
        return self

    def _output(self, global_: Tensor, text: Tensor) -> PromptOutput:
        """z_c = tau * cos(F(x), t_c(x)) (METHOD.md Model 6); text is [P, d] or [B, P, d]."""
        text = F.normalize(text, dim=-1)
        g = F.normalize(global_.to(text.dtype), dim=-1)
        if text.dim() == 2:
            logits = g @ text.T
            text = text.expand(g.shape[0], *text.shape)
        else:
            logits = torch.einsum("bd,bpd->bp", g, text)
        return PromptOutput(self.logit_scale * logits, text)

    def named_learnable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if not n.startswith(_BACKBONE)]

    def learnable_parameters(self) -> list[nn.Parameter]:
        """Every parameter except the frozen backbone's (what the optimiser gets)."""
        return [p for _, p in self.named_learnable_parameters()]

    def state_dict_learnable(self) -> dict[str, Tensor]:
        """The learnable parameters only (checkpoints never hold the backbone)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith(_BACKBONE)}

    def load_state_dict_learnable(self, state: Mapping[str, Tensor]) -> None:
        """Loads :meth:`state_dict_learnable` output; every learnable key must be present."""
        own = set(self.state_dict_learnable())
        missing, unexpected = sorted(own - set(state)), sorted(set(state) - own)
        if missing or unexpected:
            raise KeyError(f"learnable state mismatch: missing {missing}, unexpected {unexpected}")
        self.load_state_dict(dict(state), strict=False)

    def f_key_weights(self) -> list[Tensor]:
        """Weights that L_reg penalises (none for the baselines)."""
        return []


class SeeCLIPModel(PromptModel):
    """SeeCLIP's prompts (METHOD.md Model 2-6), one per image and class plus one unknown.

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
    ) -> None:
        super().__init__(backbone, len(class_texts), has_unknown_prompt=True)
        d, w = backbone.embed_dim, backbone.text_width
        self.semantic: SemanticTokens | None = SemanticTokens(d, w, k) if semantic_tokens else None
        self.ctx = None if semantic_tokens else _normal(k, w)
        self.domain = DomainToken(d, w)
        self.unknown_ctx = _normal(m, w)
        self.known_prompts = PromptTemplate(backbone, class_texts, 1 + k)
        self.unknown_prompt = PromptTemplate(backbone, [unknown_word], 1 + m)
        self.to(backbone.device)

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
        known = self.known_prompts.assemble(torch.cat([dom, sem], dim=1), per_image=True)
        unknown_ctx = torch.cat([dom, self.unknown_ctx.expand(b, -1, -1)], dim=1)
        unknown = self.unknown_prompt.assemble(unknown_ctx, per_image=True)
        text = encode_prompts(
            self.backbone,
            [known, unknown],
            [self.known_prompts.eot_index, self.unknown_prompt.eot_index],
            autocast=self.text_autocast,
        )
        return self._output(global_, text)


class CoOpModel(PromptModel):
    """CoOp (Zhou et al., IJCV'22): a shared learned context ``[SOS][v_1..v_n] <class> .``.

    With ``unknown_prompt`` a (C + 1)-th prompt ``[SOS][u_1..u_m] unknown .`` with its own
    vectors is added (the ``coop_unknown`` baseline). The P text features are the same for
    every image, so they are encoded once per forward and broadcast.
    """

    def __init__(
        self,
        backbone,
        class_texts: Sequence[str],
        *,
        n_ctx: int = 4,
        unknown_prompt: bool = False,
        m: int = 4,
        unknown_word: str = "unknown",
    ) -> None:
        super().__init__(backbone, len(class_texts), has_unknown_prompt=unknown_prompt)
        w = backbone.text_width
        self.ctx = _normal(n_ctx, w)
        self.known_prompts = PromptTemplate(backbone, class_texts, n_ctx)
        self.unknown_ctx = _normal(m, w) if unknown_prompt else None
        self.unknown_prompt = (
            PromptTemplate(backbone, [unknown_word], m) if unknown_prompt else None
        )
        self.to(backbone.device)

    def text_features(self) -> Tensor:
        """[P, d] text features (not normalised), shared by all images."""
        groups, eots = [self.known_prompts.assemble(self.ctx)], [self.known_prompts.eot_index]
        if self.unknown_prompt is not None:
            groups.append(self.unknown_prompt.assemble(self.unknown_ctx))
            eots.append(self.unknown_prompt.eot_index)
        return encode_prompts(self.backbone, groups, eots, autocast=self.text_autocast)

    def forward(self, global_: Tensor, tokens: Tensor) -> PromptOutput:
        return self._output(global_, self.text_features())


class CoCoOpModel(PromptModel):
    """CoCoOp (Zhou et al., CVPR'22): instance-conditional context v_i + pi(x).

    pi is the meta-net Linear(d, d // 16) - ReLU - Linear(d // 16, w) of the global image
    feature; prompts ``[SOS][v_1 + pi(x)..v_n + pi(x)] <class> .`` are built per image.
    """

    def __init__(self, backbone, class_texts: Sequence[str], *, n_ctx: int = 4) -> None:
        super().__init__(backbone, len(class_texts), has_unknown_prompt=False)
        d, w = backbone.embed_dim, backbone.text_width
        hidden = max(1, d // 16)
        self.ctx = _normal(n_ctx, w)
        self.meta_net = nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, w))
        self.known_prompts = PromptTemplate(backbone, class_texts, n_ctx)
        self.to(backbone.device)

    def forward(self, global_: Tensor, tokens: Tensor) -> PromptOutput:
        pi = self.meta_net(global_.to(self.ctx.dtype))  # [B, w]
        ctx = self.ctx.unsqueeze(0) + pi.unsqueeze(1)  # [B, n, w]
        text = self.known_prompts.encode(
            self.backbone, ctx, per_image=True, autocast=self.text_autocast
        )
        return self._output(global_, text)
