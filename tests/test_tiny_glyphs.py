"""tiny-glyphs: 36 tokens, the pretraining loop on the glyphs world, the shipped weights."""

import dataclasses

import numpy as np
import open_clip
import pytest
import torch
from open_clip.modified_resnet import AttentionPool2d
from safetensors.torch import load_file

from seeclip.backbone import build_backbone
from seeclip.cli.pretrain import config_from_args
from seeclip.datasets import get_benchmark
from seeclip.zoo.pretrain import default_config, load_benchmark_arrays, pretrain_clip, token_loss
from seeclip.zoo.pretrain import zero_shot_accuracy as accuracy
from seeclip.zoo.tiny_card import load_card
from seeclip.zoo.tiny_clip import TINY_MODELS, PooledAttentionPool2d, build_tiny_clip

WEIGHTS = TINY_MODELS["tiny-glyphs"].weights
SPEC = get_benchmark("glyphs")
NAMES = tuple(SPEC.class_text(c) for c in SPEC.classes)


def test_tiny_glyphs_has_36_tokens_and_its_pool_equals_open_clips():
    model, preprocess, _ = build_tiny_clip("tiny-glyphs", seed=1)
    assert isinstance(model.visual.attnpool, PooledAttentionPool2d)
    assert build_backbone("tiny-glyphs-random").num_patches == 36  # 48 px at output stride 8
    x = torch.randn(3, 3, 48, 48)
    pooled = model.encode_image(x)
    pool = model.visual.attnpool
    reference = AttentionPool2d(
        6, pool.k_proj.in_features, pool.num_heads, pool.c_proj.out_features
    )
    reference.load_state_dict(pool.state_dict())
    model.visual.attnpool = reference
    torch.testing.assert_close(model.encode_image(x), pooled, atol=1e-6, rtol=1e-5)


def test_glyphs_config_defaults_and_overrides():
    cfg = config_from_args(None, ["steps=7"], "glyphs")
    assert (cfg.world, cfg.steps, cfg.corpus_size, cfg.bf16) == ("glyphs", 7, 100000, False)
    assert default_config("digits").corpus_size == 60000
    assert (cfg.token_steps, cfg.token_weight) == (800, 3.0)  # the shipped run, docs/tiny_clip.md
    assert default_config("digits").token_steps == 0
    with pytest.raises(ValueError, match="no world"):
        default_config("nope")


def _tiny_cfg(**kw):
    base = dict(
        steps=4,
        batch_size=16,
        corpus_size=232,
        warmup_steps=2,
        checkpoint_every=2,
        eval_templates=("a photo of the {}.",),
        num_threads=1,
        eval_n_per_class=1,
        token_steps=0,
    )
    return dataclasses.replace(default_config("glyphs"), **{**base, **kw})


