"""``seeclip pretrain-clip``: contrastive pretraining of a tiny CLIP on an embedded world, on CPU.

Standard CLIP recipe: symmetric InfoNCE with a learnable temperature, AdamW, cosine schedule with
linear warm-up, cheap batched tensor augmentation (small affine + brightness/contrast; no flips,
these are characters). Data come from the world's captioned corpus (fonts, photos and writers
disjoint from its benchmark): ``digits`` trains tiny-digits, ``glyphs`` trains tiny-glyphs
(:data:`WORLDS`). Every batch and its augmentation are a function of ``(seed, step)``, so a run
resumed from ``last.pt`` ends with the same weights as an uninterrupted one.

An optional second stage (``token_steps`` > 0; on for ``glyphs``, off for ``digits``) trains
the image tower alone, the text tower and logit scale frozen, with the CLIP loss plus a
token-level one (:func:`token_loss`): each caption must be matched by the best-matching of the
image's spatial tokens, so the local detail a caption names ("with a tail") has to be readable
from single tokens. It starts from the first stage's weights rounded to fp16, exactly as they
are shipped, so it can also start from a shipped file (``init``) without rerunning the first
stage.
The model is :mod:`seeclip.zoo.tiny_clip`'s; the card written at the end is
:mod:`seeclip.zoo.tiny_card`'s.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

from seeclip.io import load_checkpoint, write_with
from seeclip.paths import seeclip_home
from seeclip.zoo import tiny_card
from seeclip.zoo.loop import CHECKPOINT_FORMAT, Stage, batch_indices, cosine_warmup, run_stages
from seeclip.zoo.tiny_clip import SURGERY, build_tiny_clip, resnet_tokens

__all__ = [
    "WORLDS",
    "PretrainConfig",
    "World",
    "default_config",
    "augment",
    "checkpoint_weights",
    "corpus_for",
    "load_benchmark_arrays",
    "pretrain_clip",
    "to_input",
    "token_loss",
    "zero_shot_accuracy",
]

PRIMARY_TEMPLATE = "a photo of the digit {}."


@dataclass(frozen=True)
class World:
    """An embedded world a tiny CLIP is pretrained on: its model, corpus and benchmark."""

    name: str
    model: str  # a key of seeclip.zoo.tiny_clip.TINY_MODELS
    benchmark: str  # the benchmark spec whose classes the card's zero-shot accuracy covers
    defaults: dict  # PretrainConfig fields that differ from the digits defaults

    def generators(self):
        """``(generate_corpus, generate_benchmark)`` of the world's dataset package."""
        if self.name == "glyphs":
            from seeclip.datasets import glyphs as package
        else:
            from seeclip.datasets import digits as package
        return package.generate_corpus, package.generate_benchmark


WORLDS: dict[str, World] = {
    "digits": World("digits", "tiny-digits", "digits", {}),
    # glyphs: 36 tokens at 48 px and 58 concepts, then the token stage (docs/tiny_clip.md)
    "glyphs": World(
        "glyphs",
        "tiny-glyphs",
        "glyphs",
        {
            "steps": 1300,
            "corpus_size": 100000,
            "eval_n_per_class": 100,
            "bf16": False,  # this CPU class has no bf16 units: emulated, ~6x slower
            "token_steps": 800,  # the run that met the token-probe bar (docs/tiny_clip.md)
            "token_weight": 3.0,
            "eval_templates": (
                "a photo of the {}.",
                "the {}.",
                "a picture of the {}.",
                "an image of the {}.",
            ),
        },
    ),
}


def default_config(world: str = "digits") -> PretrainConfig:
    """The default :class:`PretrainConfig` of a world (digits: the dataclass defaults)."""
    if world not in WORLDS:
        raise ValueError(f"no world {world!r}; choose one of {sorted(WORLDS)}")
    return PretrainConfig(world=world, **WORLDS[world].defaults)


