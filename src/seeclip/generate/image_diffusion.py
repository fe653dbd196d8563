"""Image-space pseudo-unknowns: Stable Diffusion conditioned on perturbed semantic tokens.

METHOD.md "Semantic-guided diffusion", generated once into an offline pool. For each chosen
source image i with semantic tokens v_i [K, d] (in CLIP's joint space):

1. perturb: v~_i = v_i + eps, eps ~ N(0, sigma^2 I), drawn from a seed derived from (seed, i);
2. project each token into SD's text-conditioning space (the text encoder's last hidden states,
   width D = 768 for SD-1.5) with a fixed map, see :func:`token_projection`:
   u_ik = s_i * v~_ik @ P, with P [d, D] a seeded semi-orthogonal matrix and
   s_i = (mean per-token norm of the positive prompt's embedding, BOS excluded) /
   (mean_k ||v_ik @ P||), so the clean tokens have the norm of SD's own text tokens and the
   perturbation keeps its size relative to them;
3. condition on ``[embed("a <domain> of an unknown object"); u_i1..u_iK]`` (77 + K positions;
   the UNet's cross-attention accepts any length) with the negative condition
   ``embed("<known class 1>, <known class 2>, ...")`` extended by K copies of its last position
   so both halves of the classifier-free-guidance batch have the same length, and sample with
   eps' = eps_neg + g (eps_pos - eps_neg), g = 15, 20 steps, latents from a seed derived from
   (seed, i).

The pool is ``out_dir/<domain>/unknown/<i:06d>.png`` plus ``manifest.csv`` (one row per image)
and ``pool.json`` (configuration and a fingerprint of the inputs). Every image depends only on
(seed, i, its tokens, its domain), so an interrupted run resumes where it stopped. diffusers and
transformers are imported lazily: they come with the ``diffusion`` extra.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from seeclip.hub import WeightsUnavailableError

__all__ = [
    "DEFAULT_SD_MODEL",
    "MANIFEST_FIELDS",
    "ImageDiffusionConfig",
    "ImagePool",
    "build_conditioning",
    "build_tiny_pipeline",
    "encode_prompts",
    "generate_image_pool",
    "known_classes_prompt",
    "load_image_pool",
    "load_pipeline",
    "token_projection",
]

DEFAULT_SD_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
POOL_FORMAT = 1
MANIFEST_FIELDS = (
    "path",
    "domain",
    "source",
    "prompt",
    "negative_prompt",
    "seed",
    "sigma",
    "guidance",
    "steps",
    "model",
)
_PLACEMENTS = ("append", "replace_padding")


@dataclass(frozen=True)
class ImageDiffusionConfig:
    """How the image-space generator samples (defaults: the paper's SD-1.5 setting)."""

    model: str = DEFAULT_SD_MODEL  # diffusers repo id (in the local HF cache) or local folder
    prompt: str = "a {domain} of an unknown object"  # positive prompt; {domain} = source domain
    guidance: float = 15.0  # classifier-free guidance scale g
    steps: int = 20  # denoising steps
    sigma: float = 0.2  # std of the Gaussian perturbation of the semantic tokens
    image_size: int | None = None  # output side in px; None = pipeline default (512 for SD-1.5)
    fp16: bool = True  # half precision on CUDA (CPU always runs float32)
    projection_seed: int = 0  # seeds the fixed token projection P
    placement: str = "append"  # "append": 77 + K positions; "replace_padding": last K padding
    batch_size: int = 4  # images per pipeline call (does not change the images)

    def __post_init__(self) -> None:
        if "{domain}" not in self.prompt:
            raise ValueError(f"prompt must contain '{{domain}}', got {self.prompt!r}")
        if self.guidance < 0 or self.steps < 1 or self.sigma < 0 or self.batch_size < 1:
            raise ValueError(
                "need guidance >= 0, steps >= 1, sigma >= 0, batch_size >= 1; got "
                f"{self.guidance}, {self.steps}, {self.sigma}, {self.batch_size}"
            )
        if self.image_size is not None and (self.image_size < 8 or self.image_size % 8):
            raise ValueError(f"image_size must be a multiple of 8, got {self.image_size}")
        if self.placement not in _PLACEMENTS:
            raise ValueError(f"placement must be one of {_PLACEMENTS}, got {self.placement!r}")

    def torch_dtype(self, device: str | torch.device) -> torch.dtype:
        """float16 on CUDA when ``fp16`` is set, else float32."""
        cuda = torch.device(device).type == "cuda"
        return torch.float16 if self.fp16 and cuda else torch.float32


def _diffusers():
    try:
        import diffusers
        import transformers  # noqa: F401  (StableDiffusionPipeline's text side)
    except ImportError as err:
        raise ImportError(
            f"the image-space generator needs diffusers and transformers ({err}); "
            "install them with `pip install 'seeclip[diffusion]'`"
        ) from err
    return diffusers


# --------------------------------------------------------------------- pipelines
def load_pipeline(
    model: str = DEFAULT_SD_MODEL,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
):
    """A ``StableDiffusionPipeline`` from local files only (no download, no safety checker).

    Args:
        model: a diffusers repo id already in the Hugging Face cache, or a local pipeline folder
            (holding ``model_index.json``).
        device: where the pipeline runs.
        dtype: parameter dtype; None means float16 on CUDA, float32 elsewhere.

    Raises:
        WeightsUnavailableError: the weights are not on this machine (fails without network).
    """
    diffusers = _diffusers()
    device = torch.device(device)
    if dtype is None:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    hint = (
        f"SD weights not found locally: download {model} on a connected machine "
        f"(e.g. `hf download {model}`) or pass --sd-model /path"
    )
    local = Path(model).expanduser()
    if local.exists() and not (local / "model_index.json").is_file():
        raise WeightsUnavailableError(f"{hint} ({local} holds no model_index.json)")
    try:
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(
            str(local) if local.exists() else model,
            local_files_only=True,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    except (OSError, ValueError) as err:  # HF's LocalEntryNotFoundError is an OSError
        raise WeightsUnavailableError(f"{hint} ({type(err).__name__}: {err})") from err
    pipe.set_progress_bar_config(disable=True)
    # dtype through .to(): from_pretrained's keyword changed name (torch_dtype -> dtype)
    return pipe.to(device=device, dtype=dtype)


def _tiny_tokenizer():
    """A CLIP BPE tokenizer over single bytes (no merges): 514 ids, built without download."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({f"{c}</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    with tempfile.TemporaryDirectory() as tmp:  # file arguments work in transformers 4 and 5
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n")
        return CLIPTokenizer(
            str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"), model_max_length=77
        )


def build_tiny_pipeline(seed: int = 0):
    """A randomly initialised SD-1.x-shaped pipeline for tests and benchmarks (CPU, ~1.7M params).

    UNet (32, 64) channels with cross-attention width 32, a 2-level VAE (16 px images from 8 px
    latents), a 2-layer CLIP text encoder of width 32 and a byte-level tokenizer; PNDM scheduler
    with SD-1.5's noise schedule. The global RNG is left untouched.
    """
    diffusers = _diffusers()
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = _tiny_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = diffusers.UNet2DConditionModel(
            block_out_channels=(32, 64),
            layers_per_block=1,
            sample_size=8,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
        )
        vae = diffusers.AutoencoderKL(
            block_out_channels=(32, 64),
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            latent_channels=4,
            sample_size=16,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=1000,
                hidden_size=32,
                intermediate_size=37,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=77,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
    scheduler = diffusers.PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.register_to_config(_name_or_path=f"seeclip-tiny-sd-seed{seed}")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _device(pipe) -> torch.device:
    return torch.device(getattr(pipe, "_execution_device", None) or pipe.device)


def _model_name(pipe) -> str:
    return str(getattr(pipe, "name_or_path", None) or "unnamed")


# ------------------------------------------------------------------ conditioning
def encode_prompts(pipe, texts: Sequence[str]) -> Tensor:
    """Prompt embeddings [n, 77, D] exactly as the pipeline makes them (last hidden states)."""
    tok = pipe.tokenizer
    ids = tok(
        list(texts),
        padding="max_length",
        max_length=tok.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    device = _device(pipe)
    with torch.no_grad():
        return pipe.text_encoder(ids.to(device))[0]


def _prompt_lengths(pipe, texts: Sequence[str]) -> list[int]:
    """Number of tokens (BOS and EOS included) of each prompt, before padding."""
    ids = pipe.tokenizer(list(texts), truncation=True).input_ids
    return [len(x) for x in ids]


def token_projection(d: int, width: int, *, seed: int = 0) -> Tensor:
    """The fixed map P [d, width] from CLIP's joint space to SD's text-conditioning space.

    A seeded Gaussian matrix made semi-orthogonal by QR: P P^T = I when d <= width (norms and
    angles between tokens are preserved), P^T P = I otherwise. Float32, on CPU.
    """
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(max(d, width), min(d, width), generator=g, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    q = q * torch.sign(torch.diagonal(r))  # unique QR: signs fixed by R's positive diagonal
    return (q.T if d <= width else q).float().contiguous()


def build_conditioning(
    pipe,
    perturbed: Tensor,
    clean: Tensor,
    domains: Sequence[str],
    negative_prompt: str,
    *,
    cfg: ImageDiffusionConfig,
    projection: Tensor,
) -> tuple[Tensor, Tensor]:
    """(prompt_embeds, negative_prompt_embeds) [B, L, D] for B perturbed token sets [B, K, d].

    L = 77 + K with ``placement="append"`` (the negative is extended by K copies of its last
    position), L = 77 with ``"replace_padding"`` (the last K padding positions of the positive
    are replaced; the negative is SD's usual one). ``clean`` [B, K, d] fixes the norm scale.
    """
    b, k, _ = perturbed.shape
    prompts = [_prompt(cfg, d) for d in domains]
    unique = sorted(set(prompts))
    table = encode_prompts(pipe, unique)
    pos = table[[unique.index(p) for p in prompts]]  # [B, 77, D]
    neg = encode_prompts(pipe, [negative_prompt]).expand(b, -1, -1)
    # Norm matching: the clean tokens get the mean per-token norm of their prompt (BOS left out,
    # its hidden state is an outlier in SD's text encoder).
    target = pos[:, 1:].float().norm(dim=-1).mean(dim=1)  # [B]
    p = projection.to(pos.device)
    u = perturbed.to(pos.device).float() @ p  # [B, K, D]
    base = (clean.to(pos.device).float() @ p).norm(dim=-1).mean(dim=1)  # [B]
    u = u * (target / base.clamp_min(1e-12))[:, None, None]
    u = u.to(pos.dtype)
    if cfg.placement == "append":
        pos = torch.cat([pos, u], dim=1)
        neg = torch.cat([neg, neg[:, -1:].expand(-1, k, -1)], dim=1)
    else:
        room = pipe.tokenizer.model_max_length - max(_prompt_lengths(pipe, unique))
        if k > room:
            raise ValueError(f"replace_padding: the prompt leaves {room} padding slots < K={k}")
        pos = torch.cat([pos[:, : pos.shape[1] - k], u], dim=1)
    return pos, neg.contiguous()


def _prompt(cfg: ImageDiffusionConfig, domain: str) -> str:
    return cfg.prompt.format(domain=domain.replace("_", " "))


def known_classes_prompt(class_names: Sequence[str]) -> str:
    """The known class names as one negative prompt: "dog, elephant, giraffe"."""
    return ", ".join(c.replace("_", " ") for c in class_names)


def _derive_seed(seed: int, i: int, stream: str) -> int:
    digest = hashlib.sha256(f"{seed}\0{i}\0{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


# ------------------------------------------------------------------------- pool
@dataclass(frozen=True)
class ImagePool:
    """A generated pool: image paths relative to ``root`` (feed them to the feature cache)."""

    root: Path
    paths: tuple[str, ...]
    domains: tuple[str, ...]
    sources: tuple[str, ...]  # id of the source image each pseudo-unknown was derived from


def load_image_pool(manifest: Path | str) -> ImagePool:
    """Reads a pool's ``manifest.csv`` (or the folder holding it)."""
    path = Path(manifest)
    path = path / "manifest.csv" if path.is_dir() else path
    if not path.is_file():
        raise FileNotFoundError(f"no image pool manifest at {path}; run `seeclip generate` first")
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    return ImagePool(
        path.parent,
        tuple(r["path"] for r in rows),
        tuple(r["domain"] for r in rows),
        tuple(r["source"] for r in rows),
    )


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _fingerprint(pipe, tokens: Tensor, domains, sources, negative: str, cfg, seed: int) -> str:
    h = hashlib.sha256()
    h.update(tokens.detach().float().cpu().contiguous().numpy().tobytes())
    settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "batch_size"}
    blob = [list(tokens.shape), list(domains), list(sources), negative, settings, seed]
    h.update(json.dumps([blob, _model_name(pipe)], sort_keys=True).encode())
    return h.hexdigest()


def generate_image_pool(
    pipe,
    semantic_tokens: Tensor,
    domains: Sequence[str],
    source_ids: Sequence[str],
    known_class_names: Sequence[str],
    *,
    out_dir: Path | str,
    cfg: ImageDiffusionConfig | None = None,
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Generates one pseudo-unknown image per row of ``semantic_tokens``; returns the manifest.

    Args:
        pipe: a ``StableDiffusionPipeline`` (:func:`load_pipeline`, :func:`build_tiny_pipeline`).
        semantic_tokens: clean semantic tokens [n, K, d] of n source images (CLIP joint space).
        domains: source domain of each row (fills the positive prompt; the image's domain).
        source_ids: id of each row's source image (e.g. its manifest path), recorded only.
        known_class_names: the known classes, joined into the negative prompt.
        out_dir: the pool folder; an unfinished pool with the same inputs is resumed.
        cfg: sampling settings (None: the defaults).
        seed: row i uses seeds derived from (seed, i) for its perturbation and its latents.
        overwrite: replace a pool in ``out_dir`` that was made from other inputs.
        progress: show a tqdm bar.

    Returns:
        ``out_dir / "manifest.csv"`` with columns :data:`MANIFEST_FIELDS`, written last.
    """
    cfg = cfg if cfg is not None else ImageDiffusionConfig()
    tokens = semantic_tokens.detach().float().cpu()
    n = tokens.shape[0]
    if tokens.dim() != 3 or tokens.shape[1] < 1:
        raise ValueError(f"semantic_tokens must be [n, K >= 1, d], got {tuple(tokens.shape)}")
    if len(domains) != n or len(source_ids) != n:
        raise ValueError(f"{n} token rows but {len(domains)} domains, {len(source_ids)} sources")
    if not known_class_names:
        raise ValueError("known_class_names is empty: the negative prompt needs the known classes")
    out = Path(out_dir)
    negative = known_classes_prompt(known_class_names)
    fingerprint = _fingerprint(pipe, tokens, domains, source_ids, negative, cfg, seed)
    manifest = out / "manifest.csv"
    _claim(out, fingerprint, overwrite, _pool_meta(pipe, tokens, cfg, seed, negative, fingerprint))
    if manifest.is_file():
        return manifest

    model = _model_name(pipe)
    projection = token_projection(
        tokens.shape[2], pipe.text_encoder.config.hidden_size, seed=cfg.projection_seed
    )
    rel = [f"{d}/unknown/{i:06d}.png" for i, d in enumerate(domains)]
    todo = [i for i in range(n) if not (out / rel[i]).is_file()]
    device = _device(pipe)
    size = cfg.image_size
    for d in sorted(set(domains)):
        (out / d / "unknown").mkdir(parents=True, exist_ok=True)
    with tqdm(
        total=n, initial=n - len(todo), desc="generating", unit="img", disable=not progress
    ) as bar:
        for start in range(0, len(todo), cfg.batch_size):
            batch = todo[start : start + cfg.batch_size]
            clean = tokens[batch]
            noise = torch.stack(
                [
                    torch.randn(
                        clean.shape[1:],
                        generator=torch.Generator().manual_seed(_derive_seed(seed, i, "tokens")),
                    )
                    for i in batch
                ]
            )
            pos, neg = build_conditioning(
                pipe,
                clean + cfg.sigma * noise,
                clean,
                [domains[i] for i in batch],
                negative,
                cfg=cfg,
                projection=projection,
            )
            generators = [
                torch.Generator(device).manual_seed(_derive_seed(seed, i, "latents")) for i in batch
            ]
            images = pipe(
                prompt_embeds=pos,
                negative_prompt_embeds=neg,
                guidance_scale=cfg.guidance,
                num_inference_steps=cfg.steps,
                height=size,
                width=size,
                generator=generators,
            ).images
            for i, image in zip(batch, images, strict=True):
                buf = io.BytesIO()
                image.save(buf, format="PNG")
                _write_atomic(out / rel[i], buf.getvalue())
            bar.update(len(batch))

    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(MANIFEST_FIELDS)
    for i in range(n):
        row = (rel[i], domains[i], source_ids[i], _prompt(cfg, domains[i]), negative)
        writer.writerow(
            (*row, _derive_seed(seed, i, "latents"), cfg.sigma, cfg.guidance, cfg.steps, model)
        )
    _write_atomic(manifest, text.getvalue().encode())
    return manifest


def _pool_meta(pipe, tokens: Tensor, cfg, seed: int, negative: str, fingerprint: str) -> dict:
    norm = float(tokens.norm(dim=-1).mean())
    return {
        "format": POOL_FORMAT,
        "fingerprint": fingerprint,
        "model": _model_name(pipe),
        "seed": seed,
        "n": int(tokens.shape[0]),
        "tokens": {"k": int(tokens.shape[1]), "d": int(tokens.shape[2]), "mean_norm": norm},
        # ||sigma * eps|| / ||v|| on average: how far the perturbation moves a token
        "noise_to_signal": cfg.sigma * tokens.shape[2] ** 0.5 / max(norm, 1e-12),
        "conditioning_width": int(pipe.text_encoder.config.hidden_size),
        "negative_prompt": negative,
        "config": dataclasses.asdict(cfg),
        "projection": "seeded semi-orthogonal d->D map, norm-matched to the prompt's tokens",
    }


def _claim(out: Path, fingerprint: str, overwrite: bool, meta: dict[str, Any]) -> None:
    """Makes ``out`` this pool's folder: new, resumed (same inputs), or replaced (overwrite)."""
    sidecar = out / "pool.json"
    if sidecar.is_file():
        old = json.loads(sidecar.read_text()).get("fingerprint")
        if old == fingerprint:
            return
        if not overwrite:
            raise FileExistsError(
                f"{out} holds a pool made from other inputs or settings; choose another "
                "folder or pass overwrite=True (--overwrite) to replace it"
            )
        shutil.rmtree(out)
    elif out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not an image pool; choose an empty folder")
    out.mkdir(parents=True, exist_ok=True)
    _write_atomic(sidecar, (json.dumps(meta, indent=1) + "\n").encode())
