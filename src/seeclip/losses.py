"""Loss terms as plain functions, for methods to combine.

SeeCLIP's objective L = L_ali + alpha L_rep + beta L_coh + gamma L_reg is
:func:`seeclip.methods.seeclip.seeclip_loss`.

Labels are 0..C-1 for known source images and C for pseudo-unknowns.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seeclip.features import PromptOutput

__all__ = [
    "alignment_loss",
    "alignment_terms",
    "cohesion_loss",
    "l1_penalty",
    "repulsion_loss",
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


def alignment_terms(out: PromptOutput, labels: Tensor) -> dict[str, Tensor]:
    """The objective of the CoOp family, L_ali alone, in the trainer's ``{"total", ...}`` form."""
    ali = alignment_loss(out.logits, labels)
    return {"total": ali, "ali": ali}
