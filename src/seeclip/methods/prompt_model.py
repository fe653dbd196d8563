"""What every prompt-learning method shares: the model base class and the learner factory.

A prompt model maps cached image features (global ``[B, d]``, spatial tokens ``[B, N, d]``)
to a :class:`~seeclip.features.PromptOutput`. The backbone is registered as a frozen submodule
(so ``.to(device)`` moves it) but never appears in :meth:`PromptModel.learnable_parameters`
nor in :meth:`PromptModel.state_dict_learnable`, and it stays in eval mode.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from seeclip.config import ConfigError, TrainConfig, check_choices, check_min, check_unit
from seeclip.features import PromptOutput
from seeclip.methods.base import MethodEnv
from seeclip.methods.scoring import DecisionRule
from seeclip.selection import get_selection
from seeclip.trainer import LossFn, PromptTrainer

__all__ = ["PromptConfig", "PromptModel", "PromptOutput", "learner", "normal_parameter", "seeded"]

_BACKBONE = "backbone."
# prompt.text_precision -> the autocast dtype of the frozen text tower while prompts train
TEXT_PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class PromptConfig:
    n_ctx: int = 4  # learned context vectors per prompt (CoOp, CoCoOp)
    k: int = 4  # SeeCLIP semantic tokens (queries over patch tokens); paper's best of 2..8
    m: int = 4  # learnable vectors of the "unknown" prompt
    semantic_tokens: bool = True  # False = ablation: plain learned context instead
    threshold_quantile: float = 0.05  # methods without an unknown prompt: MSP threshold on val
    # the frozen text tower's arithmetic while training prompts: fp32 | bf16 (torch.autocast;
    # error and speed in docs/performance.md)
    text_precision: Literal["fp32", "bf16"] = "fp32"
    # per-image prompts (SeeCLIP, CoCoOp): run each image's [SOS][context] prefix once and the
    # class texts against its cached keys/values (exact; methods/shared_prefix.py); false = the
    # full path, every prompt through the whole text tower
    shared_prefix: bool = True

    def __post_init__(self) -> None:
        check_choices(self, "prompt")
        if not isinstance(self.shared_prefix, bool):
            raise ConfigError(
                f"prompt.shared_prefix must be true or false, got {self.shared_prefix!r}"
            )
        for name in ("n_ctx", "k", "m"):
            check_min(f"prompt.{name}", getattr(self, name), 1)
        check_unit("prompt.threshold_quantile", self.threshold_quantile)


def normal_parameter(*shape: int) -> nn.Parameter:
    """A learnable tensor drawn from N(0, 0.02), as CoOp and SeeCLIP initialise context."""
    return nn.Parameter(torch.randn(*shape) * 0.02)


def seeded(seed: int, build: Callable[[], nn.Module]) -> nn.Module:
    """Build a model with its initial weights drawn from ``seed`` (global RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def learner(
    env: MethodEnv,
    model: PromptModel,
    loss_fn: LossFn,
    rule: DecisionRule,
    *,
    prompt: PromptConfig,
    train: TrainConfig,
    term_weights: Mapping[str, float] | None = None,
) -> PromptTrainer:
    """``model`` trained on ``loss_fn`` by the shared loop and decided by ``rule``: a method."""
    return PromptTrainer(
        model,
        loss_fn,
        rule=rule,
        term_weights=term_weights,
        train=train,
        selection=get_selection(train.selection),
        pseudo=env.pseudo,
        seed=env.seed,
        progress=env.progress,
    )


class PromptModel(nn.Module):
    """Shared plumbing: the frozen backbone, logits, learnable parameters and their state.

    Subclasses define ``forward(global_, tokens) -> PromptOutput``. Learnable parameters are
    created on the backbone's device.
    """

    num_known: int
    has_unknown_prompt: bool
    # learned queries over the patch tokens (SeeCLIP's), read through semantic_summaries(tokens)
    has_semantic_queries: bool = False

    def __init__(
        self, backbone, num_known: int, has_unknown_prompt: bool, text_precision: str = "fp32"
    ) -> None:
        super().__init__()
        backbone.requires_grad_(False)
        self.backbone = backbone.eval()
        self.num_known = num_known
        self.has_unknown_prompt = has_unknown_prompt
        self.logit_scale = backbone.logit_scale  # tau, a frozen float
        # dtype of torch.autocast around the frozen text tower (None: full precision)
        if text_precision not in TEXT_PRECISIONS:
            raise ValueError(f"text_precision must be one of {', '.join(TEXT_PRECISIONS)}")
        self.text_autocast: torch.dtype | None = TEXT_PRECISIONS[text_precision]

    def train(self, mode: bool = True) -> PromptModel:
        """Switches the learnable parts; the frozen backbone stays in eval mode."""
        super().train(mode)
        self.backbone.eval()
        return self

    def _output(self, global_: Tensor, text: Tensor) -> PromptOutput:
        """z_c = tau * cos(F(x), t_c(x)) (docs/method.md, Model); text is [P, d] or [B, P, d]."""
        text = F.normalize(text, dim=-1)
        g = F.normalize(global_.to(text.dtype), dim=-1)
        if text.dim() == 2:
            logits = g @ text.T
            text = text.expand(g.shape[0], *text.shape)
        else:
            logits = torch.einsum("bd,bpd->bp", g, text)
        return PromptOutput(self.logit_scale * logits, text)

    def named_learnable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.named_parameters() if not n.startswith(_BACKBONE)]

    def learnable_parameters(self) -> list[nn.Parameter]:
        """Every parameter except the frozen backbone's (what the optimiser gets)."""
        return [p for _, p in self.named_learnable_parameters()]

    def state_dict_learnable(self) -> dict[str, Tensor]:
        """The learnable parameters only (checkpoints never hold the backbone)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith(_BACKBONE)}

    def load_state_dict_learnable(self, state: Mapping[str, Tensor]) -> None:
        """Loads :meth:`state_dict_learnable` output; every learnable key must be present."""
        own = set(self.state_dict_learnable())
        missing, unexpected = sorted(own - set(state)), sorted(set(state) - own)
        if missing or unexpected:
            raise KeyError(f"learnable state mismatch: missing {missing}, unexpected {unexpected}")
        self.load_state_dict(dict(state), strict=False)

    def f_key_weights(self) -> list[Tensor]:
        """Weights that L_reg penalises (none for the baselines)."""
        return []
