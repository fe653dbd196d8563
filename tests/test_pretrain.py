"""tiny-digits: output-stride-8 surgery, the pretraining loop, resume, the shipped weights."""

import argparse

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from seeclip.cli.pretrain import add_parser, config_from_args
from seeclip.config import ConfigError
from seeclip.datasets.digits import DIGIT_WORDS
from seeclip.zoo.loop import batch_indices
from seeclip.zoo.pretrain import (
    PretrainConfig,
    augment,
    checkpoint_weights,
    load_benchmark_arrays,
    pretrain_clip,
    to_input,
    zero_shot_accuracy,
)
from seeclip.zoo.tiny_card import load_card
from seeclip.zoo.tiny_clip import (
    ARCH,
    TINY_DIGITS_WEIGHTS,
    _register_configs,
    build_tiny_digits,
    output_stride8,
)


def _final_map(visual, x):
    return visual.layer4(visual.layer3(visual.layer2(visual.layer1(visual.stem(x)))))


def test_output_stride8_gives_16_tokens_without_new_parameters():
    _register_configs()
    plain = open_clip.create_model(ARCH, pretrained=None)
    x = torch.randn(2, 3, 32, 32)
    assert _final_map(plain.visual, x).shape[-2:] == (1, 1)
    model, _, _ = build_tiny_digits(seed=0)
    fmap = _final_map(model.visual, x)
    assert fmap.shape == (2, 1024, 4, 4)
    # MaskCLIP reading: each position through the attention pool's value and output projections
    pool = model.visual.attnpool
    tokens = pool.c_proj(pool.v_proj(fmap.flatten(2).transpose(1, 2)))
    assert tokens.shape == (2, 16, 128)
    assert model.encode_image(x).shape == (2, 128)

    before = {k: v.shape for k, v in plain.state_dict().items()}
    after = {k: v.shape for k, v in model.state_dict().items()}
    assert before.keys() == after.keys()
    changed = {k for k in before if before[k] != after[k]}
    assert changed == {"visual.attnpool.positional_embedding"}
    assert after["visual.attnpool.positional_embedding"] == (17, 1024)
    with pytest.raises(ValueError, match="already applied"):
        output_stride8(model)


def test_build_is_seeded_and_preprocess_matches_tensor_path():
    a, preprocess, tokenizer = build_tiny_digits(seed=3)
    b, _, _ = build_tiny_digits(seed=3)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(va, vb), k
    assert tokenizer(["a photo of the digit one."]).shape == (1, 24)
    img = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    torch.testing.assert_close(preprocess(Image.fromarray(img)), to_input(img[None])[0])


def test_augment_is_seeded_and_batches_cycle_the_corpus():
    cfg = PretrainConfig()
    imgs = torch.randint(0, 256, (8, 32, 32, 3), dtype=torch.uint8)
    a = augment(imgs, cfg, torch.Generator().manual_seed(1))
    b = augment(imgs, cfg, torch.Generator().manual_seed(1))
    assert a.shape == (8, 3, 32, 32) and torch.equal(a, b)
    assert not torch.equal(a, augment(imgs, cfg, torch.Generator().manual_seed(2)))
    # 10 samples, batch 4: the first epoch is a permutation, then the next one starts
    idx = torch.cat([batch_indices(s, 10, 4, seed=0) for s in range(5)])
    assert sorted(idx[:10].tolist()) == list(range(10))
    assert sorted(idx[10:20].tolist()) == list(range(10))


def test_cli_parser_and_config_overrides(tmp_path):
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    args = parser.parse_args(["pretrain-clip", "--out", str(tmp_path), "steps=7", "lr=1e-4"])
    cfg = config_from_args(args.config, args.overrides)
    assert (cfg.steps, cfg.lr, cfg.batch_size) == (7, 1e-4, 256)
    (tmp_path / "c.yaml").write_text("batch_size: 32\neval_templates: ['{}']\n")
    cfg = config_from_args(tmp_path / "c.yaml", [])
    assert cfg.batch_size == 32 and cfg.eval_templates == ("{}",)
    with pytest.raises(ConfigError):
        config_from_args(None, ["nope=1"])


