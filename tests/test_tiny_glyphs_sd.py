"""The shipped tiny-glyphs-sd through the image-space generator path a real SD checkpoint takes."""

import csv
import logging

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("diffusers")

from seeclip.backbone import build_backbone  # noqa: E402
from seeclip.features import Features  # noqa: E402
from seeclip.generate.image_pool import generate_image_pool, load_image_pool  # noqa: E402
from seeclip.generate.sd_pipeline import (  # noqa: E402
    SHIPPED_SD_MODELS,
    ImageDiffusionConfig,
    load_pipeline,
)
from seeclip.pseudo import PseudoContext, sd_image_unknowns  # noqa: E402
from seeclip.pseudo.sd_images import pick_sources  # noqa: E402

FOLDER = SHIPPED_SD_MODELS["tiny-glyphs-sd"]
CFG = ImageDiffusionConfig(
    model="tiny-glyphs-sd", prompt="an unknown sign, {domain}", steps=3, batch_size=2
)
KNOWN = ["letter o", "letter e", "letter p"]


@pytest.fixture(scope="module")
def pipe():
    torch.set_num_threads(1)
    return load_pipeline("tiny-glyphs-sd")


def test_shipped_pipeline_is_small_and_conditioned_on_a_clip_text_tower(pipe):
    size = sum(f.stat().st_size for f in FOLDER.rglob("*") if f.is_file())
    assert size <= 30 * 2**20, size
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    assert type(pipe.text_encoder).__name__ == "CLIPTextModel"
    assert pipe.text_encoder.config.hidden_size == pipe.unet.config.cross_attention_dim == 128
    assert pipe.tokenizer.model_max_length == 24
    assert not list(FOLDER.rglob("*.bin")) and list(FOLDER.rglob("*.safetensors"))


def test_shipped_text_encoder_is_tiny_glyphs_text_tower(pipe):
    from seeclip.generate.sd_conditioning import conditioning_projection

    clip = build_backbone("tiny-glyphs")
    cfg = ImageDiffusionConfig(model="tiny-glyphs-sd", projection="text_inverse")
    p = conditioning_projection(cfg, pipe, clip)  # raises if the towers differ
    ids = clip.tokenizer(["a printed letter q"])
    with torch.no_grad():
        states = pipe.text_encoder(ids[:, : pipe.tokenizer.model_max_length])[0]
        pooled = clip.model.encode_text(ids)
    eos = int(ids.argmax(-1))  # the end token has the largest id
    # the end state, projected by CLIP's own text projection, is CLIP's text feature; P maps it
    # back to the state's component in the projection's row space
    torch.testing.assert_close(
        states[0, eos] @ clip.text_projection.float(), pooled[0], atol=2e-2, rtol=2e-2
    )
    back = (pooled @ p) @ clip.text_projection.float()
    torch.testing.assert_close(back, pooled, atol=1e-3, rtol=1e-3)


