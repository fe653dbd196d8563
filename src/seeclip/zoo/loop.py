"""The zoo's one resumable training loop: stages of optimiser steps, checkpointed as one file.

Both pretrainings run on it: tiny CLIP (a contrastive stage, then an optional token stage) and
tiny SD (a VAE stage, then a UNet stage). A :class:`Stage` says how to start (fresh, or from the
state it saved mid-stage), how to take step ``k``, what to save mid-stage and what to keep when
it ends (weights and statistics the later stages and the export read). :func:`run_stages` owns
everything else: the checkpoint file and its identity check, the global step count that
``stop_at`` reads, checkpoint timing, per-stage losses and seconds, progress bars and the global
torch RNG. Each stage draws its batches and noise from generators seeded by ``(seed, step)``,
so a run stopped anywhere and resumed ends bit for bit where an uninterrupted one does (CPU).
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from seeclip.io import load_checkpoint, write_with

__all__ = [
    "CHECKPOINT_FORMAT",
    "LoopState",
    "Stage",
    "batch_indices",
    "cosine_warmup",
    "run_stages",
]

CHECKPOINT_FORMAT = 2  # 1: the separate loops' files, before the zoo shared this one


def batch_indices(step: int, n: int, batch_size: int, seed: int) -> Tensor:
    """Indices of step ``step``: epochs are seeded permutations of the corpus, cycled."""
    start, stop = step * batch_size, (step + 1) * batch_size
    out = []
    while start < stop:
        epoch, offset = divmod(start, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 10007 + epoch))
        take = perm[offset : offset + stop - start]
        out.append(take)
        start += len(take)
    return torch.cat(out)


def cosine_warmup(step: int, warmup: int, total: int) -> float:
    """Learning-rate factor: linear warm-up over ``warmup`` steps, then cosine to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))


class Stage(ABC):
    """One stage of a pretraining. Subclasses set ``name`` and ``steps`` and implement:

    - :meth:`begin`: build the optimiser; ``live`` is what :meth:`state` returned when the run
      stopped inside this stage (None: the stage starts fresh), ``kept`` what the earlier
      stages' :meth:`end` returned, by stage name;
    - :meth:`step`: optimiser step ``k`` (0-based within the stage); returns the loss and the
      progress bar's postfix;
    - :meth:`state`: what resuming inside the stage needs (state dicts, tensors, plain data);
    - :meth:`end`: after the last step, what later stages and the export need (copied, since
      training goes on after it).
    """

    name: str = "stage"
    steps: int = 0

    @abstractmethod
    def begin(self, live: dict | None, kept: dict[str, dict]) -> None: ...

    @abstractmethod
    def step(self, k: int) -> tuple[float, dict[str, str]]: ...

    @abstractmethod
    def state(self) -> dict: ...

    def end(self) -> dict:
        return {}


@dataclass
class LoopState:
    """Where a run is: ``stage`` (a stage's name, or "done"), ``step`` (global, counting every
    stage's steps, skipped ones included), and per stage its losses, seconds and kept state."""

    stage: str
    step: int
    losses: dict[str, list[float]] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    kept: dict[str, dict] = field(default_factory=dict)

    @property
    def done(self) -> bool:
        return self.stage == "done"


def run_stages(
    stages: Sequence[Stage],
    checkpoint: Path,
    identity: dict,
    *,
    skipped: int = 0,
    stop_at: int | None = None,
    checkpoint_every: int = 500,
    progress: bool = True,
    desc: str = "pretrain",
) -> LoopState:
    """Run ``stages`` in order from where ``checkpoint`` left them, or from the start.

    Args:
        stages: the stages; their names are unique.
        checkpoint: the resume file (``last.pt``), written atomically; read with
            ``weights_only`` (a crafted file cannot run code).
        identity: what must match for a checkpoint to be resumed (the recipe, the data, the
            initial weights); runtime settings (threads, checkpoint interval) stay out of it.
        skipped: steps done before the first stage (a stage started from a file); they count
            towards ``stop_at`` and the returned step.
        stop_at: stop after this many global steps, checkpointed, as if interrupted.
        checkpoint_every: global steps between checkpoints (stage ends and stops always write).
        progress: a tqdm bar per stage.
        desc: the bars' prefix.
    """
    names = [s.name for s in stages]
    if len(set(names)) != len(names) or "done" in names:
        raise ValueError(f"stage names must be unique and not 'done', got {names}")
    offsets = [skipped + sum(s.steps for s in stages[:i]) for i in range(len(stages))]
    total = skipped + sum(s.steps for s in stages)
    end = total if stop_at is None else min(stop_at, total)
    state, live, rng = _load(checkpoint, identity, names)
    if state is None:
        state = LoopState(names[0] if names else "done", skipped)
        state.losses = {n: [] for n in names}
        state.seconds = {n: 0.0 for n in names}

    def save(live_state: dict | None) -> None:
        blob = {
            "format": CHECKPOINT_FORMAT,
            "identity": identity,
            "stage": state.stage,
            "step": state.step,
            "losses": state.losses,
            "seconds": state.seconds,
            "kept": state.kept,
            "live": live_state,
            "torch_rng": torch.get_rng_state(),
        }
        write_with(checkpoint, lambda tmp: torch.save(blob, tmp))

    for i, stage in enumerate(stages):
        if state.done or names.index(state.stage) > i:
            continue
        if state.step >= end:
            break
        k = state.step - offsets[i]
        if live is None:  # a fresh stage: the RNG as it was when the previous one ended
            if rng is not None:
                torch.set_rng_state(rng)
            stage.begin(None, state.kept)
        else:  # inside the stage: the RNG as it was at the stop
            stage.begin(live, state.kept)
            torch.set_rng_state(rng)
        live = rng = None
        bar = _bar(progress, stage.steps, k, f"{desc} {stage.name}")
        while k < stage.steps and state.step < end:
            t0 = time.perf_counter()
            loss, postfix = stage.step(k)
            k += 1
            state.step += 1
            state.losses[stage.name].append(loss)
            state.seconds[stage.name] += time.perf_counter() - t0
            if bar is not None:
                bar.update(1)
                bar.set_postfix(**postfix)
            if k < stage.steps and (state.step % checkpoint_every == 0 or state.step == end):
                save(stage.state())
        if bar is not None:
            bar.close()
        if k < stage.steps:
            break
        state.kept[stage.name] = stage.end()
        state.stage = names[i + 1] if i + 1 < len(stages) else "done"
        save(None)
    return state


def _load(
    checkpoint: Path, identity: dict, names: list[str]
) -> tuple[LoopState | None, dict | None, Tensor | None]:
    if not checkpoint.exists():
        return None, None, None
    blob = load_checkpoint(checkpoint)
    if not isinstance(blob, dict) or blob.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(
            f"{checkpoint} was written by an earlier seeclip (another checkpoint format); "
            "finish it with that version or use a new --out"
        )
    if blob["identity"] != identity:
        raise ValueError(
            f"{checkpoint} was written with another config, corpus, CLIP or --init; use a new --out"
        )
    if blob["stage"] != "done" and blob["stage"] not in names:
        raise ValueError(f"{checkpoint}: unknown stage {blob['stage']!r}; use a new --out")
    state = LoopState(blob["stage"], blob["step"], blob["losses"], blob["seconds"], blob["kept"])
    return state, blob["live"], blob["torch_rng"]


def _bar(progress: bool, total: int, initial: int, desc: str):
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step")
