"""Zero-shot CLIP (Radford et al. 2021) with a confidence threshold chosen on source validation.

- **Model**: the frozen CLIP's text features of the class-name prompts; nothing is trained.
- **Score**: max softmax probability of CLIP's scaled logits (``msp``) or of cosines over a
  temperature (``mcm``, Ming et al. 2022).
- **What decides unknown**: :class:`~seeclip.methods.scoring.MaxSoftmaxThreshold`, the
  ``zeroshot.threshold_quantile`` quantile of source-validation confidences.
- **Config section**: ``zeroshot`` (score, mcm_temperature, threshold_quantile, template).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import open_clip
import torch

from seeclip.config import ConfigError, check_choices, check_unit
from seeclip.methods.base import Features, MethodEnv, Prediction
from seeclip.methods.scoring import MaxSoftmaxThreshold


@dataclass(frozen=True)
class ZeroShotConfig:
    score: Literal["msp", "mcm"] = "msp"  # msp (max softmax prob.) | mcm (max concept matching)
    mcm_temperature: float = 1.0  # softmax temperature on cosines for mcm (Ming et al. 2022)
    threshold_quantile: float = 0.05  # share of source-val known images allowed to be rejected
    template: str | None = None  # prompt template with one {}; None = the benchmark's

    def __post_init__(self) -> None:
        check_choices(self, "zeroshot")
        check_unit("zeroshot.threshold_quantile", self.threshold_quantile)
        if self.mcm_temperature <= 0:
            raise ConfigError(f"zeroshot.mcm_temperature must be > 0, got {self.mcm_temperature}")
        if self.template is not None and self.template.count("{}") != 1:
            raise ConfigError(f"zeroshot.template needs exactly one {{}}, got {self.template!r}")


SCORES = ("msp", "mcm")


class ZeroShot:
    """Class-name prompts; an image is "unknown" when its confidence is below a threshold.

    Confidence is the maximum softmax probability over the C known classes, either of CLIP's
    scaled logits (``msp``) or of cosines divided by a temperature (``mcm``, Ming et al. 2022).
    The threshold is the ``threshold_quantile`` quantile of source-validation confidences,
    so about that share of known source images would be rejected. The target is never used.
    """

    def __init__(
        self,
        text_features: torch.Tensor,
        *,
        logit_scale: float,
        score: str = "msp",
        mcm_temperature: float = 1.0,
        threshold_quantile: float = 0.05,
    ) -> None:
        if score not in SCORES:
            raise ValueError(f"unknown score {score!r}; choose one of {', '.join(SCORES)}")
        self.rule = MaxSoftmaxThreshold(threshold_quantile)  # checks the quantile
        self.text_features = torch.nn.functional.normalize(text_features.float(), dim=-1)
        self.num_known = text_features.shape[0]
        self.scale = logit_scale if score == "msp" else 1.0 / mcm_temperature
        self.threshold_quantile = threshold_quantile
        self.threshold: float | None = None

    def _confidence(self, images: Features) -> tuple[torch.Tensor, torch.Tensor]:
        cos = images.global_.float() @ self.text_features.T
        conf, closed = (self.scale * cos).softmax(dim=-1).max(dim=-1)
        return closed, conf

    def fit(
        self,
        train: Features,
        train_labels: torch.Tensor,
        val: Features,
        val_labels: torch.Tensor,
        *,
        checkpoint=None,
        checkpoint_every: int = 1,
    ) -> None:
        """Chooses the threshold on source validation (nothing to checkpoint)."""
        if len(val) == 0:
            raise ValueError(
                "zeroshot needs source-validation images to choose its threshold and this split "
                "has none: raise data.val_fraction or prepare more images per class"
            )
        _, conf = self._confidence(val)
        self.threshold = self.rule.threshold(conf)

    def state(self) -> dict[str, torch.Tensor]:
        return {"__threshold__": torch.tensor(self.threshold, dtype=torch.float64)}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self.threshold = float(state["__threshold__"])

    def history(self) -> list[dict]:
        return []  # nothing is trained

    @torch.no_grad()
    def predict(self, images: Features) -> Prediction:
        if self.threshold is None:
            raise RuntimeError("call fit() before predict(): the threshold comes from source val")
        closed, conf = self._confidence(images)
        scored = (closed.numpy(), closed.numpy(), (1.0 - conf).numpy())
        y_pred = self.rule.decide(scored, conf.numpy(), self.threshold, self.num_known)
        return Prediction(y_pred, scored[1], scored[2])


def build(env: MethodEnv, *, zeroshot: ZeroShotConfig) -> ZeroShot:
    """Zero-shot CLIP, max-softmax (or MCM) unknown score, threshold from source val."""
    template = zeroshot.template or env.template
    prompts = [template.format(c) for c in env.class_texts]
    ids = env.backbone.tokenize(prompts)
    ends = env.backbone.eot_index(ids).tolist()
    cut = [c for c, eot in zip(env.class_texts, ends, strict=True) if eot >= ids.shape[1] - 1]
    if cut:  # open_clip's tokenizer would cut them silently at the context length
        raise ValueError(
            f"zeroshot: the prompt of class {cut[0]!r} fills the text context ({ids.shape[1]} "
            f"tokens) and would be cut; shorten that class text (data.classes_file) or the "
            f"template (zeroshot.template)"
        )
    weights = open_clip.build_zero_shot_classifier(  # [d, C]
        env.backbone.model,
        env.backbone.tokenizer,
        classnames=env.class_texts,
        templates=(template,),
        device=env.backbone.device,
    )
    return ZeroShot(
        weights.T.cpu(),
        logit_scale=env.backbone.logit_scale,
        score=zeroshot.score,
        mcm_temperature=zeroshot.mcm_temperature,
        threshold_quantile=zeroshot.threshold_quantile,
    )


__all__ = ["ZeroShotConfig", "ZeroShot", "build"]
