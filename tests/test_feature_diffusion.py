import csv
import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from seeclip.generate.denoiser import TokenCells, semantic_queries, semantic_summaries
from seeclip.generate.feature_diffusion import (
    FeatureDiffusionConfig,
    FeatureGenerator,
    FeaturePool,
    build_pool,
    sample_pool,
)
from seeclip.methods import Features
from seeclip.pseudo import PSEUDO_UNKNOWNS, PseudoContext

DOMAINS = ("a", "b", "c")
D, N, C = 16, 4, 3
TINY = FeatureDiffusionConfig(
    k=2,
    width=64,
    depth=2,
    timesteps=20,
    sample_steps=5,
    train_steps=300,
    batch_size=32,
    lr=3e-3,
    pool_per_domain=8,
)


def synthetic(n_per=8, seed=0):
    """Class- and domain-dependent features, class text = class prototype."""
    g = torch.Generator().manual_seed(seed)
    protos = F.normalize(torch.randn(C, D, generator=g), dim=-1)
    labels = torch.arange(C).repeat_interleave(n_per).repeat(len(DOMAINS))
    domains = tuple(x for x in DOMAINS for _ in range(C * n_per))
    shift = torch.randn(len(DOMAINS), D, generator=g)[
        torch.arange(len(DOMAINS)).repeat_interleave(C * n_per)
    ]
    glob = 3 * protos[labels] + 0.3 * shift + 0.3 * torch.randn(len(labels), D, generator=g)
    tokens = glob[:, None, :] + 0.5 * torch.randn(len(labels), N, D, generator=g)
    return Features(F.normalize(glob, dim=-1).half(), tokens.half(), domains), labels, protos


class FakeText:
    """encode_text without a CLIP: a fixed random unit vector per prompt."""

    def encode_text(self, texts):
        out = []
        for t in texts:
            g = torch.Generator().manual_seed(sum(map(ord, t)) * 7919 % 2**31)
            out.append(torch.randn(D, generator=g))
        return F.normalize(torch.stack(out), dim=-1)


@pytest.fixture(scope="module")
def data():
    return synthetic()


@pytest.fixture(scope="module")
def trained(data):
    feats, labels, protos = data
    return FeatureGenerator.fit(feats, labels, protos, config=TINY, seed=0, progress=False)


def test_token_cells_partition_the_patch_grid_and_round_trip():
    cells = TokenCells.grid(16, 2)  # 4x4 patches -> 2x2 cells of 2x2 patches
    assert cells.cell.tolist() == [0, 0, 1, 1, 0, 0, 1, 1, 2, 2, 3, 3, 2, 2, 3, 3]
    z = torch.randn(3, 4, 5)
    torch.testing.assert_close(cells.pool(cells.unpool(z)), z)
    t = torch.arange(16.0)[None, :, None]
    assert cells.pool(t).flatten().tolist() == [2.5, 4.5, 10.5, 12.5]
    assert TokenCells.grid(6, 2).cell.tolist() == [0, 0, 1, 2, 2, 3]  # not a square: runs
    assert TokenCells.grid(4, 0).n_cells == 4
    with pytest.raises(ValueError, match="needs at least 9 tokens"):
        TokenCells.grid(4, 3)


def test_semantic_queries_are_seeded_unit_vectors(data):
    feats = data[0]
    q1 = semantic_queries(feats.tokens, 3, torch.Generator().manual_seed(0))
    q2 = semantic_queries(feats.tokens, 3, torch.Generator().manual_seed(0))
    torch.testing.assert_close(q1, q2)
    torch.testing.assert_close(q1.norm(dim=-1), torch.ones(3))
    v = semantic_summaries(feats.tokens, q1)
    assert v.shape == (len(feats), 3, D)
    # each summary is a convex combination of the image's tokens
    lo, hi = feats.tokens.float().min(1).values, feats.tokens.float().max(1).values
    assert bool(((v >= lo[:, None] - 1e-4) & (v <= hi[:, None] + 1e-4)).all())


def test_ddpm_loss_falls(trained):
    _, losses = trained
    assert len(losses) == TINY.train_steps
    # zero-initialised output: x0_hat = 0, so the first loss is E x0^2 = 1 (standardised x)
    assert losses[0] == pytest.approx(1.0, abs=0.1)
    assert sum(losses[-20:]) / 20 < 0.3


