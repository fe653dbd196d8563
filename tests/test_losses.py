"""SeeCLIP's losses on hand-made vectors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from seeclip.features import PromptOutput
from seeclip.losses import (
    alignment_loss,
    cohesion_loss,
    l1_penalty,
    repulsion_loss,
)
from seeclip.methods.seeclip import seeclip_loss


def _unit(angle: float) -> torch.Tensor:
    return torch.tensor([math.cos(angle), math.sin(angle)])


def test_repulsion_zero_below_margin():
    t_y = torch.stack([_unit(0.0), _unit(0.0)])
    t_u = torch.stack([_unit(math.pi / 2), _unit(1.2)])  # cos 0 and 0.362 < 0.5
    t_u.requires_grad_(True)
    loss = repulsion_loss(t_u, t_y, margin=0.5)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(t_u.grad, torch.zeros_like(t_u))


def test_repulsion_pushes_above_margin():
    t_y = torch.stack([_unit(0.0), _unit(0.0)])
    angles = [0.3, 1.2]  # cos 0.955 (above the margin) and 0.362 (below)
    t_u = torch.stack([_unit(a) for a in angles]).requires_grad_(True)
    loss = repulsion_loss(t_u, t_y, margin=0.5)
    assert loss.item() == pytest.approx((math.cos(0.3) - 0.5) / 2, abs=1e-6)
    loss.backward()
    assert torch.equal(t_u.grad[1], torch.zeros(2))  # below the margin: no gradient
    with torch.no_grad():
        before = F.cosine_similarity(t_u, t_y, dim=-1)
        after = F.cosine_similarity(t_u - 0.1 * t_u.grad, t_y, dim=-1)
    assert after[0] < before[0]  # a descent step moves the unknown prompt away


def test_repulsion_margin_is_configurable():
    t_u, t_y = _unit(0.3)[None], _unit(0.0)[None]
    assert repulsion_loss(t_u, t_y, margin=0.99).item() == 0.0
    assert repulsion_loss(t_u, t_y, margin=0.0).item() == pytest.approx(math.cos(0.3), abs=1e-6)


def test_cohesion_by_hand():
    t_u = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # mean (0.5, 0.5)
    t_y = torch.tensor([[1.0, 1.0], [1.0, -1.0]])  # mean (1.0, 0.0)
    expected = ((0.5 - 1.0) ** 2 + (0.5 - 0.0) ** 2) / 2
    assert cohesion_loss(t_u, t_y).item() == pytest.approx(expected)


def test_alignment_is_cross_entropy():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 4, generator=g)
    labels = torch.tensor([0, 3, 1, 3, 2])
    assert torch.equal(alignment_loss(logits, labels), F.cross_entropy(logits, labels))


def test_l1_penalty_by_hand():
    a = torch.tensor([[1.0, -2.0], [0.5, 0.0]])
    b = torch.tensor([[-3.0]])
    assert l1_penalty([a, b]).item() == pytest.approx((1 + 2 + 0.5 + 0 + 3) / 5)
    lin = torch.nn.Linear(2, 1)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[2.0, -4.0]]))
        lin.bias.fill_(100.0)  # biases are not penalised
    assert l1_penalty([lin]).item() == pytest.approx(3.0)
    assert l1_penalty([]).item() == 0.0
    # the paper's L1 norm: the sum over entries
    assert l1_penalty([a, b], reduction="sum").item() == pytest.approx(6.5)
    assert l1_penalty([lin], reduction="sum").item() == pytest.approx(6.0)
    with pytest.raises(ValueError, match="'sum' or 'mean'"):
        l1_penalty([a], reduction="max")


def _output(b=4, c=3, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    text = F.normalize(torch.randn(b, c + 1, d, generator=g), dim=-1)
    logits = torch.randn(b, c + 1, generator=g)
    return PromptOutput(logits, text)


def test_seeclip_loss_total_and_known_only_terms():
    out = _output()
    labels = torch.tensor([0, 2, 3, 1])  # sample 2 is a pseudo-unknown (label C = 3)
    w = [torch.tensor([[0.5, -1.5]])]
    parts = seeclip_loss(out, labels, alpha=2.0, beta=0.25, gamma=0.1, margin=0.1, f_key_weights=w)
    known = torch.tensor([0, 1, 3])
    t_u = out.text[known, 3]
    t_y = out.text[known, labels[known]]
    assert torch.equal(parts["ali"], F.cross_entropy(out.logits, labels))
    torch.testing.assert_close(parts["rep"], repulsion_loss(t_u, t_y, margin=0.1))
    torch.testing.assert_close(parts["coh"], cohesion_loss(t_u, t_y))
    assert parts["reg"].item() == pytest.approx(1.0)
    expected = parts["ali"] + 2.0 * parts["rep"] + 0.25 * parts["coh"] + 0.1 * parts["reg"]
    torch.testing.assert_close(parts["total"], expected)
    assert set(parts) == {"total", "ali", "rep", "coh", "reg", "cos_uy", "rep_active"}
    cos = F.cosine_similarity(t_u, t_y, dim=-1)
    torch.testing.assert_close(parts["cos_uy"], cos.mean())
    assert parts["rep_active"].item() == pytest.approx(float((cos > 0.1).float().mean()))
    summed = seeclip_loss(out, labels, gamma=0.1, reg_reduction="sum", f_key_weights=w)
    assert summed["reg"].item() == pytest.approx(2.0)


def test_seeclip_loss_without_known_samples():
    out = _output()
    parts = seeclip_loss(out, torch.full((4,), 3))
    assert parts["rep"].item() == 0.0 and parts["coh"].item() == 0.0
    torch.testing.assert_close(parts["total"], parts["ali"])


def test_seeclip_loss_needs_matching_shapes():
    with pytest.raises(ValueError):
        seeclip_loss(_output(b=4), torch.zeros(3, dtype=torch.long))
