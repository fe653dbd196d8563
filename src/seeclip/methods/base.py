"""The two-call interface every method implements: ``fit`` on source data, ``predict`` on images.

``predict`` never sees a label: it is the only path used on the target domain.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from seeclip.features import Features, Prediction, PseudoSources


class Method(Protocol):
    num_known: int

    def fit(
        self,
        train: Features,
        train_labels: torch.Tensor,
        val: Features,
        val_labels: torch.Tensor,
        *,
        checkpoint: Path | None = None,
        checkpoint_every: int = 1,
    ) -> None:
        """Learn from labelled source images; calibrate on source validation only. A method
        that trains writes its whole state to ``checkpoint`` every ``checkpoint_every`` epochs
        and resumes from it when it exists."""

    def predict(self, images: Features) -> Prediction:
        """Classify images into C known classes or unknown (index C). Takes no label."""

    def state(self) -> dict[str, torch.Tensor]:
        """What fitting produced (learnable parameters, thresholds): saved as safetensors."""

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`state` returned."""

    def history(self) -> list[dict]:
        """Per-epoch records of the last fit (loss terms, source-val criteria); [] if none."""


@dataclass(frozen=True)
class MethodEnv:
    """What every method factory gets besides its own config sections: the frozen CLIP side.

    A factory is ``build(env, *, <section>: <SectionConfig>, ...)``: it names the run-config
    sections it needs as keyword arguments (e.g. ``prompt: PromptConfig``), and the runner
    passes exactly those. Nothing else of the run config reaches a method.
    """

    backbone: Any  # seeclip.backbone.Backbone
    class_texts: tuple[str, ...]  # prompt text of each known class, in label order
    template: str  # the benchmark's default prompt template with one {}
    seed: int = 0  # seeds the method's initial weights and training
    pseudo: PseudoSources | None = None  # pseudo-unknown sources the runner built (learners)
    progress: bool = True  # show progress bars while fitting
