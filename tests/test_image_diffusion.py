"""Image-space pseudo-unknown generator on a tiny random Stable Diffusion pipeline (no download)."""

import csv
import json
import socket

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from seeclip.generate.image_pool import (  # noqa: E402
    MANIFEST_FIELDS,
    generate_image_pool,
    load_image_pool,
)
from seeclip.generate.sd_conditioning import (  # noqa: E402
    build_conditioning,
    conditioning_projection,
    token_projection,
)
from seeclip.generate.sd_pipeline import (  # noqa: E402
    ImageDiffusionConfig,
    encode_prompts,
    load_pipeline,
)
from seeclip.hub import WeightsUnavailableError  # noqa: E402
from seeclip.testing import build_tiny_pipeline  # noqa: E402

DOMAINS = ["photo", "art_painting", "photo"]
SOURCES = ["photo/dog/1.jpg", "art_painting/giraffe/2.jpg", "photo/elephant/3.jpg"]
CLASSES = ["dog", "elephant", "giraffe"]
FAST = ImageDiffusionConfig(steps=3, batch_size=2)


@pytest.fixture(scope="module")
def pipe():
    torch.set_num_threads(1)
    return build_tiny_pipeline(seed=0)


@pytest.fixture(scope="module")
def tokens():
    return torch.randn(3, 2, 16, generator=torch.Generator().manual_seed(0))  # n=3, K=2, d=16


def _pool(pipe, tokens, out, cfg=FAST, seed=0, **kwargs):
    return generate_image_pool(
        pipe,
        tokens,
        DOMAINS,
        SOURCES,
        CLASSES,
        out_dir=out,
        cfg=cfg,
        seed=seed,
        progress=False,
        **kwargs,
    )


def _bytes(manifest):
    return [(manifest.parent / p).read_bytes() for p in load_image_pool(manifest).paths]


