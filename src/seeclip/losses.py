"""SeeCLIP's training losses (METHOD.md, Losses), as plain functions.

L = L_ali + alpha L_rep + beta L_coh + gamma L_reg, with labels 0..C-1 for known source images
and C for pseudo-unknowns.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from seeclip.methods.models import PromptOutput

__all__ = [
    "alignment_loss",
    "alignment_terms",
    "cohesion_loss",
    "l1_penalty",
    "repulsion_loss",
    "seeclip_loss",
    "seeclip_weights",
]


def alignment_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """L_ali: cross-entropy over the C + 1 logits [B, C + 1]; label C is "unknown"."""
    return F.cross_entropy(logits, labels)


def repulsion_loss(t_unknown: Tensor, t_true: Tensor, *, margin: float = 0.5) -> Tensor:
    """L_rep = mean_b max(0, cos(t_u,b, t_y_b) - margin): pushes the unknown prompt away.

    Only pairs whose cosine exceeds the margin contribute, and their gradient lowers the
    cosine. (The released code has the sign inverted, which pulls the prompts together.)

    Args:
        t_unknown: [B, d] unknown-prompt features of each image.
        t_true: [B, d] the ground-truth known-class prompt features of the same images.
        margin: m_rep.
    """
    cos = F.cosine_similarity(t_unknown, t_true, dim=-1)
    return (cos - margin).clamp(min=0).mean()


def cohesion_loss(t_unknown: Tensor, t_true: Tensor) -> Tensor:
    """L_coh = MSE(mean_b t_u,b, mean_b t_y_b), the squared error averaged over the d dims."""
    return F.mse_loss(t_unknown.mean(dim=0), t_true.mean(dim=0))


def l1_penalty(weights: Iterable[Tensor | nn.Module], *, reduction: str = "mean") -> Tensor:
    """L_reg: the L1 norm of the given F_key weights, summed or averaged over their entries.

    The paper writes an L1 norm (``"sum"``). The mean divides it by the number of entries
    (K x d x d_text, about a million at ViT-B/16 widths), which keeps gamma independent of the
    widths but makes gamma L_reg tiny (5e-4 measured on tiny-digits). A module stands for all
    its ``weight`` parameters (biases are not penalised). No weights give 0.
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    tensors: list[Tensor] = []
    for w in weights:
        if isinstance(w, nn.Module):
            tensors.extend(p for n, p in w.named_parameters() if n.rsplit(".", 1)[-1] == "weight")
        else:
            tensors.append(w)
    if not tensors:
        return torch.zeros(())
    total = sum(t.abs().sum() for t in tensors)
    return total if reduction == "sum" else total / sum(t.numel() for t in tensors)


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
    return {"total": total, "ali": ali, "rep": rep, "coh": coh, "reg": reg, "cos_uy": cos_uy,
            "rep_active": active}  # fmt: skip


def seeclip_weights(*, alpha: float, beta: float, gamma: float) -> dict[str, float]:
    """The weight of each term of :func:`seeclip_loss` in its total (what the trainer's
    gradient shares are computed for)."""
    return {"ali": 1.0, "rep": alpha, "coh": beta, "reg": gamma}


def alignment_terms(out: PromptOutput, labels: Tensor) -> dict[str, Tensor]:
    """The objective of the CoOp family, L_ali alone, in the trainer's ``{"total", ...}`` form."""
    ali = alignment_loss(out.logits, labels)
    return {"total": ali, "ali": ali}
