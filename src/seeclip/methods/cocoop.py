"""CoCoOp (Zhou et al., CVPR 2022): context conditioned on each image.

- **Model**: ``[SOS][v_1 + pi(x)..v_n + pi(x)] <class> .`` where pi is a small meta-net of the
  global image feature, so every image has its own C prompts.
- **Loss**: cross-entropy over the C known classes (:func:`seeclip.losses.alignment_terms`).
- **What decides unknown**: :data:`RULE`, max-softmax confidence below the
  ``prompt.threshold_quantile`` quantile of source-validation confidences.
- **Config sections**: ``prompt`` (n_ctx, threshold_quantile, text_precision, shared_prefix)
  and ``train``.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

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
from seeclip.methods.prompts import PromptTemplate
from seeclip.methods.scoring import MaxSoftmaxThreshold
from seeclip.trainer import PromptTrainer

__all__ = ["CoCoOpModel", "build"]


class CoCoOpModel(PromptModel):
    """CoCoOp (Zhou et al., CVPR'22): instance-conditional context v_i + pi(x).

    pi is the meta-net Linear(d, d // 16) - ReLU - Linear(d // 16, w) of the global image
    feature; prompts ``[SOS][v_1 + pi(x)..v_n + pi(x)] <class> .`` are built per image.
    """

    def __init__(
        self,
        backbone,
        class_texts: Sequence[str],
        *,
        n_ctx: int = 4,
        text_precision: str = "fp32",
        shared_prefix: bool = True,
    ) -> None:
        super().__init__(backbone, len(class_texts), False, text_precision)
        self.shared_prefix = shared_prefix  # [SOS][ctx(x)] once per image (exact)
        d, w = backbone.embed_dim, backbone.text_width
        hidden = max(1, d // 16)
        self.ctx = normal_parameter(n_ctx, w)
        self.meta_net = nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, w))
        self.known_prompts = PromptTemplate(backbone, class_texts, n_ctx)
        self.to(backbone.device)

    def forward(self, global_: Tensor, tokens: Tensor) -> PromptOutput:
        pi = self.meta_net(global_.to(self.ctx.dtype))  # [B, w]
        ctx = self.ctx.unsqueeze(0) + pi.unsqueeze(1)  # [B, n, w]
        text = self.known_prompts.encode(
            self.backbone,
            ctx,
            per_image=True,
            shared_prefix=self.shared_prefix,
            autocast=self.text_autocast,
        )
        return self._output(global_, text)


def build(env: MethodEnv, *, prompt: PromptConfig, train: TrainConfig) -> PromptTrainer:
    """CoCoOp: instance-conditional context, unknown by max-softmax threshold on source val."""
    model = seeded(
        env.seed,
        lambda: CoCoOpModel(
            env.backbone,
            env.class_texts,
            n_ctx=prompt.n_ctx,
            text_precision=prompt.text_precision,
            shared_prefix=prompt.shared_prefix,
        ),
    )
    rule = MaxSoftmaxThreshold(prompt.threshold_quantile)
    return learner(env, model, alignment_terms, rule, prompt=prompt, train=train)
