"""Tiny SD: open_clip's text tower as a CLIPTextModel, the two-stage trainer, resume, the export."""

import dataclasses
import json

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from seeclip.cli import main
from seeclip.datasets.digits import generate_corpus
from seeclip.generate.image_pool import generate_image_pool, load_image_pool
from seeclip.generate.sd_pipeline import ImageDiffusionConfig, encode_prompts, load_pipeline
from seeclip.io import UnreadableFileError
from seeclip.zoo.pretrain_diffusion import (
    DiffusionPretrainConfig,
    build_unet,
    build_vae,
    pretrain_diffusion,
    sample,
)
from seeclip.zoo.sd_export import clip_tokenizer, text_encoder_from_clip
from seeclip.zoo.tiny_clip import TINY_DIGITS_WEIGHTS, build_tiny_digits

CAPTIONS = [
    "a photo of the digit one.",
    "",
    "Hello, World!  The number 7 -- on a 3-colour background; don't stop",
    "zero: a hand-drawn numeral",
    "the numeral 0 drawn in OUTLINE, café style",
    "seven " * 30,  # longer than the context: truncated, the last id is the end token
]


@pytest.fixture(scope="module")
def clip():
    model, _, tokenizer = build_tiny_digits(TINY_DIGITS_WEIGHTS)
    return model, tokenizer


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "corpus"
    return generate_corpus(root, n=48, seed=3, progress=False)


def _tiny_cfg(**kw) -> DiffusionPretrainConfig:
    base = dict(
        num_threads=1,
        checkpoint_every=4,
        vae_channels=(8, 16, 16),
        vae_steps=30,
        vae_batch_size=8,
        vae_warmup_steps=3,
        unet_channels=(32, 32),
        unet_attention=(False, True),
        attention_heads=4,
        steps=30,
        batch_size=8,
        warmup_steps=3,
        encode_batch_size=16,
        sample_prompts=3,
        sample_steps=3,
    )
    return DiffusionPretrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus, clip):
    """An uninterrupted run through the command line: (out folder, card)."""
    out = tmp_path_factory.mktemp("tiny_sd")
    config = out / "tiny.yaml"
    config.write_text(yaml.safe_dump(json.loads(json.dumps(dataclasses.asdict(_tiny_cfg())))))
    args = [
        "pretrain-diffusion",
        "--out",
        str(out / "run"),
        "--corpus",
        str(corpus),
        "--clip",
        str(TINY_DIGITS_WEIGHTS),
        "--config",
        str(config),
        "--no-progress",
    ]
    assert main(args) == 0
    return out / "run", json.loads((out / "run" / "card.json").read_text())


# ------------------------------------------------------------------------------- text side


def test_tokenizer_ids_equal_open_clips_up_to_the_end_token(clip, corpus):
    _, oc_tokenizer = clip
    texts = CAPTIONS + json.loads((corpus / "captions.json").read_text())[:20]
    tok = clip_tokenizer(24)
    assert tok.model_max_length == 24 and tok.pad_token == tok.eos_token == "<|endoftext|>"
    ids = tok(texts, padding="max_length", max_length=24, truncation=True, return_tensors="pt")
    ids, ref = ids.input_ids, oc_tokenizer(texts)
    eot = oc_tokenizer.eot_token_id
    assert ids.shape == ref.shape == (len(texts), 24)
    for row, ref_row in zip(ids, ref, strict=True):
        n = int((ref_row == eot).nonzero()[0]) + 1
        assert torch.equal(row[:n], ref_row[:n])
        assert (row[n:] == eot).all() and (ref_row[n:] == 0).all()  # SD pads with EOT
    assert ids[1, :2].tolist() == [oc_tokenizer.sot_token_id, eot]  # the empty prompt
    assert ids[-1, -1] == eot  # truncated


