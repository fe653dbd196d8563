import numpy as np
import pytest
import torch
import torch.nn.functional as F

from seeclip.generate.inspect import max_similarity, rejection_rate, similarity_report
from seeclip.methods import Features, Prediction


class AxisText:
    """encode_text: class i (the digits of "a {}" prompts) -> 2 * e_i (not normalised)."""

    def encode_text(self, texts):
        out = torch.zeros(len(texts), 4)
        for row, t in enumerate(texts):
            out[row, int(t.split()[-1])] = 2.0
        return out


def test_max_similarity_is_the_cosine_to_the_nearest_prototype():
    protos = torch.eye(3)
    g = torch.tensor([[1.0, 0.0, 0.0], [3.0, 4.0, 0.0], [-1.0, 0.0, 0.0]])
    torch.testing.assert_close(max_similarity(g, protos), torch.tensor([1.0, 0.8, 0.0]))


def test_similarity_report_numbers_and_figure(tmp_path):
    known = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]])  # cos 1 to their class
    unknown = torch.tensor([[0, 0, 0, 1.0]] * 3)  # orthogonal to every known class
    pseudo = F.normalize(torch.tensor([[1.0, 0, 0, 1.0], [0, 1.0, 0, 1.0]]), dim=-1)  # cos 0.707
    out = similarity_report(
        AxisText(),
        ["0", "1", "2"],
        "a {}",
        {"known": known, "unknown": unknown, "pseudo": pseudo},
        out_png=tmp_path / "figs" / "sim.png",
    )
    g = out["groups"]
    assert list(g) == ["known", "unknown", "pseudo"]
    assert g["known"]["n"] == 2 and g["known"]["mean"] == pytest.approx(1.0)
    assert g["unknown"]["mean"] == pytest.approx(0.0) and g["unknown"]["q95"] == pytest.approx(0.0)
    assert g["pseudo"]["q50"] == pytest.approx(2**-0.5)
    assert set(g["pseudo"]) == {"n", "mean", "std", "q05", "q25", "q50", "q75", "q95"}
    png = tmp_path / "figs" / "sim.png"
    assert out["png"] == str(png) and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="empty group"):
        similarity_report(AxisText(), ["0"], "a {}", {"x": known[:0]}, out_png=png)


class Threshold:
    """A stand-in method: rejects images whose first coordinate is negative."""

    num_known = 3

    def predict(self, images):
        y = np.where(images.global_[:, 0].numpy() < 0, self.num_known, 0)
        return Prediction(y, np.zeros_like(y), y.astype(float))


def test_rejection_rate_counts_predictions_of_class_c():
    g = torch.tensor([[-1.0, 0], [1.0, 0], [-0.5, 0.5], [0.2, 0.1]])
    pool = Features(g, torch.zeros(4, 2, 2), ("a",) * 4)
    assert rejection_rate(Threshold(), pool) == 0.5
    with pytest.raises(ValueError, match="at least one"):
        rejection_rate(Threshold(), Features(g[:0], torch.zeros(0, 2, 2), ()))