def test_glyphs_pretraining_resumes_bit_for_bit(tmp_path):
    cfg = _tiny_cfg()
    bench = load_benchmark_arrays(n_per_class=1, world="glyphs")
    assert set(bench) == set(SPEC.domains) and bench["printed"][0].shape == (24, 48, 48, 3)
    full = pretrain_clip(cfg, tmp_path / "a", progress=False, benchmark=bench)
    part = pretrain_clip(cfg, tmp_path / "b", progress=False, stop_at=2, benchmark=bench)
    assert part["step"] == 2
    pretrain_clip(cfg, tmp_path / "b", progress=False, benchmark=bench)
    a = load_file(str(tmp_path / "a" / "tiny-glyphs.safetensors"))
    b = load_file(str(tmp_path / "b" / "tiny-glyphs.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert full["name"] == "tiny-glyphs" and full["data"]["generator"].endswith(
        "glyphs.generate_corpus"
    )
    assert full["zero_shot"]["classnames"] == list(NAMES)
    build_tiny_clip("tiny-glyphs", tmp_path / "a" / "tiny-glyphs.safetensors")  # strict load
    with pytest.raises(ValueError, match="tiny-glyphs"):
        build_tiny_clip("tiny-digits", tmp_path / "a" / "tiny-glyphs.safetensors")


def test_token_loss_scores_each_caption_by_the_best_token():
    tokens = torch.tensor([[[1.0, 0.0], [0.0, 2.0]], [[3.0, 0.0], [1.0, 1.0]]], requires_grad=True)
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    scale = torch.tensor(0.0)  # exp(0) = 1
    # image 0: caption 0 best matched by token 0 (cos 1), caption 1 by token 1 (cos 1)
    # image 1: caption 0 by token 0 (cos 1), caption 1 by token 1 (cos 1/sqrt(2))
    logits = torch.tensor([[1.0, 1.0], [1.0, 2**-0.5]])
    expected = torch.nn.functional.cross_entropy(logits, torch.arange(2))
    loss = token_loss(tokens, text, scale)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert tokens.grad.abs().sum() > 0


def _token_tower_state(path):
    return {k: v for k, v in load_file(str(path)).items()}


def test_token_stage_trains_only_the_image_tower_and_resumes_bit_for_bit(tmp_path):
    """Two CLIP steps, then three token-stage steps: the text tower and logit scale leave the
    token stage exactly as the first stage's fp16 weights had them, the image tower moves; a run
    stopped at the stage boundary or inside the token stage resumes to the same weights; and
    ``init`` from the first stage's file gives the same weights as the run end to end (so the
    shipped model is reproducible from the previous shipped file)."""
    cfg = _tiny_cfg(steps=2, token_steps=3, token_batch_size=8, checkpoint_every=1)
    bench = load_benchmark_arrays(n_per_class=1, world="glyphs")
    card = pretrain_clip(cfg, tmp_path / "a", progress=False, benchmark=bench)
    assert card["token_stage"]["steps"] == 3 and card["training"]["steps"] == 2
    stage1 = _token_tower_state(tmp_path / "a" / "tiny-glyphs.stage1.safetensors")
    final = _token_tower_state(tmp_path / "a" / "tiny-glyphs.safetensors")
    assert stage1.keys() == final.keys()
    text_side = [k for k in final if not k.startswith("visual.")]
    assert "logit_scale" in text_side and "token_embedding.weight" in text_side
    assert all(torch.equal(stage1[k], final[k]) for k in text_side)
    moved = [k for k in final if k.startswith("visual.") and not torch.equal(stage1[k], final[k])]
    assert "visual.layer4.0.conv1.weight" in moved and "visual.attnpool.v_proj.weight" in moved

    for stop in (2, 3):  # the boundary, inside the token stage
        out = tmp_path / f"stop{stop}"
        part = pretrain_clip(cfg, out, progress=False, stop_at=stop, benchmark=bench)
        assert part["step"] == stop
        pretrain_clip(cfg, out, progress=False, benchmark=bench)
        resumed = _token_tower_state(out / "tiny-glyphs.safetensors")
        assert all(torch.equal(resumed[k], final[k]) for k in final), stop

    (tmp_path / "a" / "tiny-glyphs.stage1.card.json").write_text('{"command": "stage one"}')
    card = pretrain_clip(
        cfg,
        tmp_path / "init",
        progress=False,
        benchmark=bench,
        init=tmp_path / "a" / "tiny-glyphs.stage1.safetensors",
    )
    from_init = _token_tower_state(tmp_path / "init" / "tiny-glyphs.safetensors")
    assert all(torch.equal(from_init[k], final[k]) for k in final)
    assert card["training"]["stage1"] == {"command": "stage one"}
    assert len(card["training"]["init"]["sha256"]) == 64


def test_token_stage_init_is_refused_without_token_steps(tmp_path):
    weights = tmp_path / "w.safetensors"
    with pytest.raises(ValueError, match="token_steps is 0; pass token_steps=N"):
        pretrain_clip(_tiny_cfg(), tmp_path / "o", progress=False, init=weights)
    with pytest.raises(ValueError, match="no such file"):
        pretrain_clip(_tiny_cfg(token_steps=2), tmp_path / "o", progress=False, init=weights)


@pytest.mark.slow
def test_reduced_budget_glyphs_run_learns(tmp_path):
    """The glyphs loop on a small budget: the loss falls and zero-shot *style* accuracy (4-way)
    on benchmark images rises above chance, which the random tower does not."""
    cfg = _tiny_cfg(
        steps=60, batch_size=32, corpus_size=384, lr=2e-3, warmup_steps=6, checkpoint_every=1000
    )
    bench = load_benchmark_arrays(n_per_class=2, world="glyphs")
    card = pretrain_clip(cfg, tmp_path, progress=False, benchmark=bench)
    assert card["training"]["loss_last"] < card["training"]["loss_first"] - 0.5
    images = np.concatenate([x for x, _ in bench.values()])
    styles = np.repeat(np.arange(len(bench)), [len(x) for x, _ in bench.values()])
    words = {
        "printed": "printed",
        "outline": "outline",
        "textured": "textured",
        "handwritten": "handwritten",
    }
    names = [f"{words[d]} letter" for d in bench]

    def style_accuracy(model, tokenizer) -> float:
        data = {"all": (images, styles)}
        return accuracy(model, tokenizer, data, templates=("a {}",), classnames=names)["all"]

    trained, _, tokenizer = build_tiny_clip("tiny-glyphs", tmp_path / "tiny-glyphs.safetensors")
    random_init, _, _ = build_tiny_clip("tiny-glyphs", seed=0)
    assert style_accuracy(trained, tokenizer) > 0.35  # chance is 0.25; measured 0.380
    assert style_accuracy(random_init, tokenizer) < 0.32


def test_shipped_tiny_glyphs_rebuilds_exactly():
    assert WEIGHTS.stat().st_size <= 30 * 2**20
    model, _, tokenizer = build_tiny_clip("tiny-glyphs", WEIGHTS)
    shipped = load_file(str(WEIGHTS))
    for k, v in model.state_dict().items():
        assert torch.equal(v, shipped[k].float()), k
    card = load_card(TINY_MODELS["tiny-glyphs"].card)
    assert card["name"] == "tiny-glyphs" and card["zero_shot"]["classnames"] == list(NAMES)
    w = open_clip.build_zero_shot_classifier(
        model, tokenizer, NAMES, card["zero_shot"]["templates"]
    ).T
    assert (w @ w.T)[~torch.eye(len(NAMES), dtype=torch.bool)].max() < 0.98


@pytest.mark.slow
def test_shipped_tiny_glyphs_zero_shot_on_a_benchmark_subset():
    """The shipped file has its card's quality: on the first 10 images of every class and
    domain (960 images), within 8 points of the card's mean."""
    model, _, tokenizer = build_tiny_clip("tiny-glyphs", WEIGHTS)
    card = load_card(TINY_MODELS["tiny-glyphs"].card)
    bench = load_benchmark_arrays(n_per_class=100, limit_per_class=10, world="glyphs")
    acc = accuracy(
        model, tokenizer, bench, templates=card["zero_shot"]["templates"], classnames=NAMES
    )
    assert np.mean(list(acc.values())) >= card["zero_shot"]["ensemble"]["mean"] - 0.08, acc


def test_cli_init_without_token_steps_is_one_line(tmp_path, capsys):
    from seeclip import cli

    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"")
    code = cli.main(
        [
            "pretrain-clip",
            "--world",
            "glyphs",
            "--out",
            str(tmp_path / "o"),
            "--init",
            str(weights),
            "token_steps=0",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0 and len(err) == 1 and "pass token_steps=N" in err[0]
    assert not (tmp_path / "o").exists()  # refused before any work
