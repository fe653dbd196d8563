"""Pseudo-unknowns by their effect, not their shapes: what each source teaches the unknown prompt,
which domains a stored pool holds and hands out, what SDEdit gives the image editor, and what the
two generators' conditioning does to their samples. Tiny models only (no download)."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import re
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from seeclip import run_data, wiring
from seeclip.backbone import build_backbone
from seeclip.cli import main
from seeclip.config import apply_overrides
from seeclip.features import Features, PseudoSources
from seeclip.generate.feature_diffusion import (
    load_pool,
)
from seeclip.pseudo import PseudoContext, draw, feature_pool_unknowns, image_pool_unknowns
from seeclip.run_config import RunConfig

TARGET = "printed"
SOURCES = ("handwritten", "outline", "textured")  # digits' other domains, sorted
TINY_DIFFUSION = [
    "diffusion.train_steps=20",
    "diffusion.width=64",
    "diffusion.depth=1",
    "diffusion.batch_size=32",
    "diffusion.sample_steps=4",
]
# seeclip on tiny-vit, half of each domain's batch slots given to pseudo-unknowns
BASE = [
    f"data.target={TARGET}",
    "backbone.name=tiny-vit",
    "method=seeclip",
    "train.epochs=3",
    "train.batch_size=12",
    "train.pseudo_fraction=0.5",
    "train.lr=1e-2",
]
FEATURE_POOL_N, IMAGE_POOL_N = 8, 4  # `seeclip generate --n` of the stored pools


def _tiny_sd(monkeypatch) -> None:
    """Every text-to-image model name loads the tiny random pipeline instead."""
    pytest.importorskip("diffusers")
    from seeclip.generate import sd_pipeline
    from seeclip.testing import build_tiny_pipeline

    monkeypatch.setattr(sd_pipeline, "load_pipeline", lambda *a, **k: build_tiny_pipeline(0))


def _generate(preset: Path, *argv: str) -> str:
    """`seeclip generate` with ``preset``; its stdout."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["generate", "--config", str(preset), *argv, "--no-progress"])
    assert code == 0
    return out.getvalue()