def test_shipped_model_generates_48px_pools_reproducibly(pipe, tmp_path):
    tokens = torch.randn(4, 4, 128, generator=torch.Generator().manual_seed(0))
    domains, sources = ["printed", "outline", "printed", "textured"], ["a", "b", "c", "d"]

    def pool(out, seed):
        return generate_image_pool(
            pipe, tokens, domains, sources, KNOWN, out_dir=out, cfg=CFG, seed=seed, progress=False
        )

    first = load_image_pool(pool(tmp_path / "a", 0))
    again = load_image_pool(pool(tmp_path / "b", 0))
    other = load_image_pool(pool(tmp_path / "c", 1))
    assert first.domains == tuple(domains) and first.sources == tuple(sources)
    images = [np.asarray(Image.open(first.root / p)) for p in first.paths]
    assert all(im.shape == (48, 48, 3) for im in images)
    same = [np.asarray(Image.open(again.root / p)) for p in again.paths]
    assert all(np.array_equal(a, b) for a, b in zip(images, same, strict=True))
    diff = [np.asarray(Image.open(other.root / p)) for p in other.paths]
    assert not np.array_equal(images[0], diff[0])
    with open(first.root / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert rows[0]["prompt"] == "an unknown sign, printed"
    assert rows[0]["negative_prompt"] == "letter o, letter e, letter p"
    assert rows[0]["model"] == "tiny-glyphs-sd"


def test_sd_images_source_runs_the_shipped_model_on_demand(tmp_path):
    from seeclip.generate.feature_config import FeatureDiffusionConfig

    backbone = build_backbone("tiny-glyphs-random")
    g = torch.nn.functional.normalize(torch.randn(12, 128), dim=-1)
    t = torch.randn(12, 36, 128)
    feats = Features(g, t, ("printed",) * 6 + ("outline",) * 6)
    ctx = PseudoContext(
        feats,
        torch.arange(12) % 3,
        backbone=backbone,
        class_texts=tuple(KNOWN),
        seed=0,
        diffusion=FeatureDiffusionConfig(k=2, pool_per_domain=2, sample_steps=2),
        sd_model="tiny-glyphs-sd",
        sd_prompt="an unknown sign, {domain}",
        cache_dir=tmp_path,
        progress=False,
    )
    source = sd_image_unknowns(ctx)
    gl, tok = source.sample("outline", 3, torch.Generator().manual_seed(0))
    assert gl.shape == (3, 128) and tok.shape == (3, 36, 128)
    pools = list((tmp_path / "pools" / "images").glob("sd-*/manifest.csv"))
    assert len(pools) == 1 and len(load_image_pool(pools[0]).paths) == 4
    sd_image_unknowns(ctx)  # the same inputs reuse the pool
    assert len(list((tmp_path / "pools" / "images").iterdir())) == 1
    meta = pools[0].parent / "pool.json"
    assert '"model": "tiny-glyphs-sd"' in meta.read_text()  # its name, not the install folder
    meta.write_text(meta.read_text().replace('"fingerprint": "', '"fingerprint": "stale'))
    sd_image_unknowns(ctx)  # a stale cache entry (e.g. another seeclip version) is remade
    assert '"fingerprint": "stale' not in meta.read_text()
    assert pick_sources(("a", "a", "b"), 5, torch.Generator()) in ([0, 1, 2], [1, 0, 2])


def test_sdedit_keeps_its_source_image(pipe, tmp_path):
    """SDEdit at low strength from a dark glyph on light paper and its inverse: each sample keeps
    its own source's brightness, and swapping the sources swaps the samples' brightness."""
    light = np.full((48, 48, 3), 235, np.uint8)
    light[14:34, 20:28] = 20  # a dark bar
    dark = 255 - light
    tokens = torch.randn(2, 4, 128, generator=torch.Generator().manual_seed(0))
    cfg = ImageDiffusionConfig(
        model="tiny-glyphs-sd",
        prompt="an unknown sign, {domain}",
        steps=8,
        batch_size=2,
        strength=0.3,
    )

    def brightness(inits, out):
        pool = load_image_pool(
            generate_image_pool(
                pipe,
                tokens,
                ["printed", "printed"],
                ["a", "b"],
                KNOWN,
                out_dir=tmp_path / out,
                cfg=cfg,
                seed=0,
                progress=False,
                init_images=inits,
            )
        )
        return [
            np.asarray(Image.open(pool.root / p).convert("L"), float).mean() for p in pool.paths
        ]

    kept = brightness([light, dark], "a")
    swapped = brightness([dark, light], "b")
    assert kept[0] - kept[1] > 100 and swapped[1] - swapped[0] > 100


def test_sd_images_source_passes_source_images_for_sdedit(tmp_path):
    from seeclip.generate.feature_config import FeatureDiffusionConfig

    backbone = build_backbone("tiny-glyphs-random")
    feats = Features(
        torch.nn.functional.normalize(torch.randn(4, 128), dim=-1),
        torch.randn(4, 36, 128),
        ("printed",) * 4,
    )
    files = []
    for i in range(4):
        files.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(np.full((48, 48, 3), 60 * i, np.uint8)).save(files[-1])
    kw = dict(
        backbone=backbone,
        class_texts=tuple(KNOWN),
        seed=0,
        diffusion=FeatureDiffusionConfig(k=2, pool_per_domain=2, sample_steps=2),
        sd_model="tiny-glyphs-sd",
        sd_prompt="an unknown sign, {domain}",
        cache_dir=tmp_path,
        progress=False,
        sd_strength=0.5,
    )
    with pytest.raises(ValueError, match="needs the source image of every feature row"):
        sd_image_unknowns(PseudoContext(feats, torch.arange(4) % 3, **kw))
    source = sd_image_unknowns(
        PseudoContext(feats, torch.arange(4) % 3, image_paths=tuple(files), **kw)
    )
    assert source.sample("printed", 2, torch.Generator().manual_seed(0))[0].shape == (2, 128)
    assert len(list((tmp_path / "pools" / "images").glob("sd-*/manifest.csv"))) == 1


def test_loading_does_not_ask_for_accelerate():
    # without accelerate, diffusers used to log an "install accelerate" warning on every load;
    # its library logger does not propagate, so listen on it directly
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    library = logging.getLogger("diffusers")
    library.addHandler(handler)
    try:
        load_pipeline("tiny-glyphs-sd")
    finally:
        library.removeHandler(handler)
    assert not [r.getMessage() for r in records if "accelerate" in r.getMessage()]
