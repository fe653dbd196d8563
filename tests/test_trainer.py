import inspect

import numpy as np
import pytest
import torch

from seeclip.backbone import build_backbone
from seeclip.config import LossConfig, TrainConfig
from seeclip.methods import Features
from seeclip.methods.learned import _ce_only, _seeclip_terms
from seeclip.methods.models import CoOpModel, SeeCLIPModel
from seeclip.pseudo import MixupUnknowns
from seeclip.trainer import BalancedBatches, PromptTrainer

DOMAINS = ("a", "b", "c")


@pytest.fixture(scope="module")
def backbone():
    return build_backbone("tiny-vit")


def synthetic(n_per=12, classes=3, d=64, n_tokens=16, seed=0):
    """Features whose class is readable from the global feature and the tokens."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(classes, d, generator=g)
    labels = torch.arange(classes).repeat_interleave(n_per).repeat(len(DOMAINS))
    domains = tuple(d_ for d_ in DOMAINS for _ in range(classes * n_per))
    glob = protos[labels] + 0.3 * torch.randn(len(labels), d, generator=g)
    tokens = glob[:, None, :] + 0.3 * torch.randn(len(labels), n_tokens, d, generator=g)
    feats = Features(torch.nn.functional.normalize(glob, dim=-1).half(), tokens.half(), domains)
    return feats, labels


def test_balanced_batches_give_each_domain_its_share_and_cycle_through_images():
    domains = ("a",) * 10 + ("b",) * 4 + ("c",) * 7
    batches = BalancedBatches(domains, 9, pseudo_fraction=0.0, generator=torch.Generator())
    seen = []
    for _ in range(4):  # 4 steps x 3 per domain = 12 draws from "b" (3 full cycles of 4)
        real, pseudo = batches.next()
        assert sorted(domains[i] for i in real) == ["a"] * 3 + ["b"] * 3 + ["c"] * 3
        assert pseudo == {"a": 0, "b": 0, "c": 0}
        seen += [i for i in real if domains[i] == "b"]
    assert sorted(seen) == sorted(list(range(10, 14)) * 3)


def test_pseudo_unknown_share_averages_the_configured_fraction():
    domains = ("a",) * 50 + ("b",) * 50
    batches = BalancedBatches(domains, 20, pseudo_fraction=0.15, generator=torch.Generator())
    counts = [sum(batches.next()[1].values()) for _ in range(2000)]
    assert np.mean(counts) == pytest.approx(0.15 * 20, rel=0.05)
    with pytest.raises(ValueError, match="batch_size 1 < number of source domains 2"):
        BalancedBatches(domains, 1, pseudo_fraction=0, generator=torch.Generator())


def test_mixup_unknowns_mix_two_different_classes_of_one_domain():
    feats, labels = synthetic()
    src = MixupUnknowns(feats, labels)
    g, t = src.sample("b", 64, torch.Generator().manual_seed(0))
    assert g.shape == (64, 64) and t.shape == (64, 16, 64)
    torch.testing.assert_close(g.norm(dim=-1), torch.ones(64))
    # a mix is closer to two class prototypes than any real image is
    centroids = torch.stack([feats.global_[labels == c].float().mean(0) for c in range(3)])
    second = (g @ centroids.T).sort(dim=-1).values[:, -2]
    real_second = (feats.global_.float() @ centroids.T).sort(dim=-1).values[:, -2]
    assert second.mean() > real_second.mean()


def _trainer(backbone, model_cls="coop", **train):
    cfg = TrainConfig(**{"epochs": 3, "batch_size": 12, "lr": 1e-2, **train})
    torch.manual_seed(0)  # the models' initial weights
    if model_cls == "coop":
        model = CoOpModel(backbone, ["zero", "one", "two"], n_ctx=2)
        return PromptTrainer(model, _ce_only, train=cfg, seed=0, progress=False)
    model = SeeCLIPModel(backbone, ["zero", "one", "two"], k=2, m=2)
    loss = LossConfig()
    return PromptTrainer(
        model,
        lambda out, y: _seeclip_terms(out, y, model=model, loss=loss),
        train=cfg,
        seed=0,
        progress=False,
    )


def test_training_lowers_the_loss_and_same_seed_gives_same_weights(backbone):
    feats, labels = synthetic()
    runs = []
    for _ in range(2):
        t = _trainer(backbone, "seeclip", epochs=4)
        t.fit(feats, labels, feats, labels)
        runs.append(t)
    losses = [e["total"] for e in runs[0].log.losses]
    assert losses[-1] < losses[0]
    a, b = runs[0].state(), runs[1].state()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not any(k.startswith("backbone.") for k in a)


def test_state_round_trip_reproduces_predictions_and_threshold(backbone):
    feats, labels = synthetic()
    trained = _trainer(backbone)
    trained.fit(feats, labels, feats, labels)
    assert trained.threshold is not None  # coop: MSP threshold from source val
    fresh = _trainer(backbone)
    fresh.load_state(trained.state())
    p, q = trained.predict(feats), fresh.predict(feats)
    np.testing.assert_array_equal(p.y_pred, q.y_pred)
    np.testing.assert_allclose(p.unknown_score, q.unknown_score)


def test_val_acc_selection_keeps_the_best_source_val_epoch(backbone):
    feats, labels = synthetic()
    t = _trainer(backbone, "seeclip", selection="val_acc", epochs=3)
    t.fit(feats, labels, feats, labels)
    accs = [v["acc_known"] for v in t.log.val]
    assert t.log.selected_epoch == int(np.argmax(accs)) + 1
    y_pred = t.predict(feats).y_pred
    assert np.mean(y_pred == labels.numpy()) == pytest.approx(max(accs))


def test_prediction_takes_no_label_and_bad_options_fail_early(backbone):
    assert list(inspect.signature(PromptTrainer.predict).parameters) == ["self", "images"]
    with pytest.raises(ValueError, match="selection=val_h .* has none"):
        _trainer(backbone, selection="val_h")
    with pytest.raises(ValueError, match="unknown selection 'best'"):
        _trainer(backbone, selection="best")
    with pytest.raises(KeyError, match="unknown pseudo-unknown source 'gan'"):
        _trainer(backbone, pseudo_unknowns="gan")
