"""Tests parametrised over the registries (timm style): a new entry is tested without a new test."""

from __future__ import annotations

import inspect
import typing

import numpy as np
import pytest
import torch

from seeclip.backbone import build_backbone
from seeclip.config import TrainConfig
from seeclip.features import Features, PseudoSources
from seeclip.methods import MethodEnv
from seeclip.methods.registry import METHODS, build_method, sections_of
from seeclip.methods.zeroshot import ZeroShotConfig
from seeclip.pseudo import PSEUDO_UNKNOWNS, PseudoContext
from seeclip.run_config import RunConfig
from seeclip.selection import SELECTIONS

DOMAINS = ("a", "b")
CLASSES = ("zero", "one", "two")


@pytest.fixture(scope="module")
def backbone():
    return build_backbone("tiny-vit", seed=0)  # d = 64, 16 tokens


def tiny_features(n_per=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(len(CLASSES)).repeat_interleave(n_per).repeat(len(DOMAINS))
    domains = tuple(d for d in DOMAINS for _ in range(len(CLASSES) * n_per))
    protos = torch.randn(len(CLASSES), 64, generator=g)
    glob = protos[labels] + 0.3 * torch.randn(len(labels), 64, generator=g)
    tokens = glob[:, None] + 0.3 * torch.randn(len(labels), 16, 64, generator=g)
    return Features(
        torch.nn.functional.normalize(glob, dim=-1).half(), tokens.half(), domains
    ), labels


def _sections():
    cfg = RunConfig(train=TrainConfig(epochs=1, batch_size=6))
    return {
        "zeroshot": cfg.zeroshot,
        "prompt": cfg.prompt,
        "loss": cfg.loss,
        "train": cfg.train,
        "diffusion": cfg.diffusion,
    }


def _env(backbone, train, labels):
    from seeclip.pseudo import MixupUnknowns

    pseudo = PseudoSources("mixup", lambda: MixupUnknowns(train, labels), lambda: None)
    return MethodEnv(backbone, CLASSES, "a photo of a {}.", seed=0, pseudo=pseudo, progress=False)


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_fits_predicts_without_labels_and_restores(name, backbone):
    train, labels = tiny_features()
    target, _ = tiny_features(n_per=2, seed=1)
    method = build_method(name, _env(backbone, train, labels), _sections())
    method.fit(train, labels, train, labels)
    assert list(inspect.signature(method.predict).parameters) == ["images"]  # no label path
    pred = method.predict(target)
    c = len(CLASSES)
    assert pred.y_pred.shape == pred.y_pred_closed.shape == pred.unknown_score.shape == (12,)
    assert set(pred.y_pred.tolist()) <= set(range(c + 1))
    assert set(pred.y_pred_closed.tolist()) <= set(range(c))
    assert np.isfinite(pred.unknown_score).all()
    fresh = build_method(name, _env(backbone, train, labels), _sections())
    fresh.load_state(method.state())
    again = fresh.predict(target)
    np.testing.assert_array_equal(again.y_pred, pred.y_pred)
    np.testing.assert_allclose(again.unknown_score, pred.unknown_score, rtol=1e-6, atol=1e-7)
    for record in method.history():
        assert record["kind"] == "epoch" and "loss_total" in record


@pytest.mark.parametrize("name", list(METHODS))
def test_every_factory_takes_typed_config_sections_only(name):
    factory = METHODS.get(name)
    params = inspect.signature(factory).parameters
    assert list(params)[0] == "env"
    hints = typing.get_type_hints(factory)
    section_types = typing.get_type_hints(RunConfig)
    for section in sections_of(factory):
        assert hints[section] is section_types[section]  # e.g. prompt: PromptConfig


@pytest.mark.parametrize("name", list(PSEUDO_UNKNOWNS))
def test_every_pseudo_unknown_source_samples_in_the_feature_format(
    name, backbone, tmp_path, monkeypatch
):
    monkeypatch.setenv("SEECLIP_HOME", str(tmp_path))
    train, labels = tiny_features()
    pool = sd_model = None
    if name in ("pool", "images"):
        pool = str(_stored_pool(name, backbone, train, labels, tmp_path))
    if name in ("sd_images", "sd_online"):  # a tiny random pipeline saved as diffusers does
        from seeclip.testing import build_tiny_pipeline

        sd_model = str(tmp_path / "sd")
        build_tiny_pipeline(seed=0).save_pretrained(sd_model)
    ctx = PseudoContext(
        train,
        labels,
        backbone=backbone,
        class_texts=CLASSES,
        seed=0,
        diffusion=_tiny_diffusion(),
        pool=pool,
        sd_model=sd_model,
        cache_dir=tmp_path,
        progress=False,
    )
    source = PSEUDO_UNKNOWNS.get(name)(ctx)
    if name == "none":
        assert source is None
        return
    gen = torch.Generator().manual_seed(0)
    if name == "sd_online":  # it follows the model in training: the trainer's two calls
        from seeclip.methods.seeclip import SeeCLIPModel

        source.follow(SeeCLIPModel(backbone, CLASSES, k=2))
        source.prepare(0, {"b": 5}, gen)
    g, t = source.sample("b", 5, gen)
    assert g.shape == (5, 64) and t.shape == (5, 16, 64)
    torch.testing.assert_close(g.float().norm(dim=-1), torch.ones(5), atol=2e-3, rtol=0)


def _tiny_diffusion():
    from seeclip.generate.feature_config import FeatureDiffusionConfig

    return FeatureDiffusionConfig(
        k=2,
        width=32,
        depth=1,
        timesteps=10,
        sample_steps=3,
        train_steps=5,
        batch_size=16,
        pool_per_domain=4,
    )


def _stored_pool(name, backbone, train, labels, tmp_path):
    """What `seeclip generate` leaves on disk: a feature pool folder, or an image manifest."""
    if name == "pool":
        from seeclip.pseudo import diffusion_unknowns

        ctx = PseudoContext(
            train,
            labels,
            backbone=backbone,
            class_texts=CLASSES,
            diffusion=_tiny_diffusion(),
            cache_dir=tmp_path,
            progress=False,
        )
        return diffusion_unknowns(ctx).path
    import csv

    from PIL import Image

    from seeclip.generate.image_pool import MANIFEST_FIELDS

    root = tmp_path / "images"
    root.mkdir()
    with open(root / "manifest.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=MANIFEST_FIELDS, restval="0")
        writer.writeheader()
        for i, domain in enumerate(("a", "b") * 3):
            Image.fromarray(np.full((32, 32, 3), 40 * i, np.uint8)).save(root / f"{i}.png")
            writer.writerow({"path": f"{i}.png", "domain": domain})
    return root / "manifest.csv"


def test_config_choices_are_the_registries():
    hints = typing.get_type_hints(TrainConfig)
    assert set(typing.get_args(hints["pseudo_unknowns"])) == set(PSEUDO_UNKNOWNS)
    assert set(typing.get_args(hints["selection"])) == set(SELECTIONS)
    from seeclip.methods.zeroshot import SCORES

    assert set(typing.get_args(typing.get_type_hints(ZeroShotConfig)["score"])) == set(SCORES)