@pytest.fixture(scope="module")
def pools(small_digits, tmp_path_factory):
    """A feature pool and an image pool written by `seeclip generate` for target printed."""
    tmp = tmp_path_factory.mktemp("pools")
    preset = tmp / "preset.yaml"
    preset.write_text(
        f"data: {{benchmark: digits, protocol: full, target: {TARGET}}}\n"
        "backbone: {name: tiny-vit}\nmethod: seeclip\n"
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SEECLIP_HOME", str(small_digits))
        out = _generate(preset, "--backend", "feature", "--n", str(FEATURE_POOL_N), *TINY_DIFFUSION)
        feature = next(x for x in out.splitlines() if x.startswith("train with it"))
        _tiny_sd(mp)
        _generate(preset, "--backend", "image", "--n", str(IMAGE_POOL_N), "--out", str(tmp / "img"))
    return SimpleNamespace(feature=Path(feature.rsplit("=", 1)[1]), image=tmp / "img")


@pytest.fixture()
def digits(small_digits, monkeypatch):
    monkeypatch.setenv("SEECLIP_HOME", str(small_digits))
    return small_digits


def _assert_rows_of(sampled: torch.Tensor, pool: torch.Tensor, domains, domain: str) -> None:
    """Each sampled row is a pool row of ``domain`` (nearest pool row, almost exactly)."""
    dist = torch.cdist(sampled.float(), pool.float())
    nearest = dist.argmin(-1)
    assert float(dist.min(-1).values.max()) < 1e-2
    assert {domains[i] for i in nearest.tolist()} == {domain}


class Recorder:
    """A pseudo-unknown source that remembers what it handed out."""

    def __init__(self, source) -> None:
        self.source = source
        self.calls: list[tuple[str, torch.Tensor]] = []

    def sample(self, domain, n, generator):
        g, t = self.source.sample(domain, n, generator)
        self.calls.append((domain, g.clone()))
        return g, t


@dataclasses.dataclass
class Trained:
    method: object
    run: run_data.RunData
    source: Recorder | None  # the training source, as the trainer saw it
    batches: list[tuple[torch.Tensor, torch.Tensor]]  # (global features, labels) of each step

    def unknown_score(self, g: torch.Tensor, t: torch.Tensor) -> float:
        feats = Features(g, t, ("x",) * len(g))
        return float(self.method.predict(feats).unknown_score.mean())


def _train(overrides: list[str]) -> Trained:
    """Fit seeclip on digits' sources with ``overrides``, recording every training batch."""
    cfg = apply_overrides(RunConfig(), [*BASE, *overrides])
    run = run_data.load_run_data(cfg, progress=False)
    sources = wiring.pseudo_sources(cfg, run, progress=False)
    built = sources.train()
    recorder = None if built is None else Recorder(built)
    pseudo = PseudoSources(cfg.train.pseudo_unknowns, lambda: recorder, sources.val)
    method = wiring.make_method(cfg, run, progress=False, pseudo=pseudo)
    inputs, labels = [], []
    model, loss_fn = method.model, method.loss_fn

    def forward(g, t, _forward=model.forward):
        inputs.append(g.detach().clone())
        return _forward(g, t)

    def loss(out, y):
        labels.append(y.clone())
        return loss_fn(out, y)

    model.forward, method.loss_fn = forward, loss
    d = run.data
    method.fit(
        run.features(d.source_train),
        torch.as_tensor(d.source_train_labels),
        run.features(d.source_val),
        torch.as_tensor(d.source_val_labels),
    )
    del model.forward
    method.loss_fn = loss_fn
    return Trained(method, run, recorder, list(zip(inputs, labels, strict=True)))


@pytest.fixture(scope="module")
def without_pseudo(small_digits):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SEECLIP_HOME", str(small_digits))
        return _train(["train.pseudo_unknowns=none"])


def _source_overrides(name: str, pools) -> list[str]:
    return {
        "mixup": [],
        "pool": [f"train.pseudo_pool={pools.feature}"],
        # 6 per domain: another pool than the stored one, sampled on demand
        "diffusion": [*TINY_DIFFUSION, "diffusion.pool_per_domain=6"],
        "images": [f"train.pseudo_pool={pools.image / 'manifest.csv'}"],
        "sd_images": ["train.sd_model=tiny-test", "diffusion.pool_per_domain=4"],
    }[name]


# ------------------------------------------------------------ 1. what each source teaches


def test_none_trains_on_known_images_only(without_pseudo):
    num_known = without_pseudo.method.num_known
    assert without_pseudo.source is None and without_pseudo.batches
    # every slot of every batch holds a known image: none is left empty or labelled unknown
    assert all(len(y) == 12 and int((y == num_known).sum()) == 0 for _, y in without_pseudo.batches)


@pytest.mark.parametrize("name", ["mixup", "pool", "diffusion", "images", "sd_images"])
def test_each_source_trains_the_unknown_prompt_on_its_samples(
    name, digits, pools, without_pseudo, monkeypatch
):
    if name == "sd_images":
        _tiny_sd(monkeypatch)
    trained = _train([f"train.pseudo_unknowns={name}", *_source_overrides(name, pools)])
    c = trained.method.num_known
    # the batches' label-C rows are exactly what the source handed out, in order
    assert trained.source.calls, "the trainer drew no pseudo-unknown"
    drawn = torch.cat([g for _, g in trained.source.calls])
    labelled = torch.cat([g[y == c] for g, y in trained.batches])
    assert labelled.shape == drawn.shape and torch.equal(labelled, drawn)
    assert {d for d, _ in trained.source.calls} == set(SOURCES)  # never the target's
    if name != "mixup":  # a pool: each draw is a row of the domain it was asked for
        pool = trained.source.source
        rows = pool.features() if callable(pool.features) else pool.features
        for domain, g in trained.source.calls:
            _assert_rows_of(g, rows.global_, rows.domains, domain)
    # so it learns something else than without pseudo-unknowns, at the same seed ...
    a, b = trained.method.state(), without_pseudo.method.state()
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)
    # ... namely to give the source's pseudo-unknowns the unknown class: fresh draws score
    # higher than without, and higher than the held-out known images of the sources
    g, t = draw(trained.source.source, SOURCES, 20, torch.Generator().manual_seed(1))
    score, baseline = trained.unknown_score(g, t), without_pseudo.unknown_score(g, t)
    assert score > baseline + 0.2, (score, baseline)
    val = trained.run.features(trained.run.data.source_val)
    known = trained.unknown_score(val.global_.float(), val.tokens.float())
    assert score > known + 0.1, (score, known)


# ------------------------------------------------ 2. stored pools hold the requested domains