def test_pool_layout_and_manifest(pipe, tokens, tmp_path):
    manifest = _pool(pipe, tokens, tmp_path / "pool", cfg=ImageDiffusionConfig(batch_size=2))
    assert manifest == tmp_path / "pool" / "manifest.csv"
    with open(manifest, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert tuple(rows[0]) == MANIFEST_FIELDS
    assert [r["path"] for r in rows] == [
        "photo/unknown/000000.png",
        "art_painting/unknown/000001.png",
        "photo/unknown/000002.png",
    ]
    assert [r["domain"] for r in rows] == DOMAINS
    assert [r["source"] for r in rows] == SOURCES
    assert rows[1]["prompt"] == "a art painting of an unknown object"
    assert {r["negative_prompt"] for r in rows} == {"dog, elephant, giraffe"}
    assert {(r["sigma"], r["guidance"], r["steps"]) for r in rows} == {("0.2", "15.0", "20")}
    assert {r["model"] for r in rows} == {"seeclip-tiny-sd-seed0"}
    assert len({r["seed"] for r in rows}) == 3
    for r in rows:  # the tiny pipeline's default size: 8 px latents x VAE factor 2
        with Image.open(manifest.parent / r["path"]) as im:
            assert im.size == (16, 16) and im.mode == "RGB"
    meta = json.loads((manifest.parent / "pool.json").read_text())
    assert meta["n"] == 3 and (meta["tokens"]["k"], meta["tokens"]["d"]) == (2, 16)
    ratio = 0.2 * 4 / tokens.norm(dim=-1).mean()  # sigma * sqrt(d) / mean token norm
    assert meta["noise_to_signal"] == pytest.approx(float(ratio), rel=1e-5)
    assert meta["conditioning_width"] == 32
    pool = load_image_pool(manifest.parent)
    assert pool.root == manifest.parent and pool.domains == tuple(DOMAINS)
    assert not list(manifest.parent.rglob(".*"))  # no temporary file of seeclip.io left


def test_image_size_option(pipe, tokens, tmp_path):
    cfg = ImageDiffusionConfig(steps=2, image_size=24)
    manifest = _pool(pipe, tokens[:1].expand(3, -1, -1), tmp_path / "p", cfg=cfg)
    with Image.open(manifest.parent / load_image_pool(manifest).paths[0]) as im:
        assert im.size == (24, 24)


def test_deterministic_and_seeded(pipe, tokens, tmp_path):
    a = _bytes(_pool(pipe, tokens, tmp_path / "a"))
    b = _bytes(_pool(pipe, tokens, tmp_path / "b"))
    c = _bytes(_pool(pipe, tokens, tmp_path / "c", seed=1))
    assert a == b
    assert all(x != y for x, y in zip(a, c, strict=True))
    # per-image seeds come from (seed, i): batching does not change any image
    one = _bytes(_pool(pipe, tokens, tmp_path / "one", cfg=ImageDiffusionConfig(steps=3)))
    assert one == a


def test_resume_and_refuse_other_inputs(pipe, tokens, tmp_path):
    manifest = _pool(pipe, tokens, tmp_path / "p")
    before = _bytes(manifest)
    (manifest.parent / "art_painting/unknown/000001.png").unlink()
    manifest.unlink()  # an interrupted run: one image and the manifest missing
    assert _bytes(_pool(pipe, tokens, tmp_path / "p")) == before
    with pytest.raises(FileExistsError, match="other inputs"):
        _pool(pipe, tokens + 1, tmp_path / "p")
    after = _bytes(_pool(pipe, tokens + 1, tmp_path / "p", overwrite=True))
    assert after != before


def test_projection_is_fixed_and_semi_orthogonal():
    p = token_projection(16, 32, seed=0)
    assert p.shape == (16, 32)
    torch.testing.assert_close(p @ p.T, torch.eye(16), atol=1e-5, rtol=0)
    torch.testing.assert_close(p, token_projection(16, 32, seed=0), atol=0, rtol=0)
    assert not torch.equal(p, token_projection(16, 32, seed=1))
    q = token_projection(64, 32, seed=0)  # d > D: orthonormal columns
    torch.testing.assert_close(q.T @ q, torch.eye(32), atol=1e-5, rtol=0)


def test_text_inverse_projection_maps_tokens_to_states_the_text_tower_projects_back():
    import copy
    from types import SimpleNamespace

    from seeclip.backbone import build_backbone
    from seeclip.zoo.sd_export import text_encoder_from_clip

    backbone = build_backbone("tiny-glyphs-random")
    same = SimpleNamespace(text_encoder=text_encoder_from_clip(backbone.model))
    cfg = ImageDiffusionConfig(projection="text_inverse")
    p = conditioning_projection(cfg, same, backbone)
    assert p.shape == (backbone.embed_dim, backbone.text_width)
    v = torch.randn(5, backbone.embed_dim, generator=torch.Generator().manual_seed(0))
    # W [D, d] has full rank d here, so the state v P projects back to v exactly
    torch.testing.assert_close((v @ p) @ backbone.text_projection.float(), v, atol=1e-4, rtol=1e-4)
    random = conditioning_projection(ImageDiffusionConfig(), same, backbone)
    torch.testing.assert_close(random, token_projection(128, 128, seed=0), atol=0, rtol=0)
    other = copy.deepcopy(same.text_encoder)
    other.get_input_embeddings().weight.data += 0.05  # another text tower
    with pytest.raises(ValueError, match="is not tiny-glyphs-random's text tower"):
        conditioning_projection(cfg, SimpleNamespace(text_encoder=other), backbone)
    with pytest.raises(ValueError, match="needs the backbone"):
        conditioning_projection(cfg, same)


def test_a_pool_needs_the_matrix_of_a_named_projection(pipe, tokens, tmp_path):
    cfg = ImageDiffusionConfig(steps=3, batch_size=2, projection="text_inverse")
    with pytest.raises(ValueError, match="conditioning_projection"):
        _pool(pipe, tokens, tmp_path / "a", cfg=cfg)
    with pytest.raises(ValueError, match=r"projection must be \[16, 32\]"):
        _pool(pipe, tokens, tmp_path / "b", cfg=cfg, projection=torch.zeros(32, 16))
    p = torch.linalg.qr(torch.randn(32, 16, generator=torch.Generator().manual_seed(1)))[0].T
    first = _bytes(_pool(pipe, tokens, tmp_path / "c", cfg=cfg, projection=p))
    assert first != _bytes(_pool(pipe, tokens, tmp_path / "d", cfg=cfg, projection=-p))


def test_tokens_change_the_conditioning(pipe, tokens):
    cfg = ImageDiffusionConfig()
    proj = token_projection(16, 32, seed=0)
    plain = encode_prompts(pipe, ["a photo of an unknown object"])[0]  # [77, 32]
    negative = encode_prompts(pipe, ["dog, elephant, giraffe"])[0]
    pos, neg = build_conditioning(
        pipe,
        tokens[:2],
        tokens[:2],
        ["photo", "photo"],
        "dog, elephant, giraffe",
        cfg=cfg,
        projection=proj,
    )
    assert pos.shape == neg.shape == (2, 77 + 2, 32)
    torch.testing.assert_close(pos[0, :77], plain)
    torch.testing.assert_close(neg[0, :77], negative)
    torch.testing.assert_close(neg[0, 77:], negative[-1:].expand(2, -1))  # padded with itself
    assert not torch.allclose(pos[0, 77:], pos[1, 77:])  # the tokens are what differs
    # norm matching: clean tokens get the prompt's mean per-token norm (BOS excluded)
    target = plain[1:].norm(dim=-1).mean()
    torch.testing.assert_close(pos[0, 77:].norm(dim=-1).mean(), target, rtol=1e-4, atol=0)
    # the map is linear in the tokens for a fixed scale: u = s * v @ P
    scale = target / (tokens[0] @ proj).norm(dim=-1).mean()
    torch.testing.assert_close(pos[0, 77:], scale * tokens[0] @ proj, rtol=1e-4, atol=1e-5)


def test_replace_padding_keeps_77_positions(pipe, tokens):
    cfg = ImageDiffusionConfig(placement="replace_padding")
    proj = token_projection(16, 32, seed=0)
    plain = encode_prompts(pipe, ["a photo of an unknown object"])[0]
    pos, neg = build_conditioning(
        pipe, tokens[:1], tokens[:1], ["photo"], "dog", cfg=cfg, projection=proj
    )
    assert pos.shape == neg.shape == (1, 77, 32)
    torch.testing.assert_close(pos[0, :75], plain[:75])
    assert not torch.allclose(pos[0, 75:], plain[75:])
    with pytest.raises(ValueError, match="padding slots"):
        build_conditioning(
            pipe, tokens[:1], tokens[:1], ["x" * 80], "dog", cfg=cfg, projection=proj
        )


def test_tokens_change_the_image(pipe, tokens, tmp_path):
    other = tokens.roll(1, dims=0)  # same seeds and domains, other tokens in rows 0 and 1
    a = _bytes(_pool(pipe, tokens, tmp_path / "a"))
    b = _bytes(_pool(pipe, other, tmp_path / "b"))
    assert a[0] != b[0] and a[1] != b[1]
    pa = np.asarray(Image.open(tmp_path / "a" / "photo/unknown/000000.png"), dtype=float)
    pb = np.asarray(Image.open(tmp_path / "b" / "photo/unknown/000000.png"), dtype=float)
    assert np.abs(pa - pb).mean() > 0.5


def test_input_and_config_validation(pipe, tokens, tmp_path):
    with pytest.raises(ValueError, match="domains"):
        generate_image_pool(pipe, tokens, DOMAINS[:2], SOURCES, CLASSES, out_dir=tmp_path / "x")
    with pytest.raises(ValueError, match=r"\[n, K >= 1, d\]"):
        generate_image_pool(pipe, tokens[0], DOMAINS, SOURCES, CLASSES, out_dir=tmp_path / "x")
    with pytest.raises(ValueError, match="known classes"):
        generate_image_pool(pipe, tokens, DOMAINS, SOURCES, [], out_dir=tmp_path / "x")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an image pool"):
        _pool(pipe, tokens, tmp_path / "busy")
    for bad in (
        {"sigma": -1.0},
        {"placement": "prepend"},
        {"image_size": 20},
        {"prompt": "x"},
        {"projection": "learned"},
    ):
        with pytest.raises(ValueError):
            ImageDiffusionConfig(**bad)
    assert ImageDiffusionConfig().torch_dtype("cpu") == torch.float32
    assert ImageDiffusionConfig().torch_dtype("cuda") == torch.float16
    assert ImageDiffusionConfig(fp16=False).torch_dtype("cuda") == torch.float32


def test_missing_weights_fail_fast_offline(tmp_path, monkeypatch):
    """Missing weights are an error that names the fix, and no connection is ever tried (what
    makes it fast on any machine: no download attempt, no retries)."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    tried = []

    def no_network(*args, **kwargs):
        tried.append(args)
        raise OSError("the test forbids network access")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    with pytest.raises(WeightsUnavailableError, match="SD weights not found locally.*--sd-model"):
        load_pipeline("stable-diffusion-v1-5/stable-diffusion-v1-5")
    with pytest.raises(WeightsUnavailableError, match="model_index.json"):
        load_pipeline(str(tmp_path))
    with pytest.raises(WeightsUnavailableError, match="--sd-model"):
        load_pipeline(str(tmp_path / "no" / "such" / "folder"))
    assert tried == []


def test_load_pipeline_from_local_folder(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "sd")
    loaded = load_pipeline(str(tmp_path / "sd"))
    for a, b in zip(pipe.unet.parameters(), loaded.unet.parameters(), strict=True):
        assert torch.equal(a, b)
    text = ["a photo of an unknown object"]
    torch.testing.assert_close(encode_prompts(loaded, text), encode_prompts(pipe, text))
    assert loaded.safety_checker is None


@pytest.mark.gpu
def test_fp16_pool_on_cuda(tokens, tmp_path):
    pipe = build_tiny_pipeline(seed=0).to("cuda", torch.float16)
    assert pipe.unet.dtype == torch.float16
    a = _bytes(_pool(pipe, tokens, tmp_path / "a"))
    b = _bytes(_pool(pipe, tokens, tmp_path / "b"))
    assert a == b and len(set(a)) == 3


def test_sdedit_starts_from_the_source_images(pipe, tokens, tmp_path):
    """strength < 1 (SDEdit) needs, and is seeded by, its source images (what it keeps of them
    is tested with the trained tiny-glyphs-sd: this pipeline's VAE is random)."""
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    rng = np.random.default_rng(0)
    light = np.full((size, size, 3), 230, np.uint8)
    dark = np.full((size, size, 3), 25, np.uint8)
    dark[:, : size // 2] = rng.integers(0, 60, (size, size // 2, 3))
    inits = [light, dark, light]
    with pytest.raises(ValueError, match="needs init_images"):
        _pool(pipe, tokens, tmp_path / "x", cfg=ImageDiffusionConfig(steps=4, strength=0.5))
    with pytest.raises(ValueError, match=r"strength must be in \(0, 1\]"):
        ImageDiffusionConfig(strength=0.0)

    low = _pool(
        pipe,
        tokens,
        tmp_path / "low",
        cfg=ImageDiffusionConfig(steps=4, strength=0.25),
        init_images=inits,
    )
    again = _pool(
        pipe,
        tokens,
        tmp_path / "again",
        cfg=ImageDiffusionConfig(steps=4, strength=0.25),
        init_images=inits,
    )
    assert _bytes(low) == _bytes(again)  # seeded like text-to-image
    sdedit = ImageDiffusionConfig(steps=4, strength=0.25)
    other = _pool(pipe, tokens, tmp_path / "other", cfg=sdedit, init_images=[dark, light, dark])
    assert _bytes(other) != _bytes(low)  # the source images are part of the pool's identity