@dataclass(frozen=True)
class PretrainConfig:
    """Everything that determines a ``pretrain-clip`` run (the card records all of it)."""

    world: str = "digits"  # a key of WORLDS: which corpus, model and benchmark
    steps: int = 1400  # optimiser steps: the budget is in steps, not minutes, so runs reproduce
    batch_size: int = 256  # pairs per step (the contrastive negatives come from the batch)
    lr: float = 1e-3  # peak AdamW learning rate
    weight_decay: float = 0.1  # on matrices/convs only; not on norms, biases, logit_scale
    betas: tuple[float, ...] = (0.9, 0.98)  # AdamW betas (CLIP's)
    eps: float = 1e-6  # AdamW epsilon (CLIP's)
    warmup_steps: int = 100  # linear warm-up from 0, then cosine decay to 0 at `steps`
    grad_clip: float = 1.0  # max global gradient norm (0 disables)
    init_temperature: float = 0.07  # initial softmax temperature; logit scale = 1/T, learned
    max_logit_scale: float = 100.0  # clamp on exp(logit_scale), as in CLIP
    seed: int = 0  # model init, batch order and augmentation
    corpus_size: int = 60000  # captioned pairs generated (and cycled over)
    corpus_seed: int = 1  # seed of generate_corpus
    aug_rotate: float = 10.0  # max |rotation| in degrees
    aug_scale: float = 0.1  # scale drawn from [1 - s, 1 + s]
    aug_shift: float = 0.1  # max shift as a fraction of the half-width (0.1 ~ 1.6 px at 32 px)
    aug_jitter: float = 0.2  # brightness and contrast factors drawn from [1 - j, 1 + j]
    bf16: bool = True  # bf16 autocast on CPU: faster with bf16 units, ~6x slower without them
    num_threads: int = 2  # torch threads: 2 on idle cores (1.0 s/step); 1 if the cores are shared
    checkpoint_every: int = 100  # write out/last.pt every this many steps (and at the end)
    eval_templates: tuple[str, ...] = (  # zero-shot prompt ensemble for the card's accuracy
        PRIMARY_TEMPLATE,
        "the digit {}.",
        "the number {}.",
        "a picture of a {}.",
    )
    eval_n_per_class: int = 200  # benchmark images per class and domain (generate_benchmark's)
    # second stage (0 = none): image tower only, CLIP loss + token_weight * token_loss
    token_steps: int = 0  # its optimiser steps, after `steps`
    token_batch_size: int = 128  # pairs per step
    token_lr: float = 3e-4  # peak AdamW learning rate (warm-up over 10% of the steps, cosine)
    token_weight: float = 1.0  # weight of token_loss against the CLIP loss


def corpus_for(cfg: PretrainConfig, progress: bool) -> Path:
    """The captioned corpus ``cfg`` trains on (generated under $SEECLIP_HOME/data on first use)."""
    world = WORLDS[cfg.world]
    generate_corpus, _ = world.generators()
    default_n = world.defaults.get("corpus_size", PretrainConfig.corpus_size)
    root = seeclip_home() / "data" / f"{world.name}_corpus"
    if cfg.corpus_size != default_n or cfg.corpus_seed != 1:
        root = root.with_name(f"{world.name}_corpus_n{cfg.corpus_size}_s{cfg.corpus_seed}")
    return generate_corpus(root, n=cfg.corpus_size, seed=cfg.corpus_seed, progress=progress)


def _normalize(x: Tensor) -> Tensor:
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def to_input(images: np.ndarray | Tensor) -> Tensor:
    """uint8 [B, S, S, 3] -> CLIP-normalised float [B, 3, S, S] (= the eval preprocess at S px)."""
    x = torch.as_tensor(images).permute(0, 3, 1, 2).float().div_(255.0)
    return _normalize(x)


def augment(images: Tensor, cfg: PretrainConfig, generator: torch.Generator) -> Tensor:
    """Batched augmentation of uint8 [B, H, W, 3] -> normalised float [B, 3, H, W]."""
    b = images.shape[0]
    x = images.permute(0, 3, 1, 2).float().div_(255.0)

    def uniform(lo: float, hi: float) -> Tensor:
        return lo + (hi - lo) * torch.rand(b, generator=generator)

    angle = uniform(-cfg.aug_rotate, cfg.aug_rotate) * (math.pi / 180)
    scale = uniform(1 - cfg.aug_scale, 1 + cfg.aug_scale)
    shift = uniform(-cfg.aug_shift, cfg.aug_shift), uniform(-cfg.aug_shift, cfg.aug_shift)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos, -sin, shift[0]], 1), torch.stack([sin, cos, shift[1]], 1)], 1
    )  # [B, 2, 3]: output pixel -> input pixel, in [-1, 1] coordinates
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    brightness = uniform(1 - cfg.aug_jitter, 1 + cfg.aug_jitter).view(b, 1, 1, 1)
    contrast = uniform(1 - cfg.aug_jitter, 1 + cfg.aug_jitter).view(b, 1, 1, 1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = ((x - mean) * contrast + mean * brightness).clamp_(0, 1)
    return _normalize(x)


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        exclude = p.ndim < 2 or "bn" in name or "ln" in name or "logit_scale" in name
        (no_decay if exclude else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0},
    ]