def _source_train(run: run_data.RunData) -> Features:
    return run.features(run.data.source_train)


def test_generated_feature_pool_holds_the_source_domains_and_draws_within_one(digits, pools):
    cfg = apply_overrides(RunConfig(), BASE)
    train = _source_train(run_data.load_run_data(cfg, progress=False))
    pool = load_pool(pools.feature)
    assert Counter(pool.domains) == {d: FEATURE_POOL_N for d in SOURCES}  # target left out
    # every sample was conditioned on a training image of its own domain
    assert [train.domains[i] for i in pool.source_index.tolist()] == list(pool.domains)
    with open(pools.feature / "samples.csv", newline="") as fh:
        assert [r["domain"] for r in csv.DictReader(fh)] == list(pool.domains)

    source = feature_pool_unknowns(
        PseudoContext(train, torch.zeros(len(train)), pool=str(pools.feature))
    )
    gen = torch.Generator().manual_seed(0)
    for domain in SOURCES:
        g, t = source.sample(domain, 30, gen)
        _assert_rows_of(g, pool.global_, pool.domains, domain)
        assert len(torch.unique(g, dim=0)) > 1
    g, _ = draw(source, ("outline", "handwritten"), 5, gen)  # sorted: handwritten first
    _assert_rows_of(g[:5], pool.global_, pool.domains, "handwritten")
    _assert_rows_of(g[5:], pool.global_, pool.domains, "outline")
    with pytest.raises(KeyError, match=TARGET):
        source.sample(TARGET, 1, gen)


