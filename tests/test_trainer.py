import inspect
import math

import numpy as np
import pytest
import torch

from seeclip.backbone import build_backbone
from seeclip.config import ConfigError, TrainConfig
from seeclip.features import PseudoSources
from seeclip.methods import Features, MethodEnv
from seeclip.methods.prompt_model import PromptConfig
from seeclip.methods.registry import build_method
from seeclip.methods.seeclip import LossConfig
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


def _trainer(backbone, method="coop", pseudo=None, **train):
    cfg = TrainConfig(**{"epochs": 3, "batch_size": 12, "lr": 1e-2, **train})
    env = MethodEnv(
        backbone, ("zero", "one", "two"), "a photo of a {}.", seed=0, pseudo=pseudo, progress=False
    )
    sections = {"prompt": PromptConfig(n_ctx=2, k=2, m=2), "loss": LossConfig(), "train": cfg}
    return build_method(method, env, sections)


def _mixup(train, train_labels, val, val_labels, calls=None):
    def build(feats, labels, which):
        if calls is not None:
            calls.append(which)
        return MixupUnknowns(feats, labels)

    return PseudoSources(
        "mixup",
        lambda: build(train, train_labels, "train"),
        lambda: build(val, val_labels, "val"),
    )


def test_training_lowers_the_loss_and_same_seed_gives_same_weights(backbone):
    feats, labels = synthetic()
    runs = []
    for _ in range(2):
        t = _trainer(backbone, "seeclip", _mixup(feats, labels, feats, labels), epochs=4)
        t.fit(feats, labels, feats, labels)
        runs.append(t)
    losses = [e["total"] for e in runs[0].log.losses]
    assert losses[-1] < losses[0]
    a, b = runs[0].state(), runs[1].state()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not any(k.startswith("backbone.") for k in a)


def test_epoch_records_hold_each_terms_gradient_share_and_the_repulsion_activity(backbone):
    from seeclip.trainer import term_gradient_norms

    feats, labels = synthetic()
    t = _trainer(backbone, "seeclip", _mixup(feats, labels, feats, labels), epochs=2)
    t.fit(feats, labels, feats, labels)
    records = t.history()
    for r in records:
        shares = [r[f"grad_share_{k}"] for k in ("ali", "rep", "coh", "reg")]
        # records round each share to 6 decimals: their sum is 1 within 4 x 0.5e-6
        assert sum(shares) == pytest.approx(1.0, abs=2e-6) and all(0 <= x <= 1 for x in shares)
        assert 0 <= r["rep_active"] <= 1 and -1 <= r["cos_uy"] <= 1
        assert r["grad_norm_ali"] > 0 and {"loss_ali", "loss_rep", "loss_reg"} <= set(r)
        assert "loss_rep_active" not in r  # diagnostics are not loss terms
    # the norms are those of the weighted terms, by hand on two parameters
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    terms = {"a": (w**2).sum(), "b": w.sum(), "c": w.detach().sum()}
    norms = term_gradient_norms(terms, {"a": 1.0, "b": 3.0, "c": 1.0, "d": 1.0}, [w])
    assert norms["a"] == pytest.approx(math.sqrt(2**2 + 4**2))
    assert norms["b"] == pytest.approx(3 * math.sqrt(2)) and norms["c"] == norms["d"] == 0.0
    coop = _trainer(backbone, "coop", epochs=1)
    coop.fit(feats, labels, feats, labels)
    assert coop.history()[0]["grad_share_ali"] == 1.0


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


def test_val_acc_selection_keeps_the_best_closed_set_source_val_epoch(backbone):
    feats, labels = synthetic()
    t = _trainer(backbone, "seeclip", _mixup(feats, labels, feats, labels), selection="val_acc")
    t.fit(feats, labels, feats, labels)
    accs = [v["closed_acc"] for v in t.log.val]
    assert t.log.selected_epoch == int(np.argmax(accs)) + 1
    closed = t.predict(feats).y_pred_closed  # rejection plays no part in val_acc
    assert np.mean(closed == labels.numpy()) == pytest.approx(max(accs))
    records = t.history()
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert [r["selected"] for r in records].count(True) == 1
    assert records[t.log.selected_epoch - 1]["val_closed_acc"] == pytest.approx(max(accs))
    assert all(r["kind"] == "epoch" and "loss_total" in r for r in records)


def test_val_h_scores_pseudo_unknowns_from_the_validation_source_only(backbone):
    train, train_labels = synthetic(seed=0)
    val, val_labels = synthetic(n_per=4, seed=1)
    e0 = torch.zeros(64)
    e0[0] = 1.0  # validation features sit near e0, training features do not
    val_g = torch.nn.functional.normalize(val.global_.float() + 3 * e0, dim=-1).half()
    val = Features(val_g, val.tokens, val.domains)
    assert (train.global_.float() @ e0).abs().max() < 0.5
    calls = []
    t = _trainer(
        backbone,
        "seeclip",
        _mixup(train, train_labels, val, val_labels, calls),
        selection="val_h",
        epochs=2,
    )
    t.fit(train, train_labels, val, val_labels)
    assert sorted(calls) == ["train", "val"]  # one source each, the held-out one from val
    g, _ = t._val_pseudo(val)
    assert len(g) == len(val) // 2 and (g @ e0).min() > 0.5  # mixes of validation images only
    crit = t.log.val[-1]
    h = 2 * crit["acc_known"] * crit["acc_unknown"] / (crit["acc_known"] + crit["acc_unknown"])
    assert crit["h_score"] == pytest.approx(h)


def test_prediction_takes_no_label_and_bad_options_fail_early(backbone):
    assert list(inspect.signature(PromptTrainer.predict).parameters) == ["self", "images"]
    with pytest.raises(ValueError, match="selection=val_h .* has none"):
        _trainer(backbone, selection="val_h")
    with pytest.raises(ConfigError, match="train.selection: expected one of last, val_acc"):
        _trainer(backbone, selection="best")
    with pytest.raises(ConfigError, match="train.pseudo_unknowns: expected one of none, mixup"):
        _trainer(backbone, pseudo_unknowns="gan")


def test_no_source_validation_images_is_an_error_that_names_the_fix(backbone):
    feats, labels = synthetic()
    empty = Features(feats.global_[:0], feats.tokens[:0], ())
    cases = [("coop", {}, "its threshold"), ("seeclip", {"selection": "val_acc"}, "val_acc")]
    for method, train, needs in cases:
        trainer = _trainer(backbone, method, **train)
        with pytest.raises(ValueError, match=f"{needs} needs source-validation.*val_fraction"):
            trainer.fit(feats, labels, empty, labels[:0])
    # the argmax over C+1 and the last epoch need no validation image
    trainer = _trainer(backbone, "seeclip", epochs=1)
    trainer.fit(feats, labels, empty, labels[:0])
    assert trainer.predict(feats).y_pred.shape == (len(feats),)