def clip_loss(image_features: Tensor, text_features: Tensor, logit_scale: Tensor) -> Tensor:
    """Symmetric InfoNCE over the batch (features L2-normalised, matching pairs on the diagonal)."""
    logits = logit_scale.exp() * image_features @ text_features.T
    target = torch.arange(logits.shape[0])
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


# ---------------------------------------------------------------------------- zero-shot evaluation


def token_loss(tokens: Tensor, text_features: Tensor, logit_scale: Tensor) -> Tensor:
    """Multiple-instance InfoNCE: an image's score for a caption is its best token's cosine.

    Args:
        tokens: spatial tokens [B, N, d] (normalised here).
        text_features: the batch's caption features [B, d], L2-normalised, matching image i.
        logit_scale: log of the softmax scale (CLIP's learned one).

    Returns:
        cross-entropy of each image's captions scored by max over tokens (image -> text).
    """
    sims = torch.einsum("bnd,jd->bjn", F.normalize(tokens, dim=-1), text_features)
    logits = logit_scale.exp() * sims.max(dim=-1).values
    return F.cross_entropy(logits, torch.arange(len(tokens)))


def load_benchmark_arrays(
    root: Path | None = None,
    *,
    n_per_class: int = 200,
    limit_per_class: int | None = None,
    world: str = "digits",
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Generate (if needed) and read a world's benchmark: domain -> (uint8 images, labels).

    Labels index the benchmark spec's classes.
    """
    from PIL import Image

    from seeclip.datasets import get_benchmark

    spec = get_benchmark(WORLDS[world].benchmark)
    _, generate_benchmark = WORLDS[world].generators()
    if root is None:
        root = seeclip_home() / "data" / world
        if n_per_class != WORLDS[world].defaults.get("eval_n_per_class", 200):
            root = root.with_name(f"{world}_n{n_per_class}")
    root = generate_benchmark(Path(root), n_per_class=n_per_class, progress=False)
    data = {}
    for domain in spec.domains:
        images, labels = [], []
        for c, word in enumerate(spec.classes):
            files = sorted((root / domain / word).glob("*.png"))[:limit_per_class]
            images += [np.asarray(Image.open(f).convert("RGB")) for f in files]
            labels += [c] * len(files)
        data[domain] = (np.stack(images), np.asarray(labels))
    return data


@torch.no_grad()
def zero_shot_accuracy(
    model: nn.Module,
    tokenizer,
    data: dict[str, tuple[np.ndarray, np.ndarray]],
    *,
    templates: Sequence[str] = (PRIMARY_TEMPLATE,),
    classnames: Sequence[str] | None = None,
    batch_size: int = 500,
) -> dict[str, float]:
    """Zero-shot accuracy per domain on uint8 [N, S, S, 3] images (default: the 10 digits)."""
    if classnames is None:
        from seeclip.datasets.digits import DIGIT_WORDS as classnames
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    classifier = open_clip.build_zero_shot_classifier(  # [D, C]
        model, tokenizer, list(classnames), list(templates), device=device
    )
    acc = {}
    for domain, (images, labels) in data.items():
        preds = []
        for i in range(0, len(images), batch_size):
            x = to_input(images[i : i + batch_size]).to(device)
            preds.append((model.encode_image(x, normalize=True) @ classifier).argmax(-1).cpu())
        acc[domain] = float((torch.cat(preds).numpy() == np.asarray(labels)).mean())
    model.train(was_training)
    return acc


# ---------------------------------------------------------------------------------------- training


def _save_weights(model: nn.Module, path: Path, arch: str) -> None:
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    meta = {"arch": arch, "surgery": SURGERY, "dtype": "float16"}
    write_with(path, lambda tmp: save_file(state, str(tmp), metadata=meta))


def pretrain_clip(
    cfg: PretrainConfig,
    out: Path,
    *,
    progress: bool = True,
    command: str | None = None,
    stop_at: int | None = None,
    benchmark: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
    init: Path | None = None,
) -> dict:
    """Train a world's tiny CLIP: ``out/<model>.safetensors`` (fp16), ``card.json``, ``last.pt``.

    Resumes from ``out/last.pt`` when it exists (same config and ``init`` required). With a
    token stage (``cfg.token_steps`` > 0) the first stage's weights are also written, as
    ``out/<model>.stage1.safetensors``.

    Args:
        cfg: the run's configuration.
        out: output folder.
        progress: show tqdm bars.
        command: the command line to record in the card.
        stop_at: stop after checkpointing at this step, as if interrupted (None: run to the end).
            Steps count on through the token stage (``cfg.steps + 1`` is its first).
        benchmark: images for the card's zero-shot accuracy (default: the full benchmark).
        init: first-stage weights (a ``.safetensors`` this function wrote): skip the first stage
            and run only the token stage from them. Their card (``<stem>.card.json`` beside
            them), if there, goes into this card as the first stage's record.

    Returns:
        the card (also written to ``out/card.json``); ``{"stage", "step"}`` if stopped early.
    """
    if init is not None and cfg.token_steps <= 0:
        raise ValueError(
            f"--init {init} starts the token stage, but token_steps is 0; "
            "pass token_steps=N (glyphs ships 800)"
        )
    if init is not None and not Path(init).is_file():
        raise ValueError(f"--init {init}: no such file; give the first stage's .safetensors")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.num_threads)
    try:
        return _run(
            cfg,
            out,
            progress=progress,
            command=command,
            stop_at=stop_at,
            benchmark=benchmark,
            init=init,
        )
    finally:
        torch.set_num_threads(threads)


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _stage1_record(init: Path) -> dict | None:
    """Command, config and training record of the first stage, from the card beside ``init``."""
    card = init.with_suffix(".card.json")
    if not card.is_file():
        return None
    return {
        k: v for k, v in tiny_card.load_card(card).items() if k in ("command", "config", "training")
    }


def _step(loss: Tensor, optimizer, scheduler, params, grad_clip: float) -> None:
    """One optimiser step on ``loss``: backward, clip ``params``' global norm (0: no clip), step."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    scheduler.step()


def _round_to_fp16(model: nn.Module) -> None:
    """What saving in fp16 and loading back does to the weights (the token stage starts there)."""
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.copy_(t.to(torch.float16))


def _token_optimizer(cfg: PretrainConfig, model: nn.Module):
    """The token stage's AdamW and schedule: warm-up over 10%, cosine. Freezes everything but
    the image tower (``requires_grad``), which is all it optimises."""
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("visual."))
    optimizer = torch.optim.AdamW(
        _param_groups(model.visual, cfg.weight_decay),
        lr=cfg.token_lr,
        betas=tuple(cfg.betas),
        eps=cfg.eps,
    )
    warmup = max(1, cfg.token_steps // 10)
    schedule = partial(cosine_warmup, warmup=warmup, total=cfg.token_steps)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


@torch.no_grad()
def _caption_features(
    model: nn.Module, tokenizer, captions: Sequence[str]
) -> tuple[Tensor, Tensor]:
    """Normalised features of each distinct caption [U, d] (frozen text tower), and each
    corpus item's row in them [N]."""
    distinct = sorted(set(captions))
    row = {c: i for i, c in enumerate(distinct)}
    feats = [
        F.normalize(model.encode_text(tokenizer(distinct[i : i + 1024])).float(), dim=-1)
        for i in range(0, len(distinct), 1024)
    ]
    return torch.cat(feats), torch.tensor([row[c] for c in captions])


_RUNTIME_FIELDS = ("num_threads", "checkpoint_every")  # may change when a run resumes


class _ClipStage(Stage):
    """Stage 1: contrastive pretraining of both towers."""

    name = "clip"

    def __init__(self, cfg, model, images: Tensor, tokens: Tensor, arch: str, stage1: Path | None):
        self.cfg, self.model, self.images, self.tokens = cfg, model, images, tokens
        self.arch, self.stage1 = arch, stage1  # where the stage's own weights go (None: nowhere)
        self.steps = cfg.steps
        self.max_scale = math.log(cfg.max_logit_scale)

    def begin(self, live: dict | None, kept: dict[str, dict]) -> None:
        cfg, model = self.cfg, self.model
        self.optimizer = torch.optim.AdamW(
            _param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps
        )
        schedule = partial(cosine_warmup, warmup=cfg.warmup_steps, total=cfg.steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        if live is not None:
            _load_live(live, model, self.optimizer, self.scheduler)

    def step(self, k: int) -> tuple[float, dict[str, str]]:
        cfg, model = self.cfg, self.model
        t0 = time.perf_counter()
        idx = batch_indices(k, len(self.images), cfg.batch_size, cfg.seed)
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + k)
        x = augment(self.images[idx], cfg, gen)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            img = model.encode_image(x)
            txt = model.encode_text(self.tokens[idx])
        loss = clip_loss(
            F.normalize(img.float(), dim=-1), F.normalize(txt.float(), dim=-1), model.logit_scale
        )
        _step(loss, self.optimizer, self.scheduler, model.parameters(), cfg.grad_clip)
        with torch.no_grad():
            model.logit_scale.clamp_(0, self.max_scale)
        pairs = cfg.batch_size / (time.perf_counter() - t0)
        scale = model.logit_scale.exp().item()
        return loss.item(), {
            "loss": f"{loss.item():.3f}",
            "pairs_s": f"{pairs:.0f}",
            "scale": f"{scale:.1f}",
        }

    def state(self) -> dict:
        return _live(self.model, self.optimizer, self.scheduler)

    def end(self) -> dict:
        if self.stage1 is not None:
            _save_weights(self.model, self.stage1, self.arch)
        return {"model": _copy(self.model.state_dict())}


class _TokenStage(Stage):
    """Stage 2: the image tower alone, CLIP loss + token loss, from stage 1's fp16 weights."""

    name = "tokens"

    def __init__(self, cfg, model, images: Tensor, tokenizer, captions: Sequence[str]):
        self.cfg, self.model, self.images = cfg, model, images
        self.tokenizer, self.captions = tokenizer, captions
        self.steps = cfg.token_steps

    def begin(self, live: dict | None, kept: dict[str, dict]) -> None:
        model = self.model
        if live is None:  # the stage boundary: stage 1's weights, as shipped (fp16)
            if "clip" in kept:  # (absent when the run starts from --init)
                model.load_state_dict(kept["clip"]["model"])
            _round_to_fp16(model)
        self.optimizer, self.scheduler = _token_optimizer(self.cfg, model)
        if live is not None:
            _load_live(live, model, self.optimizer, self.scheduler)
        model.eval()  # the text tower only encodes the captions here
        self.text, self.row = _caption_features(model, self.tokenizer, self.captions)
        model.train()
        self.scale = model.logit_scale.detach()

    def step(self, k: int) -> tuple[float, dict[str, str]]:
        cfg, model = self.cfg, self.model
        t0 = time.perf_counter()
        idx = batch_indices(k, len(self.images), cfg.token_batch_size, cfg.seed + 1)
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + cfg.steps + k)
        x = augment(self.images[idx], cfg, gen)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            pooled, spatial = resnet_tokens(model.visual, x)
        txt = self.text[self.row[idx]]
        loss = clip_loss(F.normalize(pooled.float(), dim=-1), txt, self.scale)
        loss = loss + cfg.token_weight * token_loss(spatial.float(), txt, self.scale)
        _step(loss, self.optimizer, self.scheduler, model.visual.parameters(), cfg.grad_clip)
        pairs = cfg.token_batch_size / (time.perf_counter() - t0)
        return loss.item(), {"token_stage_loss": f"{loss.item():.3f}", "pairs_s": f"{pairs:.0f}"}

    def state(self) -> dict:
        return _live(self.model, self.optimizer, self.scheduler)

    def end(self) -> dict:
        return {"model": _copy(self.model.state_dict())}


