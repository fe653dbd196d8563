"""Prompt models on the tiny random CLIP: shapes, prompts, the frozen backbone, checkpoints."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from seeclip.backbone import build_backbone
from seeclip.methods.cocoop import CoCoOpModel
from seeclip.methods.coop import CoOpModel
from seeclip.methods.prompts import PromptTemplate
from seeclip.methods.seeclip import SeeCLIPModel, seeclip_loss

CLASSES = ("dog", "hot dog stand", "cat", "tree")  # different lengths -> different EOT slots
B, C = 3, len(CLASSES)

BUILDERS = {
    "seeclip": lambda bb, **kw: SeeCLIPModel(bb, CLASSES, k=3, m=2, **kw),
    "seeclip_plain": lambda bb, **kw: SeeCLIPModel(bb, CLASSES, semantic_tokens=False, **kw),
    "coop": lambda bb, **kw: CoOpModel(bb, CLASSES, **kw),
    "coop_unknown": lambda bb, **kw: CoOpModel(bb, CLASSES, unknown_prompt=True, m=2, **kw),
    "cocoop": lambda bb, **kw: CoCoOpModel(bb, CLASSES, **kw),
}
WITH_UNKNOWN = {"seeclip", "seeclip_plain", "coop_unknown"}
PER_IMAGE = {"seeclip", "seeclip_plain", "cocoop"}


@pytest.fixture(scope="module")
def backbone():
    return build_backbone("tiny-vit", seed=0)


@pytest.fixture(scope="module")
def features(backbone):
    images = torch.randn(B, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return backbone.encode_image(images)


def _build(name, backbone, seed=0, **kw):
    torch.manual_seed(seed)
    return BUILDERS[name](backbone, **kw)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_output_shapes(name, backbone, features):
    model = _build(name, backbone)
    out = model(*features)
    p = C + 1 if name in WITH_UNKNOWN else C
    assert model.num_known == C and model.has_unknown_prompt == (name in WITH_UNKNOWN)
    assert out.logits.shape == (B, p)
    assert out.text.shape == (B, p, backbone.embed_dim)
    torch.testing.assert_close(out.text.norm(dim=-1), torch.ones(B, p))
    g, text, logits = features[0], out.text.detach(), out.logits.detach()
    for b in range(B):  # z = tau * cos(global feature, prompt feature), one pair at a time
        for q in range(p):
            cos = float(g[b] @ text[b, q]) / float(g[b].norm() * text[b, q].norm())
            want = backbone.logit_scale * cos
            assert float(logits[b, q]) == pytest.approx(want, rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_one_text_encoder_call(name, backbone, features):
    # the full path (the shared-prefix path encodes prefixes and suffixes separately)
    model = _build(name, backbone, **({"shared_prefix": False} if name in PER_IMAGE else {}))
    calls = []
    original = backbone.encode_text_embeddings

    def spy(embeds, eot_index, **kwargs):
        calls.append(embeds.shape[0])
        return original(embeds, eot_index, **kwargs)

    backbone.encode_text_embeddings = spy  # an instance attribute shadows the method
    try:
        model(*features)
    finally:
        del backbone.encode_text_embeddings
    p = C + 1 if name in WITH_UNKNOWN else C
    assert calls == [B * p if name in PER_IMAGE else p]  # CoOp: encoded once, not per image


@pytest.mark.parametrize("name", list(BUILDERS))
def test_prompts_per_image_or_shared(name, backbone, features):
    text = _build(name, backbone)(*features).text
    if name in PER_IMAGE:
        assert not torch.allclose(text[0], text[1])
    else:
        assert torch.equal(text[0], text[1]) and torch.equal(text[1], text[2])


def test_semantic_attention(backbone, features):
    model = _build("seeclip", backbone)
    tokens = features[1]
    a = model.semantic.attention(tokens).detach()
    assert a.shape == (B, 3, backbone.num_patches)
    q = model.semantic.queries.detach()
    for b in range(B):  # a[b, k, n] = exp(f_n . q_k) / sum_m exp(f_m . q_k)
        for k in range(3):
            e = [math.exp(float(tokens[b, n] @ q[k])) for n in range(backbone.num_patches)]
            want = torch.tensor([x / sum(e) for x in e])
            torch.testing.assert_close(a[b, k], want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a.sum(dim=-1), torch.ones(B, 3))
    v = model.semantic.summaries(tokens)
    torch.testing.assert_close(v, torch.einsum("bkn,bnd->bkd", a, tokens))
    assert model.semantic(tokens).shape == (B, 3, backbone.text_width)
    torch.testing.assert_close(model.semantic(tokens)[:, 1], model.semantic.f_key[1](v[:, 1]))


@pytest.mark.parametrize("name", list(BUILDERS))
def test_backbone_frozen_after_a_step(name, backbone, features):
    model = _build(name, backbone)
    model.train()
    assert not backbone.model.training
    before = copy.deepcopy(backbone.state_dict())
    opt = torch.optim.AdamW(model.learnable_parameters(), lr=1e-2)
    labels = torch.tensor([0, 3, C if name in WITH_UNKNOWN else 1])
    out = model(*features)
    if model.has_unknown_prompt:
        loss = seeclip_loss(out, labels, f_key_weights=model.f_key_weights())["total"]
    else:
        loss = F.cross_entropy(out.logits, labels)
    loss.backward()
    opt.step()
    after = backbone.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None and not p.requires_grad for p in backbone.parameters())
    learnable = model.named_learnable_parameters()
    assert learnable and len(learnable) == len(list(model.parameters())) - len(
        list(backbone.parameters())
    )
    for n, p in learnable:
        assert p.grad is not None and p.grad.abs().sum() > 0, n


@pytest.mark.parametrize("name", list(BUILDERS))
def test_learnable_state_round_trip(name, backbone, features):
    model = _build(name, backbone, seed=0)
    state = model.state_dict_learnable()
    assert not any(k.startswith("backbone") for k in state)
    assert set(state) == {n for n, _ in model.named_learnable_parameters()}
    other = _build(name, backbone, seed=1)
    assert not torch.equal(other(*features).logits, model(*features).logits)
    other.load_state_dict_learnable(state)
    assert torch.equal(other(*features).logits, model(*features).logits)
    with pytest.raises(KeyError):
        other.load_state_dict_learnable({k: v for k, v in list(state.items())[1:]})


def test_seeclip_f_key_weights(backbone):
    assert len(_build("seeclip", backbone).f_key_weights()) == 3
    assert _build("seeclip_plain", backbone).f_key_weights() == []
    assert not any("f_key" in k for k in _build("seeclip_plain", backbone).state_dict_learnable())


@pytest.mark.parametrize(
    ("shape", "per_image"),
    [((2, 64), False), ((C, 2, 64), False), ((B, 2, 64), True), ((B, C, 2, 64), True)],
)
def test_assembled_prompt_keeps_the_class_text(shape, per_image, backbone):
    template = PromptTemplate(backbone, CLASSES, 2)
    ctx = torch.randn(*shape)
    embeds = template.assemble(ctx, per_image=per_image)
    ids = backbone.tokenize(template.texts)
    table = backbone.token_table
    length = template.length
    assert length == int(backbone.eot_index(ids).max()) + 1  # "hot dog stand" is the longest
    images = range(B) if per_image else [None]
    assert embeds.shape == ((B,) if per_image else ()) + (C, length, backbone.text_width)

    def context(b, c, j):  # which learned vector goes to slot j of class c's prompt (image b)
        return {
            (2, 64): lambda: ctx[j],  # one set for every prompt
            (C, 2, 64): lambda: ctx[c, j],  # one set per prompt
            (B, 2, 64): lambda: ctx[b, j],  # one set per image, shared by its prompts
            (B, C, 2, 64): lambda: ctx[b, c, j],  # one set per image and prompt
        }[tuple(shape)]()

    for b in images:
        for c in range(C):
            row = embeds[c] if b is None else embeds[b, c]
            for pos in range(length):
                if pos in (1, 2):  # the two placeholder slots right after [SOS]
                    want = context(b, c, pos - 1)
                else:  # [SOS], the class text, ".", [EOS] and padding: the token's embedding
                    want = table[ids[c, pos]]
                assert torch.equal(row[pos], want), (b, c, pos)


def test_template_rejects_wrong_context(backbone):
    template = PromptTemplate(backbone, CLASSES, 2)
    with pytest.raises(ValueError):
        template.assemble(torch.randn(B, 2, 64))  # 3-d shared context needs P = C rows
    with pytest.raises(ValueError):
        template.assemble(torch.randn(3, 64))


def test_coop_with_placeholder_context_is_plain_clip(backbone):
    model = CoOpModel(backbone, CLASSES, n_ctx=4, unknown_prompt=True, m=2)
    x = backbone.embed_tokens(backbone.tokenize(["X"]))[0, 1]
    with torch.no_grad():
        model.ctx.copy_(x.expand_as(model.ctx))
        model.unknown_ctx.copy_(x.expand_as(model.unknown_ctx))
        got = F.normalize(model.text_features(), dim=-1)
        texts = [*model.known_prompts.texts, *model.unknown_prompt.texts]
        expected = backbone.encode_text(texts)
    assert texts[1] == "X X X X hot dog stand." and texts[-1] == "X X unknown."
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["seeclip", "coop", "cocoop"])
def test_bf16_text_tower_is_close_to_fp32_and_trains(name, backbone, features):
    g, t = features
    model = _build(name, backbone)
    full = model(g, t)
    model = _build(name, backbone, text_precision="bf16")  # the same seed: the same weights
    assert model.text_autocast is torch.bfloat16
    half = model(g, t)
    assert half.text.dtype == torch.float32 == half.logits.dtype  # cast back
    cos = (full.text * half.text).sum(-1)  # both L2-normalised
    assert cos.min() > 0.99 and not torch.equal(full.text, half.text)  # bf16 did run
    half.logits.sum().backward()
    grads = [p.grad for p in model.learnable_parameters()]
    assert all(gr is not None and torch.isfinite(gr).all() for gr in grads)