def test_sigma_perturbs_the_standardised_summaries(data, trained):
    gen = trained[0]
    tokens = data[0].tokens
    g, t = gen.decode(gen.encode(data[0].global_, tokens))  # every token kept: lossless
    torch.testing.assert_close(t, tokens.float(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(g, data[0].global_.float(), atol=1e-3, rtol=0)
    clean = gen.conditions(tokens, 0.0, torch.Generator().manual_seed(0))
    noisy = gen.conditions(tokens, 0.2, torch.Generator().manual_seed(0))
    assert clean.shape == (len(tokens), TINY.k, D)
    torch.testing.assert_close(clean.flatten(1).mean(0), torch.zeros(TINY.k * D), atol=1e-4, rtol=0)
    assert (noisy - clean).std().item() == pytest.approx(0.2, rel=0.1)


def _pool(gen, data, **changes):
    feats, labels, protos = data
    cfg = dataclasses.replace(TINY, **changes)
    unknown = FakeText().encode_text(["unknown"])[0]
    return sample_pool(
        gen,
        feats,
        labels,
        class_text=protos,
        unknown_text=unknown,
        config=cfg,
        seed=0,
        progress=False,
    )


def test_guidance_and_sigma_change_the_samples(data, trained):
    gen = trained[0]
    g0, t0, rows = _pool(gen, data, guidance=0.0)
    g15, t15, rows15 = _pool(gen, data, guidance=15.0)
    assert torch.equal(rows, rows15)  # same conditioning images, same seed
    assert (g0 - g15).norm(dim=-1).mean() > 0.05
    g_s0, _, _ = _pool(gen, data, guidance=0.0, sigma=0.0)
    assert (g0 - g_s0).norm(dim=-1).mean() > 1e-3
    again, _, _ = _pool(gen, data, guidance=15.0)
    torch.testing.assert_close(again, g15, rtol=0, atol=0)  # seeded: deterministic


def test_pooled_grid_keeps_the_source_tokens_within_cell_detail(data):
    feats, labels, protos = data
    cfg = dataclasses.replace(TINY, grid=1, train_steps=5)  # one cell: x = [global, mean token]
    gen, _ = FeatureGenerator.fit(feats, labels, protos, config=cfg, seed=0, progress=False)
    assert gen.cells.n_cells == 1
    _, tokens, rows = _pool(gen, data, grid=1, train_steps=5)
    src = feats.tokens[rows].float()
    torch.testing.assert_close(
        tokens - tokens.mean(1, keepdim=True), src - src.mean(1, keepdim=True), atol=1e-4, rtol=0
    )
    _, flat, _ = _pool(gen, data, grid=1, train_steps=5, detail=False)
    torch.testing.assert_close(flat, flat[:, :1].expand_as(flat))  # piecewise constant


def test_build_pool_writes_a_manifest_and_is_reused(data, tmp_path, monkeypatch):
    feats, labels, protos = data
    unknown = FakeText().encode_text(["unknown"])[0]
    kw = dict(class_text=protos, unknown_text=unknown, config=TINY, seed=3, progress=False)
    pool = build_pool(feats, labels, root=tmp_path / "a", **kw)
    m = 3 * TINY.pool_per_domain
    assert pool.global_.shape == (m, D) and pool.tokens.shape == (m, N, D)
    assert pool.global_.dtype == torch.float16
    torch.testing.assert_close(pool.global_.float().norm(dim=-1), torch.ones(m), atol=2e-3, rtol=0)
    assert pool.domains == tuple(x for x in DOMAINS for _ in range(TINY.pool_per_domain))
    assert [feats.domains[i] for i in pool.source_index.tolist()] == list(pool.domains)

    meta = json.loads((pool.path / "manifest.json").read_text())
    assert meta["seed"] == 3 and meta["n"] == m
    assert meta["config"]["sigma"] == 0.2 and meta["config"]["guidance"] == 15.0
    assert meta["per_domain"] == {d: TINY.pool_per_domain for d in DOMAINS}
    rows = list(csv.DictReader(open(pool.path / "samples.csv")))
    assert len(rows) == m
    r = rows[5]
    assert int(r["source_index"]) == int(pool.source_index[5]) and r["domain"] == pool.domains[5]
    assert int(r["source_label"]) == int(labels[int(r["source_index"])])
    assert (float(r["sigma"]), float(r["g"]), int(r["seed"])) == (0.2, 15.0, 3)
    assert not list(tmp_path.glob("a/*.tmp-*"))

    # same key: loaded, nothing trained or sampled
    monkeypatch.setattr(FeatureGenerator, "fit", lambda *a, **k: pytest.fail("retrained"))
    again = build_pool(feats, labels, root=tmp_path / "a", **kw)
    assert again.path == pool.path and torch.equal(again.tokens, pool.tokens)
    # a new g re-samples from the stored generator (no retraining) into a new pool
    other = build_pool(
        feats,
        labels,
        root=tmp_path / "a",
        **{**kw, "config": dataclasses.replace(TINY, guidance=2.0)},
    )
    assert other.path != pool.path and not torch.equal(other.global_, pool.global_)
    monkeypatch.undo()
    # built from scratch elsewhere: the same numbers (deterministic from the seed)
    fresh = build_pool(feats, labels, root=tmp_path / "b", **kw)
    assert fresh.path.name == pool.path.name
    assert torch.equal(fresh.global_, pool.global_) and torch.equal(fresh.tokens, pool.tokens)


def test_pool_sample_draws_rows_of_the_domain():
    glob = F.normalize(torch.randn(6, D), dim=-1).half()
    pool = FeaturePool(glob, torch.randn(6, N, D).half(), ("a",) * 3 + ("b",) * 3, torch.arange(6))
    g, t = pool.sample("b", 10, torch.Generator().manual_seed(0))
    g2, _ = pool.sample("b", 10, torch.Generator().manual_seed(0))
    assert g.dtype == torch.float32 and t.shape == (10, N, D) and torch.equal(g, g2)
    hits = (g[:, None, :] == glob.float()[None]).all(-1)
    assert hits[:, 3:].any(-1).all() and not hits[:, :3].any()
    with pytest.raises(KeyError, match="no domain 'z'"):
        pool.sample("z", 1, torch.Generator())


def test_diffusion_is_a_registered_pseudo_unknown_source(data):
    feats, labels, _ = data
    ctx = PseudoContext(
        feats,
        labels,
        backbone=FakeText(),
        class_texts=("zero", "one", "two"),
        template="a photo of the digit {}.",
        seed=0,
        diffusion=dataclasses.replace(TINY, train_steps=10),
    )
    source = PSEUDO_UNKNOWNS.get("diffusion")(ctx)
    g, t = source.sample("c", 5, torch.Generator().manual_seed(1))
    assert g.shape == (5, D) and t.shape == (5, N, D)
    with pytest.raises(ValueError, match="need the backbone"):
        PSEUDO_UNKNOWNS.get("diffusion")(PseudoContext(feats, labels))


def test_prompt_trainer_trains_on_a_diffusion_pool_and_reuses_it(monkeypatch):
    from seeclip.backbone import build_backbone
    from seeclip.config import TrainConfig
    from seeclip.features import PseudoSources
    from seeclip.methods import MethodEnv
    from seeclip.methods.prompt_model import PromptConfig
    from seeclip.methods.registry import build_method
    from seeclip.paths import seeclip_home
    from seeclip.pseudo import diffusion_unknowns

    backbone = build_backbone("tiny-vit")  # d = 64, 16 tokens
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(3).repeat(12)
    domains = tuple(DOMAINS[i % 3] for i in range(36))
    tokens = torch.randn(36, 16, 64, generator=g) + 2 * torch.randn(3, 1, 64, generator=g)[labels]
    feats = Features(F.normalize(tokens.mean(1), dim=-1).half(), tokens.half(), domains)
    options = dataclasses.replace(TINY, train_steps=20)
    cfg = TrainConfig(epochs=2, batch_size=12, pseudo_unknowns="diffusion", selection="val_h")
    texts = ("zero", "one", "two")

    def source():
        ctx = PseudoContext(
            feats, labels, backbone=backbone, class_texts=texts, diffusion=options, progress=False
        )
        return diffusion_unknowns(ctx)

    def trainer():
        env = MethodEnv(
            backbone,
            texts,
            "a photo of a {}.",
            pseudo=PseudoSources("diffusion", source, source),
            progress=False,
        )
        return build_method("coop_unknown", env, {"prompt": PromptConfig(n_ctx=2), "train": cfg})

    first = trainer()
    first.fit(feats, labels, feats, labels)
    assert len(list((seeclip_home() / "pools").glob("*/manifest.json"))) == 1
    assert "acc_unknown" in first.log.val[0]  # held-out pseudo-unknowns were scored
    monkeypatch.setattr(FeatureGenerator, "fit", lambda *a, **k: pytest.fail("retrained"))
    second = trainer()
    second.fit(feats, labels, feats, labels)  # the stored pool: the same batches, same weights
    a, b = first.state(), second.state()
    assert all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------ the generator follows its conditioning (not only shapes)


@pytest.fixture(scope="module")
def feature_generator():
    feats, labels, protos = synthetic()
    gen, _ = FeatureGenerator.fit(feats, labels, protos, config=TINY, seed=0, progress=False)
    return gen, feats, labels, protos


def _samples(gen, feats, pos, neg, guidance, domains=None):
    feats = Features(feats.global_, feats.tokens, domains or feats.domains)
    g, _ = gen.generate(
        feats,
        torch.arange(len(feats)),
        pos,
        neg,
        sigma=0.2,
        guidance=guidance,
        steps=5,
        clip_x0=4.0,
        detail=True,
        generator=torch.Generator().manual_seed(0),
    )
    return g


def test_feature_diffusion_domain_label_pulls_samples_to_that_domain(feature_generator):
    gen, feats, labels, protos = feature_generator
    text = protos[labels]
    own = torch.tensor([DOMAINS.index(d) for d in feats.domains])
    other = (own + 1) % len(DOMAINS)
    centroids = torch.stack([feats.global_.float()[own == i].mean(0) for i in range(3)])
    kept = _samples(gen, feats, text, text, 1.0)
    moved = _samples(gen, feats, text, text, 1.0, tuple(DOMAINS[i] for i in other))

    def dist(g, dom):
        return float((g - centroids[dom]).norm(dim=-1).mean())

    # the same images and noise under another domain's label: nearer that domain, farther
    # from their own
    assert dist(moved, other) < dist(kept, other) - 0.05
    assert dist(moved, own) > dist(kept, own) + 0.05


def test_feature_diffusion_guidance_steers_to_the_positive_text(feature_generator):
    gen, feats, labels, protos = feature_generator
    nxt = (labels + 1) % C
    own, other = protos[labels], protos[nxt]  # negative: the image's class; positive: the next

    def toward_other(guidance):
        g = _samples(gen, feats, other, own, guidance)
        read_as_next = ((g @ protos.T).argmax(-1) == nxt).float().mean()
        return float((g * other).sum(-1).mean()), float(read_as_next)

    (cos1, share1), (cos3, _), (cos8, share8) = (toward_other(s) for s in (1.0, 3.0, 8.0))
    assert cos1 < cos3 < cos8  # stronger guidance, closer to the positive text
    assert share1 < 0.2 and share8 > 0.6  # at g=8 most samples read as the positive class


def test_feature_pool_is_bitwise_reproducible_from_its_seed(feature_generator, tmp_path):
    feats, labels, protos = synthetic()
    cfg = dataclasses.replace(TINY, train_steps=30)
    kw = dict(
        class_text=protos,
        unknown_text=F.normalize(torch.ones(D), dim=0),
        config=cfg,
        progress=False,
    )
    first = build_pool(feats, labels, seed=0, root=tmp_path / "a", **kw)
    again = build_pool(feats, labels, seed=0, root=tmp_path / "b", **kw)  # trained afresh
    other = build_pool(feats, labels, seed=1, root=tmp_path / "c", **kw)
    assert torch.equal(first.global_, again.global_) and torch.equal(first.tokens, again.tokens)
    assert torch.equal(first.source_index, again.source_index)
    assert not torch.equal(first.global_, other.global_)
    assert (first.global_.float() - other.global_.float()).norm(dim=-1).min() > 1e-3
    # one trained generator: the sampling seed alone decides the samples, rows included
    gen = feature_generator[0]
    kw = dict(kw, config=TINY)
    a, b, c = (sample_pool(gen, feats, labels, seed=s, **kw) for s in (0, 0, 1))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a[2], c[2])  # other conditioning images, and no sample repeated
    assert torch.cdist(a[0], c[0]).min() > 1e-3
