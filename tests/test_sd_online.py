"""The online image generator (train.pseudo_unknowns=sd_online): driven by the trained model's
own learned queries, at the configured frequency, inside the trainer, resumable bit for bit,
and refused where it cannot mean anything. Tiny random models only (no download)."""

from __future__ import annotations

import pytest
import torch

from seeclip.config import ConfigError, apply_overrides
from seeclip.features import PseudoSources
from seeclip.run_config import RunConfig
from test_trainer import _trainer, synthetic

pytest.importorskip("diffusers")

NEGATIVE = "zero, one, two"


@pytest.fixture(scope="module")
def backbone():
    from seeclip.backbone import build_backbone

    return build_backbone("tiny-vit")  # 16 patch tokens of width 64, as synthetic() makes


@pytest.fixture(scope="module")
def pipe():
    from seeclip.testing import build_tiny_pipeline

    return build_tiny_pipeline(0)


def _online(feats, pipe, backbone, every=1, pool_per_domain=3):
    from seeclip.generate.sd_conditioning import token_projection
    from seeclip.generate.sd_pipeline import ImageDiffusionConfig
    from seeclip.pseudo import OnlineImageUnknowns

    cfg = ImageDiffusionConfig(model="tiny-test", steps=2, guidance=3.0)
    return OnlineImageUnknowns(
        feats,
        pipe=pipe,
        backbone=backbone,
        cfg=cfg,
        projection=token_projection(backbone.embed_dim, pipe.text_encoder.config.hidden_size),
        negative=NEGATIVE,
        every=every,
        pool_per_domain=pool_per_domain,
    )


def _model(backbone):
    return _trainer(backbone, "seeclip", epochs=1).model


def _spy(monkeypatch):
    """Record the clean tokens and domains of every sampling call."""
    from seeclip.generate import image_pool

    calls, real = [], image_pool.sample_images

    def spy(pipe, clean, noise, domains, negative, **kw):
        calls.append((clean.clone(), list(domains), negative))
        return real(pipe, clean, noise, domains, negative, **kw)

    monkeypatch.setattr(image_pool, "sample_images", spy)
    return calls


def test_the_tokens_are_the_models_own_summaries_and_move_with_its_queries(
    backbone, pipe, monkeypatch
):
    feats, _ = synthetic()
    model = _model(backbone)
    source = _online(feats, pipe, backbone)
    source.follow(model)
    calls = _spy(monkeypatch)
    counts = {"a": 2, "b": 0, "c": 1}

    def draw():
        source.prepare(0, counts, torch.Generator().manual_seed(5))
        return {d: source.sample(d, n, torch.Generator()) for d, n in counts.items() if n}

    first = draw()
    ((clean, domains, negative),) = calls
    assert domains == ["a", "a", "c"] and negative == NEGATIVE
    assert first["a"][0].shape == (2, 64) and first["c"][1].shape == (1, 16, 64)
    # the clean tokens are the model's current summaries of source rows of each domain
    rows = torch.Generator().manual_seed(5)
    picked = []
    for d, n in (("a", 2), ("c", 1)):  # sorted domains with a count, rows drawn per domain
        picked += (feats.domains.index(d) + torch.randint(36, (n,), generator=rows)).tolist()
    with torch.no_grad():
        expected = model.semantic_summaries(feats.tokens[picked].float())
    torch.testing.assert_close(clean, expected)
    again = draw()  # same generator, same model: the same images
    assert torch.equal(again["a"][0], first["a"][0])
    with torch.no_grad():  # the model learns: its queries move, so do the pseudo-unknowns
        model.semantic.queries.add_(torch.randn(model.semantic.queries.shape))
    moved = draw()
    assert not torch.allclose(calls[-1][0], clean)
    assert not torch.equal(moved["a"][0], first["a"][0])


@pytest.mark.parametrize(
    ("every", "drawn"),
    [(1, [3, 3, 3, 3, 3, 3]), (3, [3, 0, 0, 3, 0, 0]), (0, [6, 0, 0, 0, 0, 0])],
)
def test_the_frequency_setting_decides_when_images_are_drawn(backbone, pipe, every, drawn):
    feats, _ = synthetic()
    source = _online(feats, pipe, backbone, every=every, pool_per_domain=2)
    source.follow(_model(backbone))
    gen, seen = torch.Generator().manual_seed(0), []
    for step in range(6):
        before = source.images_drawn
        source.prepare(step, {"a": 1, "b": 1, "c": 1}, gen)
        seen.append(source.images_drawn - before)
        for d in "abc":
            g, t = source.sample(d, 1, gen)
            assert g.shape == (1, 64) and t.shape == (1, 16, 64)
    assert seen == drawn


