"""The tiny-digits card: the JSON record written next to the weights by ``seeclip pretrain-clip``.

A card holds the architecture (open_clip config, surgery, size), the recipe (command, seed, full
config), the data (corpus generator and what it used), the training statistics (steps, time,
throughput, losses, machine) and the zero-shot section (accuracies and class-name separation).
:mod:`seeclip.zoo.pretrain` measures; this module only assembles, writes and reads the record.
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from seeclip.io import write_json
from seeclip.zoo.tiny_clip import ARCH, SURGERY, TINY_DIGITS_CARD, model_config

__all__ = [
    "architecture_summary",
    "build_card",
    "data_summary",
    "load_card",
    "training_summary",
    "write_card",
    "zero_shot_section",
]

SURGERY_NOTE = (
    SURGERY + ": avgpools of layer3[0] and layer4[0] (main path and shortcut) removed; attention"
    " pool rebuilt for an (S/8)x(S/8) grid; {tokens} spatial tokens at {size} px"
)
_CORPUS_FIELDS = ("n", "seed", "version", "image_size", "domains", "fonts_used", "photos_used")


def load_card(path: Path | str = TINY_DIGITS_CARD) -> dict:
    """The JSON card shipped next to the weights (architecture, command, recipe, accuracy)."""
    return json.loads(Path(path).read_text())


def write_card(path: Path | str, card: Mapping) -> None:
    """Write ``card`` as JSON to ``path`` atomically."""
    write_json(path, dict(card), indent=1)


def architecture_summary(model: nn.Module, arch: str = ARCH) -> dict:
    """The open_clip config, the surgery applied to it, the parameter count, the weights' dtype."""
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    return {
        "open_clip_config": model_config(arch),
        "surgery": SURGERY_NOTE.format(tokens=(size // 8) ** 2, size=size),
        "parameters": sum(p.numel() for p in model.parameters()),
        "weights_dtype": "float16",
    }


def data_summary(corpus_meta: Mapping, world: str = "digits") -> dict:
    """What the corpus was (from its ``meta.json``): generator, size, seed, version, pools used."""
    generator = f"seeclip.datasets.{world}.generate_corpus"
    return {"generator": generator, **{k: corpus_meta.get(k) for k in _CORPUS_FIELDS}}


def training_summary(
    losses: Sequence[float],
    *,
    batch_size: int,
    train_seconds: float,
    logit_scale: float,
    num_threads: int,
) -> dict:
    """Steps, pairs, time and throughput, mean loss over the first and last steps, the machine.

    The loss means are over ``max(1, min(50, steps // 10))`` steps at each end.
    """
    n_tail = max(1, min(50, len(losses) // 10))
    pairs = len(losses) * batch_size
    return {
        "steps": len(losses),
        "pairs_seen": pairs,
        "train_seconds": round(train_seconds, 1),
        "pairs_per_second": round(pairs / max(train_seconds, 1e-9), 1),
        "loss_first": float(np.mean(losses[:n_tail])) if losses else None,
        "loss_last": float(np.mean(losses[-n_tail:])) if losses else None,
        "final_logit_scale": logit_scale,
        "machine": {
            "cpus": os.cpu_count(),
            "threads": num_threads,
            "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__,
        },
    }


def _accuracy_summary(acc: Mapping[str, float]) -> dict:
    return {"per_domain": dict(acc), "mean": float(np.mean(list(acc.values())))}


def zero_shot_section(
    *,
    benchmark: str,
    classnames: Sequence[str],
    templates: Sequence[str],
    primary_template: str,
    n_per_class: int,
    ensemble: Mapping[str, float],
    single_template: Mapping[str, float],
    random_init_ensemble: Mapping[str, float],
    classifier: Tensor,
) -> dict:
    """The card's zero-shot section from per-domain accuracies and the ensemble classifier.

    Args:
        benchmark: which benchmark tree was evaluated (generator and arguments).
        classnames, templates: the class names and prompt ensemble that were evaluated.
        primary_template: the template of ``single_template``.
        n_per_class: the benchmark's ``generate_benchmark(n_per_class=...)``.
        ensemble, single_template, random_init_ensemble: domain -> accuracy of the trained
            model (template ensemble, primary template) and of its random initialisation.
        classifier: the trained model's ensemble text classifier, [D, C] as returned by
            ``open_clip.build_zero_shot_classifier``; its off-diagonal class-class cosines
            say how distinct the class-name features are.
    """
    w = classifier.T.float()
    cos = w @ w.T
    off_diag = cos[~torch.eye(len(w), dtype=torch.bool, device=cos.device)]
    return {
        "benchmark": benchmark,
        "n_per_class": n_per_class,
        "classnames": list(classnames),
        "templates": list(templates),
        "ensemble": _accuracy_summary(ensemble),
        "single_template": {"template": primary_template, **_accuracy_summary(single_template)},
        "random_init_ensemble": _accuracy_summary(random_init_ensemble),
        "classname_text_cosine": {
            "max_off_diagonal": float(off_diag.max()),
            "mean_off_diagonal": float(off_diag.mean()),
        },
    }


def build_card(
    *,
    name: str = ARCH,
    world: str = "digits",
    model: nn.Module,
    config: Mapping,
    command: str | None,
    corpus_meta: Mapping,
    losses: Sequence[float],
    train_seconds: float,
    zero_shot: Mapping,
) -> dict:
    """The whole card of a finished run.

    Args:
        name: the tiny model's name (its open_clip config).
        world: the embedded world it was trained on.
        model: the trained CLIP.
        config: the run's ``PretrainConfig`` as a dict (``dataclasses.asdict``).
        command: the command line to record (None if unknown).
        corpus_meta: the corpus' ``meta.json``.
        losses: the loss of every step.
        train_seconds: time spent in training steps.
        zero_shot: the section made by :func:`zero_shot_section`.
    """
    return {
        "name": name,
        "architecture": architecture_summary(model, name),
        "command": command,
        "seed": config["seed"],
        "config": dict(config),
        "data": data_summary(corpus_meta, world),
        "training": training_summary(
            losses,
            batch_size=config["batch_size"],
            train_seconds=train_seconds,
            logit_scale=model.logit_scale.detach().exp().item(),
            num_threads=config["num_threads"],
        ),
        "zero_shot": dict(zero_shot),
    }
