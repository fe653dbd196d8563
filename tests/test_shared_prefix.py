"""Shared-prefix text encoding (seeclip.methods.shared_prefix) equals the full path.

Each case runs one model twice, ``shared_prefix`` off (every prompt through the text tower, the
reference) and on (each image's prefix once, class texts against its cached keys and values),
and compares the logits, the text features and the gradient of every learnable tensor: within
1e-12 in float64 and 1e-5 in float32 (relative to a tensor's scale where it exceeds 1:
:func:`_assert_same`). The broken-cache cases show that the check can fail.
"""

from __future__ import annotations

import functools

import open_clip
import pytest
import torch
from open_clip.model import CLIPTextCfg, CLIPVisionCfg

import seeclip.backbone as backbone_module
from seeclip.backbone import Backbone, build_backbone
from seeclip.config import ConfigError, apply_overrides
from seeclip.methods import shared_prefix
from seeclip.methods.cocoop import CoCoOpModel
from seeclip.methods.prompt_model import PromptConfig
from seeclip.methods.prompts import PromptTemplate
from seeclip.methods.seeclip import SeeCLIPModel
from seeclip.methods.shared_prefix import Suffixes, encode_shared_prefix, supports_shared_prefix
from seeclip.run_config import RunConfig

B = 3
TOL = {torch.float64: 1e-12, torch.float32: 1e-5}
CLASS_SETS = {  # class counts 1, 4 and 11; names of 1 to 4 tokens
    "one": ("dog",),
    "four": ("dog", "hot dog stand", "cat", "alarm clock"),
    "eleven": (
        "dog",
        "elephant",
        "giraffe",
        "guitar",
        "horse",
        "house",
        "person",
        "flip flops",
        "file cabinet",
        "paper clip",
        "the eiffel tower",
    ),
}
METHODS = {
    "seeclip": lambda bb, texts, **kw: SeeCLIPModel(bb, texts, k=3, m=2, **kw),
    "seeclip_plain": lambda bb, texts, **kw: SeeCLIPModel(
        bb, texts, k=2, m=3, semantic_tokens=False, **kw
    ),
    "cocoop": lambda bb, texts, **kw: CoCoOpModel(bb, texts, n_ctx=3, **kw),
}


