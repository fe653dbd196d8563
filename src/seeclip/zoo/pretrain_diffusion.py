"""``seeclip pretrain-diffusion``: a tiny text-to-image latent diffusion model ("tiny SD") on CPU.

Stable Diffusion 1.x in miniature, trained on a captioned corpus (``images.npy``, ``captions.json``
and ``meta.json`` as written by ``generate_corpus``) and saved as a diffusers
``StableDiffusionPipeline`` folder that :func:`seeclip.generate.sd_pipeline.load_pipeline` reads:

1. an ``AutoencoderKL`` (4 latent channels) trained with L1 + L2 + a small KL; its
   ``scaling_factor`` is 1/std of the corpus latents, as SD computed its 0.18215;
2. a ``UNet2DConditionModel`` trained with DDPM's epsilon objective (SD-1.5's noise schedule),
   cross-attending to the last hidden states of the frozen text tower of a tiny open_clip CLIP
   (copied into a ``CLIPTextModel`` by :mod:`seeclip.zoo.sd_export`), with 10% of the captions
   dropped to "" for classifier-free guidance and an EMA of the weights as the exported UNet.

Every batch, noise draw and caption dropout is a function of ``(seed, step)`` and the latents
are re-encoded in fixed chunks, so a run resumed from ``out/last.pt`` ends with the same weights,
bit for bit on CPU, as an uninterrupted one.

Design measurements (torch 2.14 CPU, fp32, 48 px glyphs corpus). The first ones were taken on
1 thread while another training shared the 2 cores, so their throughputs are lower bounds:

- VAE factor, 150 s of training each (batch 16, lr 1e-3): f=2, channels (16, 32), 24x24x4
  latents: 36 img/s, 17.8 dB PSNR; f=4, channels (16, 32, 64), 12x12x4 latents: 30 img/s,
  15.3 dB (both still rising; bilinear f=4 down/up-sampling gives 19.5 dB, the mean colour
  14.9). Reconstruction favours f=2 by ~2 dB at equal time, speed decides for f=4: the UNet,
  (32, 64, 64) channels at batch 64, trains at 6.5 img/s on 24x24 latents with attention on
  every level (21 img/s without the top one) against 53 (88) img/s on 12x12. Default: f=4
  (48 px -> 12x12x4, 32 px -> 8x8x4), mid-block attention off (fully convolutional, cheaper).
  Smaller batches (4, 8), lr 3e-3 or (16, 32, 32) channels learned slower per second.
- UNet, 12x12 latents, batch 64, images/s with self/cross-attention on the levels marked T:
  (32, 64, 64) (T, T, F) 53, (F, T, T) 88; (32, 64, 128) (F, T, T) 68 (4.2M parameters, the
  default); (32, 64, 64) (F, T, T) with 2 layers per block 62; (64, 64, 128) (F, T, T) 45.
- UNet learning rate (batch 32, held-out epsilon MSE after 100 steps): 4e-4 0.338, 1e-3
  0.289, 2e-3 0.264 (0.234 after 200). 1e-3 stays the default: the gap is an early-training
  one and a longer run was not affordable here.

On idle cores (2 cores, nothing else running), measured for the second tiny-glyphs-sd:

- The VAE is what limited class adherence. An independent CNN that reads 97% of real benchmark
  glyphs reads 62% of them after encode -> decode by the first shipped VAE (1000 steps,
  18.8 dB). After 2000 steps (1 thread, 85 img/s, 6.4 min): 4 latent channels 83.8% (21.4 dB),
  8 channels 85.4% (22.4 dB). 4 channels stay the default (SD's), trained for 5000 steps
  (130 img/s on 2 threads, 10 min).
- UNet (32, 64, 128) (F, T, T), batch 64, forward + backward: 140 img/s on 1 thread, 205 on 2;
  (64, 128, 128) 128 img/s on 2 threads (6.7M parameters). With text encoding the training loop
  runs 150-230 img/s on 2 threads: 10000 steps (640k latents, 6.4 passes over the corpus) in
  about an hour.
- min-SNR-5 weighting (Hang et al. 2023) is on by default: it moves the loss's weight from the
  nearly clean timesteps (fine texture) to the noisier ones that decide a glyph's shape. Not
  ablated here (one run of this length fits a session).
- Another process on the same 2 cores (even at nice 19) slows a 2-thread run by 20-30%.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from seeclip.io import atomic_dir, write_json, write_with
from seeclip.zoo.loop import Stage, batch_indices, cosine_warmup, run_stages
from seeclip.zoo.sd_export import clip_tokenizer, text_encoder_from_clip, write_tokenizer

__all__ = ["DiffusionPretrainConfig", "pretrain_diffusion", "sample"]

_RUNTIME_FIELDS = ("num_threads", "checkpoint_every")  # not checked when a run resumes


@dataclass(frozen=True)
class DiffusionPretrainConfig:
    """Everything that determines a ``pretrain-diffusion`` run (the card records all of it)."""

    seed: int = 0  # model init, batch order, noise, timesteps and caption dropout
    num_threads: int = 2  # torch threads (1 when the cores are shared); may change on resume
    checkpoint_every: int = 250  # write out/last.pt every this many steps; may change on resume
    # stage 1: the autoencoder
    vae_factor: int = 4  # spatial downsampling f (2 or 4): 48 px -> 12x12x4 latents at f=4
    vae_channels: tuple[int, ...] = (16, 32, 64)  # encoder/decoder widths, log2(f) + 1 levels
    latent_channels: int = 4  # channels of the latent (SD-1.5: 4); the UNet's in/out channels
    vae_norm_groups: int = 8  # GroupNorm groups (must divide every width)
    vae_mid_attention: bool = False  # self-attention in the mid block (SD's VAE has one)
    vae_steps: int = 5000  # optimiser steps of stage 1 (80k images at batch 16)
    vae_batch_size: int = 16  # images per VAE step
    vae_lr: float = 1e-3  # peak AdamW learning rate of the VAE
    vae_kl_weight: float = 1e-6  # KL (summed over the latent) per pixel value, SD's ratio
    vae_warmup_steps: int = 50  # linear warm-up, then cosine decay to 0
    # stage 2: the UNet
    unet_channels: tuple[int, ...] = (32, 64, 128)  # block widths, one per resolution level
    unet_attention: tuple[bool, ...] = (False, True, True)  # self+cross-attention per level
    unet_layers_per_block: int = 1  # ResNet (+ transformer) layers per down block
    attention_heads: int = 8  # diffusers' ``attention_head_dim`` (heads per block, as SD's 8)
    steps: int = 10000  # optimiser steps of stage 2 (640k latents at batch 64)
    batch_size: int = 64  # latents per UNet step
    lr: float = 1e-3  # peak AdamW learning rate of the UNet
    weight_decay: float = 0.0  # AdamW weight decay (both stages)
    warmup_steps: int = 200  # linear warm-up, then cosine decay to 0
    grad_clip: float = 1.0  # max global gradient norm (both stages; 0 disables)
    ema_decay: float = 0.999  # EMA of the UNet weights (the exported UNet); 0 exports the raw one
    caption_dropout: float = 0.1  # share of captions replaced by "" (classifier-free guidance)
    prediction_type: str = "epsilon"  # "epsilon" (SD-1.5) or "v_prediction"
    snr_gamma: float = 5.0  # min-SNR-gamma loss weighting (Hang et al. 2023); 0 = plain MSE
    train_timesteps: int = 1000  # DDPM steps; SD-1.5's "scaled_linear" betas 0.00085..0.012
    beta_start: float = 0.00085  # first beta of the schedule
    beta_end: float = 0.012  # last beta of the schedule
    encode_batch_size: int = 256  # chunk size when the corpus is encoded to latents
    # evaluation written next to the pipeline
    sample_steps: int = 20  # DPM-Solver++ steps of the card's sample grid
    sample_guidance: float = 4.0  # guidance scale of the card's sample grid
    sample_prompts: int = 16  # distinct corpus captions drawn in out/samples.png

    def __post_init__(self) -> None:
        if (
            self.vae_factor not in (2, 4)
            or len(self.vae_channels) != int(math.log2(self.vae_factor)) + 1
        ):
            raise ValueError(
                f"vae_factor must be 2 or 4 with log2(f) + 1 vae_channels, got "
                f"{self.vae_factor}, {self.vae_channels}"
            )
        if any(c % self.vae_norm_groups for c in self.vae_channels):
            raise ValueError(
                f"vae_norm_groups={self.vae_norm_groups} must divide "
                f"vae_channels={self.vae_channels}"
            )
        if len(self.unet_attention) != len(self.unet_channels) or not any(self.unet_attention):
            raise ValueError("unet_attention needs one flag per unet_channels level, one True")
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(
                f"prediction_type must be epsilon or v_prediction, got {self.prediction_type!r}"
            )
        if not 0 <= self.caption_dropout < 1 or not 0 <= self.ema_decay < 1:
            raise ValueError("caption_dropout and ema_decay must be in [0, 1)")
        if min(self.vae_steps, self.steps, self.batch_size, self.vae_batch_size) < 1:
            raise ValueError("steps, vae_steps, batch_size and vae_batch_size must be >= 1")
        if self.latent_channels < 1:
            raise ValueError(f"latent_channels must be >= 1, got {self.latent_channels}")


# ---------------------------------------------------------------------------------- the models


def build_vae(cfg: DiffusionPretrainConfig, image_size: int, *, scaling_factor: float = 1.0):
    """The stage-1 ``AutoencoderKL`` (seeded by ``cfg.seed``; the global RNG is left alone)."""
    from diffusers import AutoencoderKL

    n = len(cfg.vae_channels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return AutoencoderKL(
            in_channels=3,
            out_channels=3,
            latent_channels=cfg.latent_channels,
            layers_per_block=1,
            block_out_channels=cfg.vae_channels,
            down_block_types=("DownEncoderBlock2D",) * n,
            up_block_types=("UpDecoderBlock2D",) * n,
            norm_num_groups=cfg.vae_norm_groups,
            mid_block_add_attention=cfg.vae_mid_attention,
            sample_size=image_size,
            scaling_factor=scaling_factor,
        )


def build_unet(cfg: DiffusionPretrainConfig, latent_size: int, text_width: int):
    """The stage-2 ``UNet2DConditionModel`` (seeded by ``cfg.seed + 1``)."""
    from diffusers import UNet2DConditionModel

    attn = cfg.unet_attention
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed + 1)
        return UNet2DConditionModel(
            sample_size=latent_size,
            in_channels=cfg.latent_channels,
            out_channels=cfg.latent_channels,
            block_out_channels=cfg.unet_channels,
            layers_per_block=cfg.unet_layers_per_block,
            down_block_types=down,
            up_block_types=up,
            cross_attention_dim=text_width,
            attention_head_dim=cfg.attention_heads,
        )


def _noise_scheduler(cfg: DiffusionPretrainConfig):
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=cfg.train_timesteps,
        beta_start=cfg.beta_start,
        beta_end=cfg.beta_end,
        beta_schedule="scaled_linear",
        prediction_type=cfg.prediction_type,
        clip_sample=False,
    )


def _sampler(cfg: DiffusionPretrainConfig):
    """The exported sampler: DPM-Solver++ (2nd order) on the training schedule."""
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(
        num_train_timesteps=cfg.train_timesteps,
        beta_start=cfg.beta_start,
        beta_end=cfg.beta_end,
        beta_schedule="scaled_linear",
        prediction_type=cfg.prediction_type,
        steps_offset=1,
    )


# ------------------------------------------------------------------------------------- helpers


def _generator(seed: int, stage: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 4 + stage)


def _to_unit(images: Tensor) -> Tensor:
    """uint8 [B, S, S, 3] -> float [B, 3, S, S] in [-1, 1] (SD's VAE input range)."""
    return images.permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)


