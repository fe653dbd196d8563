"""CoOp (Zhou et al., IJCV 2022): one learned context shared by every class prompt.

- **Model**: ``[SOS][v_1..v_n] <class> .`` with n = ``prompt.n_ctx`` learned vectors; the C
  text features are the same for every image, so they are encoded once per forward.
- **Loss**: cross-entropy over the C known classes (:func:`seeclip.losses.alignment_terms`).
- **What decides unknown**: :data:`RULE`, max-softmax confidence below the
  ``prompt.threshold_quantile`` quantile of source-validation confidences.
- **Config sections**: ``prompt`` (n_ctx, threshold_quantile, text_precision) and ``train``.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from seeclip.config import TrainConfig
from seeclip.features import PromptOutput
from seeclip.losses import alignment_terms
from seeclip.methods.base import MethodEnv
from seeclip.methods.prompt_model import (
    PromptConfig,
    PromptModel,
    learner,
    normal_parameter,
    seeded,
)
from seeclip.methods.prompts import PromptTemplate, encode_prompts
from seeclip.methods.scoring import MaxSoftmaxThreshold
from seeclip.trainer import PromptTrainer

__all__ = ["CoOpModel", "build"]


class CoOpModel(PromptModel):
    """CoOp (Zhou et al., IJCV'22): a shared learned context ``[SOS][v_1..v_n] <class> .``.

    With ``unknown_prompt`` a (C + 1)-th prompt ``[SOS][u_1..u_m] unknown .`` with its own
    vectors is added (the ``coop_unknown`` baseline). The P text features are the same for
    every image, so they are encoded once per forward and broadcast.
    """

    def __init__(
        self,
        backbone,
        class_texts: Sequence[str],
        *,
        n_ctx: int = 4,
        unknown_prompt: bool = False,
        m: int = 4,
        unknown_word: str = "unknown",
        text_precision: str = "fp32",
    ) -> None:
        super().__init__(backbone, len(class_texts), unknown_prompt, text_precision)
        w = backbone.text_width
        self.ctx = normal_parameter(n_ctx, w)
        self.known_prompts = PromptTemplate(backbone, class_texts, n_ctx)
        self.unknown_ctx = normal_parameter(m, w) if unknown_prompt else None
        self.unknown_prompt = (
            PromptTemplate(backbone, [unknown_word], m) if unknown_prompt else None
        )
        self.to(backbone.device)

    def text_features(self) -> Tensor:
        """[P, d] text features (not normalised), shared by all images."""
        groups, eots = [self.known_prompts.assemble(self.ctx)], [self.known_prompts.eot_index]
        if self.unknown_prompt is not None:
            groups.append(self.unknown_prompt.assemble(self.unknown_ctx))
            eots.append(self.unknown_prompt.eot_index)
        return encode_prompts(self.backbone, groups, eots, autocast=self.text_autocast)

    def forward(self, global_: Tensor, tokens: Tensor) -> PromptOutput:
        return self._output(global_, self.text_features())


def build(env: MethodEnv, *, prompt: PromptConfig, train: TrainConfig) -> PromptTrainer:
    """CoOp: shared learned context, unknown by max-softmax threshold on source val."""
    model = seeded(
        env.seed,
        lambda: CoOpModel(
            env.backbone,
            env.class_texts,
            n_ctx=prompt.n_ctx,
            text_precision=prompt.text_precision,
        ),
    )
    rule = MaxSoftmaxThreshold(prompt.threshold_quantile)
    return learner(env, model, alignment_terms, rule, prompt=prompt, train=train)