def test_generated_image_pool_holds_the_source_domains_and_draws_within_one(digits, pools):
    cfg = apply_overrides(RunConfig(), BASE)
    run = run_data.load_run_data(cfg, progress=False)
    with open(pools.image / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert Counter(r["domain"] for r in rows) == {d: IMAGE_POOL_N for d in SOURCES}
    for r in rows:
        assert r["path"].startswith(f"{r['domain']}/unknown/")
        # made from a source image of its own domain (the id starts with it: "outline/..." or
        # "outline:<row>")
        assert re.split("[/:]", r["source"])[0] == r["domain"]

    # the CLIP features each file has, encoded here without the cache
    backbone = run.backbone
    images = torch.stack(
        [backbone.preprocess(Image.open(pools.image / r["path"]).convert("RGB")) for r in rows]
    )
    with torch.no_grad():
        direct = backbone.encode_image(images)[0]
    domains = [r["domain"] for r in rows]
    ctx = PseudoContext(
        _source_train(run),
        torch.zeros(1),
        backbone=backbone,
        pool=str(pools.image / "manifest.csv"),
        progress=False,
    )
    source = image_pool_unknowns(ctx)
    gen = torch.Generator().manual_seed(0)
    for domain in SOURCES:
        g, _ = source.sample(domain, 30, gen)
        _assert_rows_of(g, direct, domains, domain)
    g, _ = draw(source, SOURCES, 4, gen)
    for i, domain in enumerate(SOURCES):
        _assert_rows_of(g[4 * i : 4 * i + 4], direct, domains, domain)


# ------------------------------------------------- 3. SDEdit gives the editor the sources


def _spy_pipelines(monkeypatch) -> list[tuple[str, dict]]:
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

    calls = []
    for cls in (StableDiffusionPipeline, StableDiffusionImg2ImgPipeline):

        def call(self, *args, _cls=cls, _orig=cls.__call__, **kwargs):
            calls.append((_cls.__name__, kwargs))
            return _orig(self, *args, **kwargs)

        monkeypatch.setattr(cls, "__call__", call)
    return calls


def _sd_images_source(strength: float, cache_dir: Path):
    over = [
        "train.pseudo_unknowns=sd_images",
        "train.sd_model=tiny-test",
        f"train.sd_strength={strength}",
        "diffusion.pool_per_domain=2",
        "diffusion.sample_steps=2",
    ]
    cfg = apply_overrides(RunConfig(), [*BASE, *over])
    run = run_data.load_run_data(cfg, progress=False)
    sources = wiring.pseudo_sources(cfg, run, cache_dir=cache_dir, progress=False)
    return cfg, run, sources.train()


def test_sdedit_gives_the_editor_the_source_images_pick_sources_chose(
    digits, tmp_path, monkeypatch
):
    from seeclip.pseudo.sd_images import pick_sources

    _tiny_sd(monkeypatch)
    calls = _spy_pipelines(monkeypatch)
    cfg, run, _ = _sd_images_source(0.5, tmp_path)
    assert calls and {name for name, _ in calls} == {"StableDiffusionImg2ImgPipeline"}
    given = [np.asarray(im) for _, kw in calls for im in kw["image"]]
    assert all(kw["strength"] == 0.5 for _, kw in calls)
    # the chosen rows of the source training split, read from their files here
    train = _source_train(run)
    rows = pick_sources(train.domains, 2, torch.Generator().manual_seed(cfg.seed))
    files = run.image_paths(run.data.source_train[rows])
    expected = [np.asarray(Image.open(f).convert("RGB")) for f in files]
    assert len(given) == len(expected) == 2 * len(SOURCES)
    assert all(np.array_equal(a, b) for a, b in zip(given, expected, strict=True))
    assert [Path(f).relative_to(run.root).parts[0] for f in files] == [
        d for d in SOURCES for _ in range(2)
    ]
    # the pool records the same sources, each in its own domain
    (manifest,) = tmp_path.glob("pools/images/sd-*/manifest.csv")
    with open(manifest, newline="") as fh:
        recorded = [(r["domain"], r["source"]) for r in csv.DictReader(fh)]
    assert recorded == [(train.domains[i], f"{train.domains[i]}:{i}") for i in rows]


def test_text_to_image_gets_no_source_image(digits, tmp_path, monkeypatch):
    _tiny_sd(monkeypatch)
    calls = _spy_pipelines(monkeypatch)
    _, _, source = _sd_images_source(1.0, tmp_path)
    assert calls and {name for name, _ in calls} == {"StableDiffusionPipeline"}
    assert all("image" not in kw for _, kw in calls)
    assert sum(len(kw["generator"]) for _, kw in calls) == 2 * len(SOURCES)
    assert set(source.by_domain) == set(SOURCES)


# ------------------------------------------ 4. the tiny text-to-image model follows its prompts


@pytest.mark.slow
def test_tiny_text_to_image_draws_the_prompt_and_avoids_the_negative(tmp_path):
    """tiny-glyphs-sd through the pool generator, read by the independently trained tiny-glyphs
    CLIP: the positive prompt decides the glyph; a known class in the negative prompt is avoided."""
    pytest.importorskip("diffusers")
    from seeclip.generate.image_pool import generate_image_pool, load_image_pool
    from seeclip.generate.sd_pipeline import ImageDiffusionConfig, load_pipeline

    pipe = load_pipeline("tiny-glyphs-sd")
    clip = build_backbone("tiny-glyphs")
    letters = list("abcehkmopstx")  # the judge reads one of the known glyph letters
    with torch.no_grad():
        texts = clip.encode_text([f"a photo of the letter {c}." for c in letters])
    tokens = torch.randn(6, 2, 128, generator=torch.Generator().manual_seed(0))

    def read(prompt: str, negative: str, out: str) -> torch.Tensor:
        cfg = ImageDiffusionConfig(
            model="tiny-glyphs-sd", prompt=prompt, steps=6, guidance=4.0, batch_size=6
        )
        pool = load_image_pool(
            generate_image_pool(
                pipe,
                tokens,
                ["printed"] * 6,
                list("abcdef"),
                [negative],
                out_dir=tmp_path / out,
                cfg=cfg,
                seed=0,
                progress=False,
            )
        )
        x = torch.stack(
            [clip.preprocess(Image.open(pool.root / p).convert("RGB")) for p in pool.paths]
        )
        with torch.no_grad():
            return (100 * clip.encode_image(x)[0] @ texts.T).softmax(-1)

    o, x = letters.index("o"), letters.index("x")
    for c in (o, x):
        p = read(f"the letter {letters[c]}, {{domain}}", "a symbol", f"pos_{c}")
        assert (p.argmax(-1) == c).all(), (letters[c], p.argmax(-1))
    avoid_o = read("an unknown sign, {domain}", "letter o", "neg_o")
    avoid_x = read("an unknown sign, {domain}", "letter x", "neg_x")
    assert (avoid_o.argmax(-1) != o).all() and (avoid_x.argmax(-1) != x).all()
    assert avoid_o[:, o].mean() + 0.1 < avoid_x[:, o].mean()
    assert avoid_x[:, x].mean() + 0.1 < avoid_o[:, x].mean()