def _fingerprint(tensor: Tensor) -> str:
    return hashlib.sha256(tensor.detach().float().contiguous().numpy().tobytes()).hexdigest()[:16]


def _step_optimizer(params, optimizer, loss: Tensor, grad_clip: float) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()


@torch.no_grad()
def _encode_corpus(vae, images: Tensor, chunk: int) -> tuple[Tensor, Tensor]:
    """Posterior (mean, std) [N, 4, s, s] of every image, in fixed chunks (bitwise reproducible)."""
    means, stds = [], []
    for i in range(0, len(images), chunk):
        dist = vae.encode(_to_unit(images[i : i + chunk])).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def _psnr(vae, images: Tensor) -> float:
    """Reconstruction PSNR (dB, pixel range [0, 1]) through the posterior mean."""
    x = _to_unit(images)
    rec = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    return float(10 * torch.log10(4 / (rec - x).pow(2).mean()))


def sample(pipe, prompts: Sequence[str], *, seed: int, steps: int, guidance: float) -> np.ndarray:
    """uint8 [n, S, S, 3] images of ``prompts``; image i is seeded by ``seed + i``."""
    gens = [torch.Generator("cpu").manual_seed(seed + i) for i in range(len(prompts))]
    out = pipe(
        list(prompts),
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=gens,
        output_type="np",
    ).images
    return (np.clip(out, 0, 1) * 255).round().astype(np.uint8)


