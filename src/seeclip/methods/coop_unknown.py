"""CoOp with an unknown prompt: the baseline that isolates what SeeCLIP's prompts and losses add.

- **Model**: CoOp's shared context for the C known prompts plus a (C+1)-th prompt
  ``[SOS][u_1..u_m] unknown .`` with its own m = ``prompt.m`` learned vectors
  (:class:`~seeclip.methods.coop.CoOpModel` with ``unknown_prompt=True``).
- **Loss**: cross-entropy over C + 1 classes, pseudo-unknowns labelled C
  (:func:`seeclip.losses.alignment_terms`).
- **What decides unknown**: :data:`RULE`, the argmax over the C + 1 prompts, as SeeCLIP.
- **Config sections**: ``prompt`` (n_ctx, m, text_precision) and ``train``.
"""

from __future__ import annotations

from seeclip.config import TrainConfig
from seeclip.losses import alignment_terms
from seeclip.methods.base import MethodEnv
from seeclip.methods.coop import CoOpModel
from seeclip.methods.prompt_model import PromptConfig, learner, seeded
from seeclip.methods.scoring import UnknownPromptArgmax
from seeclip.trainer import PromptTrainer

__all__ = ["RULE", "build"]

RULE = UnknownPromptArgmax()
PSEUDO_UNKNOWNS = True  # trains on train.pseudo_unknowns (its unknown prompt learns from them)


def build(env: MethodEnv, *, prompt: PromptConfig, train: TrainConfig) -> PromptTrainer:
    """CoOp plus a learned (C+1)-th "unknown" prompt trained on pseudo-unknowns."""
    model = seeded(
        env.seed,
        lambda: CoOpModel(
            env.backbone,
            env.class_texts,
            n_ctx=prompt.n_ctx,
            unknown_prompt=True,
            m=prompt.m,
            text_precision=prompt.text_precision,
        ),
    )
    return learner(env, model, alignment_terms, RULE, prompt=prompt, train=train)