def _tiny_cfg(**kw) -> PretrainConfig:
    # fp32 on one thread: bf16 autocast is emulated (~15x slower) on CPUs without native bf16,
    # and 2 threads oversubscribe shared cores; resume equivalence does not depend on either
    base = dict(
        steps=4,
        batch_size=16,
        corpus_size=160,
        warmup_steps=2,
        checkpoint_every=2,
        eval_templates=("a photo of the digit {}.",),
        bf16=False,
        num_threads=1,
    )
    return PretrainConfig(**{**base, **kw})


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path):
    cfg = _tiny_cfg()
    bench = load_benchmark_arrays(n_per_class=2)
    full = pretrain_clip(cfg, tmp_path / "a", progress=False, benchmark=bench)
    part = pretrain_clip(cfg, tmp_path / "b", progress=False, stop_at=2, benchmark=bench)
    assert part["step"] == 2 and not (tmp_path / "b" / "tiny-digits.safetensors").exists()
    stopped = checkpoint_weights(tmp_path / "b" / "last.pt")  # pretrain-diffusion --clip reads it
    resumed = pretrain_clip(cfg, tmp_path / "b", progress=False, benchmark=bench)
    a = load_file(str(tmp_path / "a" / "tiny-digits.safetensors"))
    b = load_file(str(tmp_path / "b" / "tiny-digits.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    final = checkpoint_weights(tmp_path / "b" / "last.pt")
    assert all(torch.equal(final[k].half(), a[k]) for k in a)
    assert not torch.equal(stopped["visual.conv1.weight"], final["visual.conv1.weight"])
    assert resumed["training"]["loss_last"] == full["training"]["loss_last"]
    assert all(v.dtype == torch.float16 for v in a.values())
    # the written weights rebuild strictly
    model, _, _ = build_tiny_digits(tmp_path / "a" / "tiny-digits.safetensors")
    assert torch.equal(
        model.visual.attnpool.positional_embedding.half(), a["visual.attnpool.positional_embedding"]
    )
    with pytest.raises(ValueError, match="another config"):
        pretrain_clip(_tiny_cfg(lr=0.5), tmp_path / "b", progress=False, benchmark=bench)


@pytest.mark.slow
def test_reduced_budget_run_learns(tmp_path):
    """The shipped code path on a small budget: the loss falls and zero-shot *style* accuracy
    (4-way: handwritten / printed / textured / outline) on benchmark images rises well above
    chance. Digit identity emerges only after about 100k pairs (docs/tiny_clip.md), too late
    for a test; the shipped model's digit zero-shot is checked below."""
    # fp32: on CPUs without native bf16 (no AVX512-BF16/AMX) autocast is emulated and about 20x
    # slower; what this checks (the loop learns) does not depend on the dtype
    cfg = PretrainConfig(
        steps=60,
        batch_size=32,
        corpus_size=512,
        lr=2e-3,
        warmup_steps=6,
        checkpoint_every=1000,
        num_threads=1,
        bf16=False,
    )
    bench = load_benchmark_arrays(n_per_class=5)
    card = pretrain_clip(cfg, tmp_path, progress=False, benchmark=bench)
    train = card["training"]
    assert train["loss_last"] < train["loss_first"] - 0.5

    images = np.concatenate([x for x, _ in bench.values()])  # 50 per domain
    styles = np.repeat(np.arange(len(bench)), [len(x) for x, _ in bench.values()])
    names = ["handwritten digit", "printed digit", "digit on a photo background", "outlined digit"]

    def style_accuracy(model, tokenizer) -> float:
        data = {"all": (images, styles)}
        acc = zero_shot_accuracy(model, tokenizer, data, templates=("a {}",), classnames=names)
        return acc["all"]

    trained, _, tokenizer = build_tiny_digits(tmp_path / "tiny-digits.safetensors")
    random_init, _, _ = build_tiny_digits(seed=0)
    assert style_accuracy(trained, tokenizer) > 0.35  # chance is 0.25; measured 0.51
    assert style_accuracy(random_init, tokenizer) < 0.3


def test_shipped_weights_rebuild_exactly():
    assert TINY_DIGITS_WEIGHTS.stat().st_size <= 30 * 2**20
    model, _, tokenizer = build_tiny_digits(TINY_DIGITS_WEIGHTS)  # strict load
    shipped = load_file(str(TINY_DIGITS_WEIGHTS))
    for k, v in model.state_dict().items():
        assert torch.equal(v, shipped[k].float()), k
    # class-name text features separate the ten digits
    templates = load_card()["zero_shot"]["templates"]
    w = open_clip.build_zero_shot_classifier(model, tokenizer, DIGIT_WORDS, templates).T  # [C, D]
    cos = w @ w.T
    assert cos[~torch.eye(10, dtype=torch.bool)].max() < 0.95


@pytest.mark.slow
def test_shipped_weights_zero_shot_on_a_benchmark_subset():
    """The issue's bar on the shipped weights: zero-shot >= 70% on average over domains and no
    domain below 55%, and no more than 8 points below the card's mean."""
    model, _, tokenizer = build_tiny_digits(TINY_DIGITS_WEIGHTS)
    card = load_card()
    bench = load_benchmark_arrays(n_per_class=20)  # the first 20 images of each full-size class
    acc = zero_shot_accuracy(model, tokenizer, bench, templates=card["zero_shot"]["templates"])
    card_acc = card["zero_shot"]["ensemble"]["mean"]
    # 800 images vs the card's 8,000: the shipped file really has the card's quality
    assert np.mean(list(acc.values())) >= max(0.70, card_acc - 0.08), acc
    assert min(acc.values()) >= 0.55, acc