def test_a_step_without_pseudo_unknowns_draws_nothing(backbone, pipe):
    """Small batches (Office-Home's 6: 0.2 expected per domain) often ask for none at all."""
    feats, _ = synthetic()
    source = _online(feats, pipe, backbone, every=1)
    source.follow(_model(backbone))
    source.prepare(0, {"a": 0, "b": 0, "c": 0}, torch.Generator().manual_seed(0))
    assert source.images_drawn == 0


def test_the_trainer_hands_it_the_model_and_resumes_bit_for_bit(backbone, pipe, tmp_path):
    feats, labels = synthetic()

    def trainer():
        source = _online(feats, pipe, backbone, every=2)
        t = _trainer(
            backbone,
            "seeclip",
            PseudoSources("sd_online", lambda: source, lambda: source),
            epochs=2,
            pseudo_fraction=0.3,
        )
        return t, source

    whole, source = trainer()
    whole.fit(feats, labels, feats, labels, checkpoint=tmp_path / "a.pt")
    assert source.model is whole.model and source.images_drawn > 0

    class Interrupted(Exception):
        pass

    broken, _ = trainer()
    loss_fn, steps = broken.loss_fn, []

    def dies_in_epoch_2(out, y):
        steps.append(1)
        if len(steps) == 9 + 3:  # 9 steps per epoch
            raise Interrupted
        return loss_fn(out, y)

    broken.loss_fn = dies_in_epoch_2
    with pytest.raises(Interrupted):
        broken.fit(feats, labels, feats, labels, checkpoint=tmp_path / "b.pt")
    resumed, _ = trainer()
    resumed.fit(feats, labels, feats, labels, checkpoint=tmp_path / "b.pt")
    a, b = whole.state(), resumed.state()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert whole.history() == resumed.history()


def test_a_model_without_learned_queries_is_refused_before_any_work(backbone, pipe):
    feats, _ = synthetic()
    source = _online(feats, pipe, backbone)
    with pytest.raises(ValueError, match="no.*use sd_images|has none"):
        source.follow(_trainer(backbone, "coop_unknown", epochs=1).model)
    from seeclip.wiring import check_inputs

    for over in (["method=coop_unknown"], ["method=seeclip", "prompt.semantic_tokens=false"]):
        cfg = apply_overrides(RunConfig(), [*over, "train.pseudo_unknowns=sd_online"])
        with pytest.raises(ConfigError, match="sd_online.*use train.pseudo_unknowns=sd_images"):
            check_inputs(cfg)
    sdedit = ["method=seeclip", "train.pseudo_unknowns=sd_online", "train.sd_strength=0.6"]
    with pytest.raises(ConfigError, match="sd_strength=0.6.*use sd_images"):
        check_inputs(apply_overrides(RunConfig(), sdedit))
    with pytest.raises(ConfigError, match="train.sd_every"):
        apply_overrides(RunConfig(), ["train.sd_every=-1"])


def test_train_runs_it_from_a_diffusers_folder_and_records_the_run(
    small_digits, tmp_path, monkeypatch, capsys
):
    """`seeclip eval` with the online generator from a diffusers folder on disk, as users hold
    SD-1.5 (here the tiny random pipeline, saved): it trains, records and predicts."""
    import json

    from seeclip.cli import main
    from seeclip.testing import build_tiny_pipeline

    monkeypatch.setenv("SEECLIP_HOME", str(small_digits))
    folder = tmp_path / "sd"
    build_tiny_pipeline(0).save_pretrained(str(folder))
    argv = [
        "eval", "--benchmark", "digits", "--backbone", "tiny-vit", "--method", "seeclip",
        "--target", "printed", "--runs-dir", str(tmp_path / "runs"), "--no-progress",
        "train.epochs=1", "train.batch_size=8", "train.pseudo_fraction=0.3",
        "train.pseudo_unknowns=sd_online", f"train.sd_model={folder}", "train.sd_every=2",
        "diffusion.sample_steps=2",
    ]  # fmt: skip
    assert main(argv) == 0
    (results,) = tmp_path.glob("runs/*/*/results.jsonl")
    records = [json.loads(x) for x in results.read_text().splitlines()]
    (final,) = [r for r in records if r["kind"] == "final"]
    assert final["pseudo_images_drawn"] > 0  # the run says what the generator cost
    config = (results.parent / "config.yaml").read_text()
    assert "pseudo_unknowns: sd_online" in config and "sd_every: 2" in config
    # a folder that is not there: one line naming the option, before any run folder is made
    runs = sorted(p.name for p in (tmp_path / "runs").glob("*/*"))
    missing = [*argv[:-5], "train.pseudo_unknowns=sd_online", f"train.sd_model={tmp_path / 'no'}"]
    capsys.readouterr()
    assert main(missing) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.sd_model" in err[0], err
    assert sorted(p.name for p in (tmp_path / "runs").glob("*/*")) == runs