@pytest.mark.parametrize("weights", ["shipped", "random"])
def test_text_encoder_equals_open_clips_text_tower(clip, weights):
    model = clip[0] if weights == "shipped" else build_tiny_digits(seed=1)[0]  # fp32 random init
    _, oc_tokenizer = clip
    encoder = text_encoder_from_clip(model)
    assert encoder.config.hidden_act == "gelu" and encoder.config.max_position_embeddings == 24
    ids = clip_tokenizer(24)(
        CAPTIONS, padding="max_length", max_length=24, truncation=True, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        out = encoder(ids)
        x = model.token_embedding(ids) + model.positional_embedding
        ref = model.ln_final(model.transformer(x, attn_mask=model.attn_mask))
        torch.testing.assert_close(out.last_hidden_state, ref, atol=1e-5, rtol=0)
        # pooled at the first end token, projected: the CLIP text feature (open_clip's own ids)
        pooled = out.pooler_output @ model.text_projection
        torch.testing.assert_close(
            pooled, model.encode_text(oc_tokenizer(CAPTIONS)), atol=1e-5, rtol=0
        )


# ---------------------------------------------------------------------------------- training


def test_config_is_checked():
    with pytest.raises(ValueError, match="vae_factor"):
        DiffusionPretrainConfig(vae_factor=3)
    with pytest.raises(ValueError, match="vae_factor"):
        DiffusionPretrainConfig(vae_factor=2)  # needs two vae_channels
    with pytest.raises(ValueError, match="unet_attention"):
        DiffusionPretrainConfig(unet_attention=(True, True))
    with pytest.raises(ValueError, match="prediction_type"):
        DiffusionPretrainConfig(prediction_type="sample")
    with pytest.raises(ValueError, match="latent_channels"):
        DiffusionPretrainConfig(latent_channels=0)


def test_latent_channels_set_the_autoencoder_and_unet_widths():
    cfg = _tiny_cfg(latent_channels=8)
    vae, unet = build_vae(cfg, 16), build_unet(cfg, 4, text_width=32)
    with torch.no_grad():
        z = vae.encode(torch.zeros(2, 3, 16, 16)).latent_dist.mean
        eps = unet(z, torch.tensor([10, 500]), torch.zeros(2, 5, 32)).sample
    assert z.shape == eps.shape == (2, 8, 4, 4)
    assert vae.decode(z).sample.shape == (2, 3, 16, 16)


def test_reduced_budget_run_learns_and_writes_a_small_card(trained):
    out, card = trained
    for stage in ("vae", "unet"):
        losses = card[stage]["loss_curve"]  # 30 steps: one point per step
        assert card[stage]["steps"] == 30 and len(losses) == 30
        assert np.mean(losses[-5:]) < 0.9 * np.mean(losses[:5]), stage
    arch = card["architecture"]
    assert arch["latent_shape"] == [4, 8, 8] and arch["image_size"] == 32
    assert arch["parameters"]["text_encoder"] > 49408 * 128
    assert 0 < arch["pipeline_bytes"] <= 30e6
    assert card["command"].startswith("seeclip pretrain-diffusion --out ")
    assert card["config"] == json.loads(json.dumps(dataclasses.asdict(_tiny_cfg())))
    assert card["data"]["n"] == 48 and card["data"]["image_size"] == 32
    assert card["unet"]["images_per_second"] > 0 and card["machine"]["threads"] == 1
    assert (out / "samples.png").is_file()
    files = {p.relative_to(out / "pipeline").as_posix() for p in (out / "pipeline").rglob("*.*")}
    assert {
        "model_index.json",
        "unet/diffusion_pytorch_model.safetensors",
        "tokenizer/vocab.json",
        "tokenizer/merges.txt",
    } <= files
    unet = load_file(str(out / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(v.dtype == torch.float16 for v in unet.values())


def _tensors(state, prefix=""):
    """Every tensor of a nested checkpoint, by path."""
    if isinstance(state, torch.Tensor):
        return {prefix: state}
    if not isinstance(state, dict | list | tuple):
        return {}
    items = state.items() if isinstance(state, dict) else enumerate(state)
    return {k: v for key, sub in items for k, v in _tensors(sub, f"{prefix}/{key}").items()}


def test_resume_equals_an_uninterrupted_run_bitwise(trained, corpus, clip, tmp_path):
    ref_out, ref_card = trained
    model, tokenizer = clip
    cfg = _tiny_cfg()
    part = pretrain_diffusion(cfg, corpus, model, tokenizer, tmp_path, progress=False, stop_at=13)
    assert part == {"stage": "vae", "step": 13} and not (tmp_path / "pipeline").exists()
    part = pretrain_diffusion(cfg, corpus, model, None, tmp_path, progress=False, stop_at=37)
    assert part == {"stage": "unet", "step": 37}
    runtime = dataclasses.replace(cfg, checkpoint_every=7)  # runtime fields may change
    card = pretrain_diffusion(runtime, corpus, model, None, tmp_path, progress=False)

    a = torch.load(ref_out / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "last.pt", weights_only=True)
    assert a["stage"] == b["stage"] == "done" and a["step"] == b["step"] == 60
    assert a["losses"] == b["losses"] and len(a["losses"]["unet"]) == 30
    assert a["kept"]["vae"]["scaling_factor"] == b["kept"]["vae"]["scaling_factor"]
    ta, tb = _tensors(a), _tensors(b)
    ta.pop("/torch_rng"), tb.pop("/torch_rng")
    assert ta.keys() == tb.keys() and any(k.startswith("/kept/unet/ema/") for k in ta)
    assert [k for k in ta if not torch.equal(ta[k], tb[k])] == []
    for part in ("unet", "vae", "text_encoder"):
        (fa,) = (ref_out / "pipeline" / part).glob("*.safetensors")
        (fb,) = (tmp_path / "pipeline" / part).glob("*.safetensors")
        assert fa.read_bytes() == fb.read_bytes(), part
    assert card["unet"]["loss_curve"] == ref_card["unet"]["loss_curve"]
    with pytest.raises(ValueError, match="another config"):
        pretrain_diffusion(_tiny_cfg(lr=0.5), corpus, model, None, tmp_path, progress=False)
    # a finished run exports again from its checkpoint alone
    again = pretrain_diffusion(cfg, corpus, model, None, tmp_path, progress=False)
    assert again["unet"] == card["unet"] and again["vae"] == card["vae"]
    # a checkpoint of the loops before the shared one is named, not misread
    torch.save({"identity": b["identity"], "stage": "unet", "step": 3}, tmp_path / "last.pt")
    with pytest.raises(ValueError, match="earlier seeclip.*new --out"):
        pretrain_diffusion(cfg, corpus, model, None, tmp_path, progress=False)


def test_a_crafted_checkpoint_cannot_run_code(corpus, clip, tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return exec, (f"open({str(marker)!r}, 'w').write('ran')",)

    torch.save({"identity": Payload(), "stage": "vae"}, tmp_path / "last.pt")
    with pytest.raises(UnreadableFileError, match="refused"):
        pretrain_diffusion(_tiny_cfg(), corpus, clip[0], None, tmp_path, progress=False)
    assert not marker.exists()
    torch.load(tmp_path / "last.pt", weights_only=False)  # the payload is real: it runs here
    assert marker.read_text() == "ran"


# -------------------------------------------------------------------------------- the export


def test_saved_folder_loads_and_generates_deterministically(trained, clip):
    out, card = trained
    pipe = load_pipeline(str(out / "pipeline"))
    assert pipe.tokenizer.model_max_length == 24
    assert pipe.vae.config.scaling_factor == card["architecture"]["scaling_factor"] != 1.0
    prompts = ["a photo of the digit one.", "seven"]
    a = sample(pipe, prompts, seed=5, steps=20, guidance=4.0)
    assert a.shape == (2, 32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, sample(pipe, prompts, seed=5, steps=20, guidance=4.0))
    assert not np.array_equal(a, sample(pipe, prompts, seed=6, steps=20, guidance=4.0))
    # the pipeline encodes prompts as open_clip does (the shipped weights are fp16-exact)
    model, tokenizer = clip
    ids = pipe.tokenizer(prompts, padding="max_length", max_length=24, return_tensors="pt")
    with torch.no_grad():
        x = model.token_embedding(ids.input_ids) + model.positional_embedding
        ref = model.ln_final(model.transformer(x, attn_mask=model.attn_mask))
    torch.testing.assert_close(encode_prompts(pipe, prompts), ref, atol=1e-5, rtol=0)


def test_image_space_generator_runs_on_the_trained_pipeline(trained, tmp_path):
    pipe = load_pipeline(str(trained[0] / "pipeline"))
    tokens = torch.randn(2, 3, 128, generator=torch.Generator().manual_seed(0))
    cfg = ImageDiffusionConfig(model=str(trained[0] / "pipeline"), steps=3, batch_size=2)
    manifest = generate_image_pool(
        pipe,
        tokens,
        ["printed", "handwritten"],
        ["a", "b"],
        ["zero", "one"],
        out_dir=tmp_path / "pool",
        cfg=cfg,
        progress=False,
    )
    pool = load_image_pool(manifest)
    from PIL import Image

    sizes = {Image.open(pool.root / p).size for p in pool.paths}
    assert len(pool.paths) == 2 and sizes == {(32, 32)}


def test_cli_rejects_unknown_keys_and_missing_inputs(tmp_path, capsys):
    assert main(["pretrain-diffusion", "--out", str(tmp_path), "no_such_key=1"]) == 2
    assert "unknown config key" in capsys.readouterr().err
    missing = ["pretrain-diffusion", "--out", str(tmp_path), "--corpus", str(tmp_path / "x")]
    assert main(missing) == 2
    assert "not a corpus folder" in capsys.readouterr().err
