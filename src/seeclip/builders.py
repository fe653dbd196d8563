"""Every method the runner can build: name -> ``factory(env, *, <sections>)``.

A factory names the run-config sections it needs as keyword-only arguments, typed with their
section classes (``prompt: PromptConfig``); :func:`build_method` passes exactly those, so no
method sees the whole run config. The registry is filled here, where it is defined.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import torch

from seeclip.config import LossConfig, PromptConfig, TrainConfig
from seeclip.losses import alignment_terms, seeclip_loss, seeclip_weights
from seeclip.methods.base import Method, MethodEnv
from seeclip.methods.models import CoCoOpModel, CoOpModel, PromptModel, SeeCLIPModel
from seeclip.methods.zeroshot import build_zeroshot
from seeclip.registry import Registry
from seeclip.selection import get_selection
from seeclip.trainer import PromptTrainer

MethodFactory = Callable[..., Method]
METHODS: Registry[MethodFactory] = Registry("method")


def seeclip_terms(out, labels, *, model: PromptModel, loss: LossConfig):
    """SeeCLIP's objective with the weights of the ``loss`` section and the model's F_key."""
    return seeclip_loss(
        out,
        labels,
        alpha=loss.alpha,
        beta=loss.beta,
        gamma=loss.gamma,
        margin=loss.margin,
        reg_reduction=loss.reg_reduction,
        f_key_weights=model.f_key_weights(),
    )


def _seeded(seed: int, build):
    """Build a model with its initial weights drawn from ``seed`` (global RNG untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _trainer(
    env: MethodEnv,
    model: PromptModel,
    loss_fn,
    *,
    prompt: PromptConfig,
    train: TrainConfig,
    term_weights: Mapping[str, float] | None = None,
) -> PromptTrainer:
    model.text_autocast = torch.bfloat16 if prompt.text_precision == "bf16" else None
    return PromptTrainer(
        model,
        loss_fn,
        term_weights=term_weights,
        train=train,
        selection=get_selection(train.selection),
        pseudo=env.pseudo,
        threshold_quantile=prompt.threshold_quantile,
        seed=env.seed,
        progress=env.progress,
    )


def build_seeclip(
    env: MethodEnv, *, prompt: PromptConfig, loss: LossConfig, train: TrainConfig
) -> PromptTrainer:
    """SeeCLIP: semantic tokens + domain token in known prompts, learned unknown prompt."""
    model = _seeded(
        env.seed,
        lambda: SeeCLIPModel(
            env.backbone,
            env.class_texts,
            k=prompt.k,
            m=prompt.m,
            semantic_tokens=prompt.semantic_tokens,
        ),
    )
    loss_fn = partial(seeclip_terms, model=model, loss=loss)
    weights = seeclip_weights(alpha=loss.alpha, beta=loss.beta, gamma=loss.gamma)
    return _trainer(env, model, loss_fn, prompt=prompt, train=train, term_weights=weights)


def build_coop(env: MethodEnv, *, prompt: PromptConfig, train: TrainConfig) -> PromptTrainer:
    """CoOp: shared learned context, unknown by max-softmax threshold on source val."""
    model = _seeded(env.seed, lambda: CoOpModel(env.backbone, env.class_texts, n_ctx=prompt.n_ctx))
    return _trainer(env, model, alignment_terms, prompt=prompt, train=train)


def build_coop_unknown(
    env: MethodEnv, *, prompt: PromptConfig, train: TrainConfig
) -> PromptTrainer:
    """CoOp plus a learned (C+1)-th "unknown" prompt trained on pseudo-unknowns."""
    model = _seeded(
        env.seed,
        lambda: CoOpModel(
            env.backbone, env.class_texts, n_ctx=prompt.n_ctx, unknown_prompt=True, m=prompt.m
        ),
    )
    return _trainer(env, model, alignment_terms, prompt=prompt, train=train)


def build_cocoop(env: MethodEnv, *, prompt: PromptConfig, train: TrainConfig) -> PromptTrainer:
    """CoCoOp: instance-conditional context, unknown by max-softmax threshold on source val."""
    model = _seeded(
        env.seed, lambda: CoCoOpModel(env.backbone, env.class_texts, n_ctx=prompt.n_ctx)
    )
    return _trainer(env, model, alignment_terms, prompt=prompt, train=train)


for _name, _factory in (
    ("zeroshot", build_zeroshot),
    ("coop", build_coop),
    ("coop_unknown", build_coop_unknown),
    ("cocoop", build_cocoop),
    ("seeclip", build_seeclip),
):
    METHODS.add(_name, _factory)


def sections_of(factory: MethodFactory) -> tuple[str, ...]:
    """The run-config sections a factory takes (its keyword-only parameters)."""
    params = inspect.signature(factory).parameters.values()
    return tuple(p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY)


def build_method(name: str, env: MethodEnv, sections: Mapping[str, Any]) -> Method:
    """Build method ``name`` with the sections its factory asks for, taken from ``sections``."""
    factory = METHODS.get(name)
    missing = [s for s in sections_of(factory) if s not in sections]
    if missing:
        raise KeyError(f"method {name!r} needs config section(s) {', '.join(missing)}")
    return factory(env, **{s: sections[s] for s in sections_of(factory)})


__all__ = ["METHODS", "MethodFactory", "build_method", "sections_of", "seeclip_terms"]