def _live(model: nn.Module, optimizer, scheduler) -> dict:
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
    }


def _load_live(live: dict, model: nn.Module, optimizer, scheduler) -> None:
    model.load_state_dict(live["model"])
    optimizer.load_state_dict(live["optimizer"])
    scheduler.load_state_dict(live["scheduler"])


def _copy(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in state.items()}


def checkpoint_weights(path: Path) -> dict[str, Tensor]:
    """The CLIP weights a ``pretrain-clip`` checkpoint (``last.pt``) holds: where the run
    stopped, or its final weights once it finished (read without running pickled code)."""
    blob = load_checkpoint(path)
    if not isinstance(blob, dict) or blob.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a pretrain-clip checkpoint of this seeclip version")
    if blob["live"] is not None:
        return blob["live"]["model"]
    kept = [v for v in blob["kept"].values() if "model" in v]
    if not kept:
        raise ValueError(f"{path} holds no CLIP weights yet; run pretrain-clip further")
    return kept[-1]["model"]


def _run(cfg, out, *, progress, command, stop_at, benchmark, init) -> dict:
    corpus = corpus_for(cfg, progress)
    images = torch.from_numpy(np.load(corpus / "images.npy"))
    captions = json.loads((corpus / "captions.json").read_text())
    world = WORLDS[cfg.world]
    model, _, tokenizer = build_tiny_clip(world.model, init, seed=cfg.seed)
    model.train()
    if init is None:
        with torch.no_grad():
            model.logit_scale.fill_(math.log(1 / cfg.init_temperature))
    init_record = None if init is None else {"path": str(init), "sha256": _file_sha256(init)}
    stages: list[Stage] = []
    if init is None:
        stage1 = out / f"{world.model}.stage1.safetensors" if cfg.token_steps > 0 else None
        stages.append(_ClipStage(cfg, model, images, tokenizer(captions), world.model, stage1))
    if cfg.token_steps > 0:
        stages.append(_TokenStage(cfg, model, images, tokenizer, captions))
    recipe = {k: v for k, v in _plain(asdict(cfg)).items() if k not in _RUNTIME_FIELDS}
    state = run_stages(
        stages,
        out / "last.pt",
        {"config": recipe, "init": init_record},
        skipped=0 if init is None else cfg.steps,
        stop_at=stop_at,
        checkpoint_every=cfg.checkpoint_every,
        progress=progress,
        desc="pretrain-clip",
    )
    if not state.done:
        return {"stage": state.stage, "step": state.step}
    model.load_state_dict(state.kept[stages[-1].name]["model"])
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    _save_weights(model, out / f"{world.model}.safetensors", world.model)
    card = tiny_card.build_card(
        name=world.model,
        world=world.name,
        model=model,
        config=asdict(cfg),
        command=command,
        corpus_meta=json.loads((corpus / "meta.json").read_text()),
        losses=state.losses.get("clip", []),
        train_seconds=state.seconds.get("clip", 0.0),
        zero_shot=_zero_shot_section(cfg, model, tokenizer, benchmark),
    )
    if cfg.token_steps > 0:
        card["token_stage"] = tiny_card.training_summary(
            state.losses["tokens"],
            batch_size=cfg.token_batch_size,
            train_seconds=state.seconds["tokens"],
            logit_scale=model.logit_scale.detach().exp().item(),
            num_threads=cfg.num_threads,
        )
    if init is not None:
        card["training"] = {"init": init_record, "stage1": _stage1_record(Path(init))}
    tiny_card.write_card(out / "card.json", card)
    return card


