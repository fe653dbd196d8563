import numpy as np
import pytest
import torch

from seeclip.methods import Features
from seeclip.methods.zeroshot import ZeroShot


def feats(vectors):
    g = torch.nn.functional.normalize(torch.tensor(vectors, dtype=torch.float32), dim=-1)
    return Features(g, torch.zeros(len(vectors), 1, g.shape[1]), ("d",) * len(vectors))


TEXT = torch.eye(3)  # three known classes along the axes


def test_threshold_is_a_source_val_quantile_and_rejects_low_confidence():
    zs = ZeroShot(TEXT, logit_scale=10.0, threshold_quantile=0.5)
    val = feats([[1, 0, 0], [0, 1, 0], [1, 1, 0], [1, 1, 1]])  # confidences high, high, mid, low
    zs.fit(val, torch.zeros(4), val, torch.zeros(4))
    conf = (10 * val.global_ @ TEXT.T).softmax(-1).max(-1).values
    assert zs.threshold == pytest.approx(float(torch.quantile(conf, 0.5)))

    pred = zs.predict(feats([[0, 0, 1], [1, 1, 1]]))
    np.testing.assert_array_equal(pred.y_pred, [2, 3])  # confident -> class 2; uniform -> unknown
    np.testing.assert_array_equal(pred.y_pred_closed, [2, 0])
    assert pred.unknown_score[1] == pytest.approx(2 / 3, abs=1e-6)  # 1 - max softmax (uniform)


def test_mcm_uses_cosines_over_temperature():
    zs = ZeroShot(TEXT, logit_scale=100.0, score="mcm", mcm_temperature=1.0, threshold_quantile=0)
    x = feats([[1, 0, 0]])
    zs.fit(x, torch.zeros(1), x, torch.zeros(1))
    expected = 1 - torch.tensor([1.0, 0.0, 0.0]).softmax(-1).max()
    assert zs.predict(x).unknown_score[0] == pytest.approx(float(expected), abs=1e-6)


def test_bad_options_and_order_of_calls():
    with pytest.raises(ValueError, match="unknown score 'energy'"):
        ZeroShot(TEXT, logit_scale=1.0, score="energy")
    with pytest.raises(ValueError, match="threshold_quantile"):
        ZeroShot(TEXT, logit_scale=1.0, threshold_quantile=1.5)
    with pytest.raises(RuntimeError, match="call fit"):
        ZeroShot(TEXT, logit_scale=1.0).predict(feats([[1, 0, 0]]))


def test_a_class_prompt_longer_than_the_context_is_refused_not_cut():
    from seeclip.backbone import build_backbone
    from seeclip.methods.base import MethodEnv
    from seeclip.methods.zeroshot import ZeroShotConfig, build

    backbone = build_backbone("tiny-vit")
    long = "very " * backbone.context_length + "long name"
    env = MethodEnv(backbone, ("cat", long), "a photo of a {}.")
    with pytest.raises(ValueError, match="class 'very very.*fills the text context.*classes_file"):
        build(env, zeroshot=ZeroShotConfig())
    build(MethodEnv(backbone, ("cat", "dog"), "a photo of a {}."), zeroshot=ZeroShotConfig())