def _grid(images: np.ndarray, cols: int = 8) -> np.ndarray:
    n, s = len(images), images.shape[1]
    rows = -(-n // cols)
    pad = np.zeros((rows * cols - n, s, s, 3), dtype=np.uint8)
    full = np.concatenate([images, pad]).reshape(rows, cols, s, s, 3)
    return full.transpose(0, 2, 1, 3, 4).reshape(rows * s, cols * s, 3)


# ---------------------------------------------------------------------------------------- training


def pretrain_diffusion(
    cfg: DiffusionPretrainConfig,
    corpus: Path,
    clip_model: nn.Module,
    tokenizer,
    out: Path,
    *,
    progress: bool = True,
    command: str | None = None,
    stop_at: int | None = None,
) -> dict:
    """Train tiny SD on ``corpus``; write ``out/pipeline/`` (fp16 diffusers folder), ``card.json``.

    Resumes from ``out/last.pt`` when it exists (same config, corpus and text tower required).

    Args:
        cfg: the run's configuration.
        corpus: a folder written by a ``generate_corpus`` (any square image size S).
        clip_model: the open_clip CLIP whose frozen text tower conditions the UNet.
        tokenizer: ``clip_model``'s open_clip tokenizer, or None; when given, the pipeline's
            tokenizer is checked to give its ids on the first captions.
        out: output folder.
        progress: show tqdm bars.
        command: the command line to record in the card.
        stop_at: stop after checkpointing once this many optimiser steps are done, counting
            the ``vae_steps`` of stage 1 first, as if interrupted (None: run to the end).

    Returns:
        the card (also written to ``out/card.json``), or ``{"stage", "step"}`` if stopped early.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.num_threads)
    try:
        return _Run(cfg, Path(corpus), clip_model, tokenizer, out, progress).run(command, stop_at)
    finally:
        torch.set_num_threads(threads)


class _Run:
    """One run's state: the data, the frozen text side, the checkpoint and the two stages."""

    def __init__(self, cfg, corpus: Path, clip_model, tokenizer_check, out: Path, progress):
        self.cfg, self.out, self.progress = cfg, out, progress
        self.images = torch.from_numpy(np.load(corpus / "images.npy"))
        self.captions = json.loads((corpus / "captions.json").read_text())
        self.meta = json.loads((corpus / "meta.json").read_text())
        n, s = self.images.shape[:2]
        if len(self.captions) != n or self.images.shape[1:] != (s, s, 3):
            shape = tuple(self.images.shape)
            raise ValueError(
                f"{corpus}: {len(self.captions)} captions for images {shape}; "
                "expected [N, S, S, 3] and N captions"
            )
        side = s // cfg.vae_factor
        if s % cfg.vae_factor or side % 2 ** (len(cfg.unet_channels) - 1):
            raise ValueError(
                f"image size {s} / vae_factor {cfg.vae_factor} = {s / cfg.vae_factor}"
                f" must be divisible by 2^{len(cfg.unet_channels) - 1}"
            )
        self.size, self.latent_size = s, side
        self.text_encoder = text_encoder_from_clip(clip_model).requires_grad_(False)
        self.tokenizer = clip_tokenizer(self.text_encoder.config.max_position_embeddings)
        self.ids = self._tokenize(self.captions)
        self.empty_ids = self._tokenize([""])
        if tokenizer_check is not None:
            k = min(64, n)
            ref, lengths = tokenizer_check(self.captions[:k]), self.ids[:k].argmax(-1) + 1
            if any(not torch.equal(self.ids[i, :m], ref[i, :m]) for i, m in enumerate(lengths)):
                raise ValueError("the pipeline tokenizer disagrees with clip_model's tokenizer")
        tower = _fingerprint(self.text_encoder.get_input_embeddings().weight)  # the token table
        recipe = {k: v for k, v in asdict(cfg).items() if k not in _RUNTIME_FIELDS}
        self.identity = {
            "config": json.loads(json.dumps(recipe)),
            "n": int(n),
            "image_size": int(s),
            "corpus_hash": self.meta.get("content_hash"),
            "text_tower": tower,
        }

    def _tokenize(self, texts: Sequence[str]) -> Tensor:
        tok = self.tokenizer
        return tok(
            list(texts),
            padding="max_length",
            max_length=tok.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids

    # ---------------------------------------------------------------------- driver

    def run(self, command: str | None, stop_at: int | None) -> dict:
        cfg = self.cfg
        vae = build_vae(cfg, self.size)
        width = self.text_encoder.config.hidden_size
        unet = build_unet(cfg, self.latent_size, width)
        ema = build_unet(cfg, self.latent_size, width)
        vae_stage = _VaeStage(self, vae)
        stages = [vae_stage, _UnetStage(self, vae, unet, ema, vae_stage)]
        self.state = run_stages(
            stages,
            self.out / "last.pt",
            self.identity,
            stop_at=stop_at,
            checkpoint_every=cfg.checkpoint_every,
            progress=self.progress,
            desc="tiny-sd",
        )
        if not self.state.done:
            return {"stage": self.state.stage, "step": self.state.step}
        vae.load_state_dict(self.state.kept["vae"]["vae"])
        vae.register_to_config(scaling_factor=self.state.kept["vae"]["scaling_factor"])
        ema.load_state_dict(self.state.kept["unet"]["ema"])
        return self._finish(vae.eval(), ema.eval(), command)

    # ---------------------------------------------------------------------- export

    def _finish(self, vae, unet, command: str | None) -> dict:
        from diffusers import StableDiffusionPipeline
        from PIL import Image

        cfg = self.cfg
        pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=self.text_encoder.eval(),
            tokenizer=self.tokenizer,
            unet=unet,
            scheduler=_sampler(cfg),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        prompts = list(dict.fromkeys(self.captions))[: cfg.sample_prompts]
        t0 = time.perf_counter()
        images = sample(
            pipe, prompts, seed=cfg.seed, steps=cfg.sample_steps, guidance=cfg.sample_guidance
        )
        sample_seconds = time.perf_counter() - t0
        grid = Image.fromarray(_grid(images))
        write_with(self.out / "samples.png", lambda tmp: grid.save(tmp, format="PNG"))
        folder = self.out / "pipeline"
        pipe.to(torch.float16)
        with atomic_dir(folder, marker="model_index.json") as tmp:
            pipe.save_pretrained(str(tmp), safe_serialization=True)
            shutil.rmtree(tmp / "tokenizer")  # SD-1.5's layout: vocab.json + merges.txt
            write_tokenizer(tmp / "tokenizer", self.tokenizer.model_max_length)
        pipe.to(torch.float32)
        card = self._card(vae, unet, command, prompts, sample_seconds, folder)
        write_json(self.out / "card.json", card)
        return card

    def _card(self, vae, unet, command, prompts, sample_seconds, folder: Path) -> dict:
        cfg, st = self.cfg, self.state
        vae_kept = st.kept["vae"]

        def curve(losses: list[float], points: int = 50) -> list[float]:
            chunks = np.array_split(np.asarray(losses), min(points, len(losses)))
            return [round(float(c.mean()), 5) for c in chunks]

        def stage(losses: list[float], seconds: float, batch: int) -> dict:
            return {
                "steps": len(losses),
                "loss_curve": curve(losses),
                "train_seconds": round(seconds, 1),
                "images_per_second": round(len(losses) * batch / max(seconds, 1e-9), 1),
            }

        def params(m: nn.Module) -> int:
            return sum(p.numel() for p in m.parameters())

        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        meta_keys = (
            "kind",
            "world",
            "version",
            "renderer",
            "seed",
            "n",
            "image_size",
            "content_hash",
            "domains",
            "classes",
        )
        return {
            "name": "tiny-sd",
            "command": command,
            "config": json.loads(json.dumps(asdict(cfg))),
            "data": {k: self.meta[k] for k in meta_keys if k in self.meta},
            "architecture": {
                "image_size": self.size,
                "latent_shape": [cfg.latent_channels, self.latent_size, self.latent_size],
                "parameters": {
                    "vae": params(vae),
                    "unet": params(unet),
                    "text_encoder": params(self.text_encoder),
                },
                "text_encoder": {
                    "hidden_size": self.text_encoder.config.hidden_size,
                    "context_length": self.tokenizer.model_max_length,
                    "fingerprint": self.identity["text_tower"],
                },
                "scaling_factor": vae_kept["scaling_factor"],
                "sampler": "DPMSolverMultistepScheduler (dpmsolver++, order 2)",
                "pipeline_bytes": size,
                "weights_dtype": "float16",
            },
            "vae": {
                **stage(st.losses["vae"], st.seconds["vae"], cfg.vae_batch_size),
                "reconstruction_psnr_db": round(vae_kept["psnr_db"], 2),
                "latent_stats": vae_kept["latent_stats"],
            },
            "unet": stage(st.losses["unet"], st.seconds["unet"], cfg.batch_size),
            "encode_seconds": round(vae_kept["encode_seconds"], 1),
            "samples": {"file": "samples.png", "prompts": prompts, "seconds": sample_seconds},
            "machine": {
                "cpus": os.cpu_count(),
                "threads": cfg.num_threads,
                "processor": platform.processor() or platform.machine(),
                "torch": torch.__version__,
            },
        }


# ---------------------------------------------------------------------------------- the stages


class _VaeStage(Stage):
    """Stage 1: the autoencoder (L1 + L2 + KL); at its end the corpus latents and SD's
    scaling factor, 1/std of sampled latents of (up to) 4096 corpus images."""

    name = "vae"

    def __init__(self, run: _Run, vae) -> None:
        self.run, self.vae, self.cfg = run, vae, run.cfg
        self.steps = run.cfg.vae_steps
        self.latents: tuple[Tensor, Tensor] | None = None  # what the UNet stage trains on

    def begin(self, live: dict | None, kept: dict[str, dict]) -> None:
        cfg = self.cfg
        self.optimizer = torch.optim.AdamW(
            self.vae.parameters(), lr=cfg.vae_lr, weight_decay=cfg.weight_decay
        )
        if live is not None:
            self.vae.load_state_dict(live["vae"])
            self.optimizer.load_state_dict(live["optimizer"])
        self.vae.train()

    def step(self, k: int) -> tuple[float, dict[str, str]]:
        cfg, vae = self.cfg, self.vae
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.vae_lr * cosine_warmup(k, cfg.vae_warmup_steps, cfg.vae_steps)
        gen = _generator(cfg.seed, 1, k)
        idx = batch_indices(k, len(self.run.images), cfg.vae_batch_size, cfg.seed)
        x = _to_unit(self.run.images[idx])
        posterior = vae.encode(x).latent_dist
        rec = vae.decode(posterior.sample(generator=gen)).sample
        err = rec - x
        loss = err.abs().mean() + err.pow(2).mean()
        loss = loss + cfg.vae_kl_weight * posterior.kl().mean() / (3 * self.run.size**2)
        _step_optimizer(vae.parameters(), self.optimizer, loss, cfg.grad_clip)
        return loss.item(), {"loss": f"{loss.item():.4f}"}

    def state(self) -> dict:
        return {"vae": self.vae.state_dict(), "optimizer": self.optimizer.state_dict()}

    def end(self) -> dict:
        cfg, vae = self.cfg, self.vae
        vae.eval()
        t0 = time.perf_counter()
        mean, std = _encode_corpus(vae, self.run.images, cfg.encode_batch_size)
        k = min(4096, len(mean))
        z = mean[:k] + std[:k] * torch.randn(mean[:k].shape, generator=_generator(cfg.seed, 0, 0))
        seconds = time.perf_counter() - t0
        self.latents = (mean, std)
        return {
            "vae": {k: v.detach().clone() for k, v in vae.state_dict().items()},
            "scaling_factor": float(1.0 / z.std()),
            "latent_stats": {
                "mean": float(z.mean()),
                "std": float(z.std()),
                "posterior_std": float(std.mean()),
            },
            "psnr_db": _psnr(vae, self.run.images[-256:]),
            "encode_seconds": seconds,
        }


class _UnetStage(Stage):
    """Stage 2: the UNet (epsilon or v objective, min-SNR weighting, caption dropout) on the
    frozen VAE's latents, with an EMA of its weights (what is exported)."""

    name = "unet"

    def __init__(self, run: _Run, vae, unet, ema, vae_stage: _VaeStage) -> None:
        self.run, self.cfg = run, run.cfg
        self.vae, self.unet, self.ema, self.vae_stage = vae, unet, ema, vae_stage
        self.steps = run.cfg.steps

    def begin(self, live: dict | None, kept: dict[str, dict]) -> None:
        cfg, unet, ema = self.cfg, self.unet, self.ema
        self.vae.load_state_dict(kept["vae"]["vae"])
        self.vae.eval().requires_grad_(False)
        self.scale = kept["vae"]["scaling_factor"]
        self.latents = self.vae_stage.latents
        if self.latents is None:  # resumed after stage 1: the same latents, re-encoded
            self.latents = _encode_corpus(self.vae, self.run.images, cfg.encode_batch_size)
        self.scheduler = _noise_scheduler(cfg)
        self.optimizer = torch.optim.AdamW(
            unet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay
        )
        if live is not None:
            unet.load_state_dict(live["unet"])
            ema.load_state_dict(live["ema"])
            self.optimizer.load_state_dict(live["optimizer"])
        else:
            ema.load_state_dict(unet.state_dict())
        ema.requires_grad_(False)
        unet.train()

    def step(self, k: int) -> tuple[float, dict[str, str]]:
        cfg, run, unet, scheduler = self.cfg, self.run, self.unet, self.scheduler
        t0 = time.perf_counter()
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.lr * cosine_warmup(k, cfg.warmup_steps, cfg.steps)
        mean, std = self.latents
        gen = _generator(cfg.seed, 2, k)
        idx = batch_indices(k, len(mean), cfg.batch_size, cfg.seed + 1)
        b = len(idx)
        z = (mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=gen)) * self.scale
        drop = torch.rand(b, generator=gen) < cfg.caption_dropout
        ids = torch.where(drop[:, None], run.empty_ids, run.ids[idx])
        noise = torch.randn(z.shape, generator=gen)
        t = torch.randint(0, cfg.train_timesteps, (b,), generator=gen)
        with torch.no_grad():
            cond = run.text_encoder(ids)[0]
        noisy = scheduler.add_noise(z, noise, t)
        eps = cfg.prediction_type == "epsilon"
        target = noise if eps else scheduler.get_velocity(z, noise, t)
        pred = unet(noisy, t, cond).sample
        loss = (pred - target).pow(2).mean(dim=(1, 2, 3))
        if cfg.snr_gamma > 0:  # min-SNR-gamma: w = min(SNR, g) / SNR (eps), / (SNR + 1) (v)
            alphas = scheduler.alphas_cumprod
            snr = alphas[t] / (1 - alphas[t])
            loss = loss * snr.clamp(max=cfg.snr_gamma) / (snr if eps else snr + 1)
        loss = loss.mean()
        _step_optimizer(unet.parameters(), self.optimizer, loss, cfg.grad_clip)
        self._update_ema(k)
        rate = b / (time.perf_counter() - t0)
        return loss.item(), {"loss": f"{loss.item():.4f}", "img_s": f"{rate:.0f}"}

    @torch.no_grad()
    def _update_ema(self, step: int) -> None:
        if self.cfg.ema_decay == 0:
            self.ema.load_state_dict(self.unet.state_dict())
            return
        decay = min(self.cfg.ema_decay, (1 + step) / (10 + step))  # diffusers' EMA warm-up
        for e, p in zip(self.ema.parameters(), self.unet.parameters(), strict=True):
            e.lerp_(p, 1 - decay)

    def state(self) -> dict:
        return {
            "unet": self.unet.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
        }

    def end(self) -> dict:
        return {"ema": {k: v.detach().clone() for k, v in self.ema.state_dict().items()}}