def _plain(value):
    """Tuples -> lists, recursively: a config as it comes back from a checkpoint."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _zero_shot_section(cfg: PretrainConfig, model: nn.Module, tokenizer, benchmark) -> dict:
    """Measure the card's zero-shot numbers: trained (ensemble, primary template), random init."""
    from seeclip.datasets import get_benchmark

    world = WORLDS[cfg.world]
    spec = get_benchmark(world.benchmark)
    names = tuple(spec.class_text(c) for c in spec.classes)
    primary_template = cfg.eval_templates[0]
    if benchmark is None:
        benchmark = load_benchmark_arrays(n_per_class=cfg.eval_n_per_class, world=world.name)
    kw = {"classnames": names}
    primary = zero_shot_accuracy(model, tokenizer, benchmark, templates=(primary_template,), **kw)
    ensemble = zero_shot_accuracy(model, tokenizer, benchmark, templates=cfg.eval_templates, **kw)
    random_model, _, _ = build_tiny_clip(world.model, seed=cfg.seed)
    random_acc = zero_shot_accuracy(
        random_model, tokenizer, benchmark, templates=cfg.eval_templates, **kw
    )
    classifier = open_clip.build_zero_shot_classifier(
        model,
        tokenizer,
        list(names),
        list(cfg.eval_templates),
        device=next(model.parameters()).device,
    )
    return tiny_card.zero_shot_section(
        benchmark=f"{world.name} generate_benchmark(seed=0, n_per_class={cfg.eval_n_per_class})",
        classnames=names,
        templates=cfg.eval_templates,
        primary_template=primary_template,
        n_per_class=cfg.eval_n_per_class,
        ensemble=ensemble,
        single_template=primary,
        random_init_ensemble=random_acc,
        classifier=classifier,
    )