def _small77() -> Backbone:
    """A random open_clip ViT with CLIP's 77-token context, layer scale and a biased linear
    text projection (the branches tiny-vit does not have)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = open_clip.CLIP(
            embed_dim=32,
            vision_cfg=CLIPVisionCfg(
                layers=1, width=32, head_width=16, patch_size=8, image_size=16
            ),
            text_cfg=CLIPTextCfg(
                context_length=77, width=32, heads=4, layers=3, ls_init_value=0.5, proj_bias=True
            ),
        )
    tokenizer = open_clip.get_tokenizer("ViT-B-16")
    return Backbone(model, None, tokenizer, name="small77", arch="small77", pretrained=None)


@functools.cache
def _backbone(name: str, dtype: torch.dtype) -> Backbone:
    bb = _small77() if name == "small77" else build_backbone(name)
    return bb.to(dtype)


def _model(method: str, backbone: Backbone, texts, dtype, **kw):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return METHODS[method](backbone, texts, **kw).to(dtype)


def _features(backbone: Backbone, dtype):
    gen = torch.Generator().manual_seed(1)
    d, n = backbone.embed_dim, backbone.num_patches
    return torch.randn(B, d, generator=gen).to(dtype), torch.randn(B, n, d, generator=gen).to(dtype)


def _run(model, features, *, shared: bool) -> dict[str, torch.Tensor]:
    """Logits, text features and the gradient of every learnable tensor (of a loss that reads
    every logit and text feature), with ``shared_prefix`` on or off; also counts full-path
    calls of the text tower."""
    model.shared_prefix = shared
    calls = []
    backbone = model.backbone
    original = backbone.encode_text_embeddings

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    backbone.encode_text_embeddings = spy  # an instance attribute shadows the method
    try:
        out = model(*features)
    finally:
        del backbone.encode_text_embeddings
    gen = torch.Generator().manual_seed(2)
    w_logits = torch.randn(out.logits.shape, generator=gen).to(out.logits)
    w_text = torch.randn(out.text.shape, generator=gen).to(out.text)
    loss = (out.logits * w_logits).sum() + (out.text * w_text).sum()
    names, params = zip(*model.named_learnable_parameters(), strict=True)
    if loss.requires_grad:  # not when a broken cache cuts the learned tokens off
        grads = torch.autograd.grad(loss, params, allow_unused=True)
    else:
        grads = [None] * len(params)
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]
    result = {"logits": out.logits, "text": out.text, "full_path_calls": len(calls)}
    result.update({f"grad {n}": g for n, g in zip(names, grads, strict=True)})
    return result


def _assert_same(ref: dict, got: dict, tol: float) -> None:
    """max |got - ref| <= tol * max(1, max |ref|) for every tensor: absolute for the logits
    and unit-norm text features, relative to the tensor's scale for gradients (some reach 20,
    where float32 rounding alone is 1e-6 x 20)."""
    for key, want in ref.items():
        if key != "full_path_calls":
            want = want.detach()
            assert got[key].shape == want.shape and got[key].dtype == want.dtype, key
            err = float((got[key].detach() - want).abs().max())
            assert err <= tol * max(1.0, float(want.abs().max())), f"{key}: {err:.2e}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("classes", list(CLASS_SETS))
@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("name", ["tiny-vit", "small77"])
def test_shared_prefix_equals_the_full_path(name, method, classes, dtype):
    backbone = _backbone(name, dtype)
    assert supports_shared_prefix(backbone)
    model = _model(method, backbone, CLASS_SETS[classes], dtype)
    features = _features(backbone, dtype)
    full = _run(model, features, shared=False)
    shared = _run(model, features, shared=True)
    assert full["full_path_calls"] == 1 and shared["full_path_calls"] == 0  # each path ran
    assert shared["logits"].dtype == dtype
    _assert_same(full, shared, TOL[dtype])
    # the gradients reach every learned tensor through the cache: none is vacuously equal
    for key, grad in shared.items():
        if key.startswith("grad"):
            assert grad.abs().max() > 0, key


@pytest.mark.parametrize("method", ["seeclip", "cocoop"])
@pytest.mark.parametrize("name", ["tiny-vit", "small77"])
def test_the_longest_prompt_the_context_allows_and_one_past_it(name, method):
    """A class name that brings the end token to the context's last free slot uses the last
    positional embeddings and is exact; one token more would be truncated by the tokenizer,
    which the prompt template refuses for both paths (they share it)."""
    backbone = _backbone(name, torch.float64)
    n_ctx = 1 + 3 if method == "seeclip" else 3  # [dom][sem_1..3] or [ctx_1..3]
    fill = backbone.context_length - 4 - n_ctx  # [SOS] ctx name . [EOS] ends at context - 2
    texts = ("dog", " ".join(["dog"] * fill), "cat")
    model = _model(method, backbone, texts, torch.float64)
    assert int(model.known_prompts.eot_index.max()) == backbone.context_length - 2
    features = _features(backbone, torch.float64)
    _assert_same(_run(model, features, shared=False), _run(model, features, shared=True), 1e-12)
    with pytest.raises(ValueError, match="fills the whole context"):
        _model(method, backbone, ("dog", " ".join(["dog"] * (fill + 1))), torch.float64)


def test_equals_open_clips_own_transformer_on_the_whole_77_token_context(monkeypatch):
    """Against the most literal reference: open_clip's transformer on all 77 positions
    (padding included, nothing truncated, no end-token-only last block)."""
    monkeypatch.setattr(backbone_module, "EOT_ONLY_LAST_BLOCK", False)
    backbone = _backbone("small77", torch.float64)
    n = 3
    texts = [f"X X X {c}." for c in ("dog", "hot dog stand", "cat", "the eiffel tower")]
    ids = backbone.tokenize(texts)
    eot = backbone.eot_index(ids)
    table = backbone.embed_tokens(ids).double()  # [P, 77, w], padding embeddings included
    ctx = torch.randn(B, n, backbone.text_width, dtype=torch.float64, requires_grad=True)
    full_prompts = table.expand(B, -1, -1, -1).clone()
    full_prompts[:, :, 1 : 1 + n] = ctx[:, None]
    full = backbone.encode_text_embeddings(
        full_prompts.flatten(0, 1), eot.repeat(B), truncate=False
    ).unflatten(0, (B, len(texts)))
    prefix = torch.cat([table[0, :1].expand(B, 1, -1), ctx], dim=1)
    shared = encode_shared_prefix(backbone, prefix, [Suffixes(table[:, 1 + n :], eot, 1 + n)])
    torch.testing.assert_close(shared, full, rtol=1e-12, atol=1e-12)
    weights = torch.randn_like(full)
    (g_full,) = torch.autograd.grad((full * weights).sum(), ctx)
    (g_shared,) = torch.autograd.grad((shared * weights).sum(), ctx)
    torch.testing.assert_close(g_shared, g_full, rtol=1e-12, atol=1e-12)


BREAKAGES = {
    # the suffix attends to itself only, not to the cached prefix
    "suffix ignores the prefix": lambda past, new, keep: new,
    # each image's suffixes read the next image's prefix
    "another image's prefix": lambda past, new, keep: keep(past.roll(1, dims=0), new),
    # the cache misses its last position
    "cache one position short": lambda past, new, keep: keep(past[..., :-1, :], new),
}


@pytest.mark.parametrize("breakage", list(BREAKAGES))
@pytest.mark.parametrize("method", ["seeclip", "cocoop"])
def test_a_broken_cache_fails_the_check(method, breakage, monkeypatch):
    backbone = _backbone("tiny-vit", torch.float64)
    model = _model(method, backbone, CLASS_SETS["four"], torch.float64)
    features = _features(backbone, torch.float64)
    full = _run(model, features, shared=False)
    keep = shared_prefix._with_past
    monkeypatch.setattr(
        shared_prefix, "_with_past", lambda past, new: BREAKAGES[breakage](past, new, keep)
    )
    with pytest.raises(AssertionError):
        _assert_same(full, _run(model, features, shared=True), 1e-5)


@pytest.mark.parametrize("method", ["seeclip", "cocoop"])
def test_bf16_autocast_runs_on_the_shared_path(method):
    backbone = _backbone("small77", torch.float32)
    features = _features(backbone, torch.float32)
    reference = _run(
        _model(method, backbone, CLASS_SETS["four"], torch.float32), features, shared=True
    )
    model = _model(method, backbone, CLASS_SETS["four"], torch.float32, text_precision="bf16")
    full, shared = _run(model, features, shared=False), _run(model, features, shared=True)
    assert shared["text"].dtype == torch.float32 and shared["full_path_calls"] == 0
    assert not torch.equal(shared["text"], reference["text"])  # bf16 did run
    for out in (full, shared):  # both are as close to float32 as bf16 allows
        assert (out["text"] * reference["text"]).sum(-1).min() > 0.99
    assert (shared["text"] * full["text"]).sum(-1).min() > 0.99


def test_an_unsupported_text_tower_falls_back_to_the_full_path():
    backbone = _small77()
    backbone.model.transformer.grad_checkpointing = True  # the full path's business
    assert not supports_shared_prefix(backbone)
    model = _model("seeclip", backbone, CLASS_SETS["four"], torch.float32)
    assert _run(model, _features(backbone, torch.float32), shared=True)["full_path_calls"] == 1


def test_the_config_switch_is_on_by_default_and_out_of_the_hash():
    assert PromptConfig().shared_prefix is True
    cfg = RunConfig()
    assert apply_overrides(cfg, ["prompt.shared_prefix=true"]).hash() == cfg.hash()
    assert apply_overrides(cfg, ["prompt.shared_prefix=false"]).hash() != cfg.hash()
    with pytest.raises(ConfigError, match="shared_prefix"):
        PromptConfig(shared_prefix="yes")
    backbone = _backbone("tiny-vit", torch.float32)
    assert SeeCLIPModel(backbone, ("dog",)).shared_prefix is True
    assert CoCoOpModel(backbone, ("dog",)).shared_prefix is True


@pytest.mark.parametrize("method", ["seeclip", "cocoop"])
def test_build_wires_the_switch(method):
    from seeclip.config import TrainConfig
    from seeclip.methods import cocoop, seeclip
    from seeclip.methods.base import MethodEnv

    env = MethodEnv(_backbone("tiny-vit", torch.float32), ("dog", "cat"), "a photo of a {}.")
    extra = {"loss": seeclip.LossConfig()} if method == "seeclip" else {}
    for on in (True, False):
        build = seeclip.build if method == "seeclip" else cocoop.build
        trainer = build(env, prompt=PromptConfig(shared_prefix=on), train=TrainConfig(), **extra)
        assert trainer.model.shared_prefix is on


def test_template_split_reassembles_the_prompts():
    backbone = _backbone("tiny-vit", torch.float32)
    template = PromptTemplate(backbone, CLASS_SETS["four"], 2)
    ctx = torch.randn(B, 2, backbone.text_width)
    prefix, suffixes = template.split(ctx)
    whole = template.assemble(ctx, per_image=True)  # [B, P, L, w]
    assert suffixes.prefix_len == 3
    torch.testing.assert_close(prefix, whole[:, 0, :3])
    torch.testing.assert_close(suffixes.embeds.expand(B, -1, -1, -1), whole[:, :, 3:])
