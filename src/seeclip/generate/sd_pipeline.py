"""Stable Diffusion pipelines for the image-space generator: settings, loading, prompt encoding.

diffusers and transformers are imported lazily: they come with the ``diffusion`` extra.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from seeclip.hub import WeightsUnavailableError

__all__ = [
    "DEFAULT_SD_MODEL",
    "SHIPPED_SD_MODELS",
    "ImageDiffusionConfig",
    "encode_prompts",
    "load_pipeline",
    "pipeline_device",
    "pipeline_name",
    "prompt_lengths",
]

DEFAULT_SD_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
# text-to-image models that ship with seeclip (diffusers pipeline folders), by name
SHIPPED_SD_MODELS = {"tiny-glyphs-sd": Path(__file__).parents[1] / "weights" / "tiny-glyphs-sd"}
_PLACEMENTS = ("append", "replace_padding")
_PROJECTIONS = ("random", "text_inverse")


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
    # how tokens enter the text conditioning: "random" (a seeded semi-orthogonal map P) or
    # "text_inverse" (the pseudo-inverse of the backbone's text projection; needs a pipeline
    # whose text encoder is the backbone's own text tower, e.g. tiny-glyphs-sd with tiny-glyphs)
    projection: str = "random"
    projection_seed: int = 0  # seeds the fixed token projection P ("random")
    placement: str = "append"  # "append": 77 + K positions; "replace_padding": last K padding
    batch_size: int = 4  # images per pipeline call (does not change the images)
    # 1.0: text-to-image from pure noise (the paper's). Below 1: SDEdit, each sample starts from
    # its source image noised to this share of the schedule, so it keeps the source's layout
    strength: float = 1.0

    def __post_init__(self) -> None:
        if "{domain}" not in self.prompt:
            raise ValueError(f"prompt must contain '{{domain}}', got {self.prompt!r}")
        if self.guidance < 0 or self.steps < 1 or self.sigma < 0 or self.batch_size < 1:
            raise ValueError(
                "need guidance >= 0, steps >= 1, sigma >= 0, batch_size >= 1; got "
                f"{self.guidance}, {self.steps}, {self.sigma}, {self.batch_size}"
            )
        if not 0.0 < self.strength <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {self.strength}")
        if self.image_size is not None and (self.image_size < 8 or self.image_size % 8):
            raise ValueError(f"image_size must be a multiple of 8, got {self.image_size}")
        if self.placement not in _PLACEMENTS:
            raise ValueError(f"placement must be one of {_PLACEMENTS}, got {self.placement!r}")
        if self.projection not in _PROJECTIONS:
            raise ValueError(f"projection must be one of {_PROJECTIONS}, got {self.projection!r}")

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


PIPELINE_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def _fix(model: str) -> str:
    return (
        f"point train.sd_model (generate: --sd-model) at a local diffusers folder, or download "
        f"{model} on a connected machine (`hf download {model}`) into the Hugging Face cache; "
        f"{LIGHTER}"
    )


# what a run can use instead when no text-to-image weights are at hand
LIGHTER = (
    "without SD weights, train.pseudo_unknowns=diffusion (feature space) is the lighter option"
)


def locate_pipeline(model: str) -> tuple[str, str | None]:
    """Where ``model`` is on this machine, checked without loading it: (what to load, the
    shipped name or None). Raises :class:`WeightsUnavailableError` naming the fix, so a run can
    stop before it reads any data."""
    if model in SHIPPED_SD_MODELS:
        folder = SHIPPED_SD_MODELS[model]
        if not (folder / "model_index.json").is_file():
            raise WeightsUnavailableError(
                f"{model}: the shipped pipeline {folder} is missing; reinstall seeclip or train "
                f"it with `seeclip pretrain-diffusion --world glyphs --out DIR` and point "
                f"train.sd_model at DIR/pipeline"
            )
        return str(folder), model
    local = Path(model).expanduser()
    if local.exists() or local.is_absolute() or model.startswith((".", "~")):
        missing = [p for p in PIPELINE_PARTS if not (local / p).is_dir()]
        if not local.is_dir():
            why = "no such folder"
        elif not (local / "model_index.json").is_file():
            why = "it holds no model_index.json"
        elif missing:
            why = f"it has no {', '.join(f'{p}/' for p in missing)}"
        else:
            check_parts(local)
            return str(local), None
        raise WeightsUnavailableError(
            f"no Stable Diffusion pipeline at {local} ({why}): point train.sd_model (generate: "
            f"--sd-model) at a diffusers folder with model_index.json and "
            f"{', '.join(f'{p}/' for p in PIPELINE_PARTS)}; {LIGHTER}"
        )
    from seeclip.hub import cached_hf_file, hf_cache_dir

    index = cached_hf_file(model, ["model_index.json"])
    if index is None:
        raise WeightsUnavailableError(
            f"SD weights not found locally: {model} is not in the Hugging Face cache "
            f"({hf_cache_dir()}); {_fix(model)}"
        )
    check_parts(Path(index).parent)
    return model, None


def check_parts(folder: Path) -> None:
    """The components of a diffusers folder belong together, read from their config files
    without loading a weight: the tokenizer's vocabulary and length fit the text encoder, and
    the UNet cross-attends at the text encoder's width. Raises one line naming the fix."""
    import json

    def config(*parts: str) -> dict:
        path = folder.joinpath(*parts)
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise WeightsUnavailableError(
                f"{path}: unreadable ({type(err).__name__}); copy the model's own "
                f"{parts[0]}/ folder into {folder}"
            ) from err

    text = config("text_encoder", "config.json")
    unet = config("unet", "config.json")
    width, vocab = text.get("hidden_size"), text.get("vocab_size")
    if unet.get("cross_attention_dim") != width:
        raise WeightsUnavailableError(
            f"{folder}: unet/ cross-attends at width {unet.get('cross_attention_dim')} but "
            f"text_encoder/ gives {width}: the two come from different models; use the "
            f"text_encoder/ of the UNet's own model"
        )
    if (folder / "tokenizer" / "vocab.json").is_file():  # a slow (BPE files) tokenizer
        tokens = len(config("tokenizer", "vocab.json"))
    else:  # a fast one: its vocabulary lives in tokenizer.json
        tokens = len(config("tokenizer", "tokenizer.json").get("model", {}).get("vocab", {}))
    length = config("tokenizer", "tokenizer_config.json").get("model_max_length", 0)
    positions = text.get("max_position_embeddings", 0)
    if vocab is not None and tokens > vocab or length > positions:
        raise WeightsUnavailableError(
            f"{folder}: tokenizer/ ({tokens} tokens, length {length}) does not match "
            f"text_encoder/ ({vocab} token embeddings, {positions} positions): copy the "
            f"text encoder's own tokenizer/ folder"
        )


class _loading_bars:
    """Within it, diffusers' and transformers' loading bars are off unless ``progress``."""

    def __init__(self, progress: bool) -> None:
        self.progress = progress

    def __enter__(self):
        if not self.progress:
            import diffusers.utils.logging as dlog
            import transformers.utils.logging as tlog

            self._was = (dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled())
            dlog.disable_progress_bar()
            tlog.disable_progress_bar()
        return self

    def __exit__(self, *exc) -> None:
        if not self.progress:
            import diffusers.utils.logging as dlog
            import transformers.utils.logging as tlog

            if self._was[0]:
                dlog.enable_progress_bar()
            if self._was[1]:
                tlog.enable_progress_bar()


def load_pipeline(
    model: str = DEFAULT_SD_MODEL,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    progress: bool = True,
):
    """A ``StableDiffusionPipeline`` from local files only (no download, no safety checker).

    Args:
        model: a shipped name (:data:`SHIPPED_SD_MODELS`, e.g. ``tiny-glyphs-sd``), a diffusers
            repo id already in the Hugging Face cache, or a local pipeline folder (holding
            ``model_index.json``).
        device: where the pipeline runs.
        dtype: parameter dtype; None means float16 on CUDA, float32 elsewhere.
        progress: False silences the diffusers and transformers loading bars.

    Raises:
        WeightsUnavailableError: the weights are not on this machine (fails without network).
    """
    source, shipped = locate_pipeline(model)
    diffusers = _diffusers()
    device = torch.device(device)
    if dtype is None:
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    try:
        with _loading_bars(progress):
            pipe = diffusers.StableDiffusionPipeline.from_pretrained(
                source,
                local_files_only=True,
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
                # accelerate's low-memory loading when it is installed; without it diffusers
                # falls back to the same False after a warning on every load (one per run)
                low_cpu_mem_usage=importlib.util.find_spec("accelerate") is not None,
            )
    except (OSError, ValueError) as err:  # HF's LocalEntryNotFoundError is an OSError
        raise WeightsUnavailableError(
            f"could not load the SD pipeline {model} ({type(err).__name__}: {err}); {_fix(model)}"
        ) from err
    pipe.set_progress_bar_config(disable=True)
    if shipped:  # its name, not the install folder: pools stay valid when the package moves
        pipe._seeclip_name = shipped
    # dtype through .to(): from_pretrained's keyword changed name (torch_dtype -> dtype). Its
    # warning on every cast (naming no module to keep in float32 here) is silenced.
    verbosity = diffusers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_error()
    try:
        return pipe.to(device=device, dtype=dtype)
    finally:
        diffusers.utils.logging.set_verbosity(verbosity)


def pipeline_device(pipe) -> torch.device:
    """The device the pipeline executes on."""
    return torch.device(getattr(pipe, "_execution_device", None) or pipe.device)


def pipeline_name(pipe) -> str:
    """The pipeline's model name (shipped name, repo id or folder), recorded in a pool's files."""
    return str(
        getattr(pipe, "_seeclip_name", None) or getattr(pipe, "name_or_path", None) or "unnamed"
    )


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
    device = pipeline_device(pipe)
    with torch.no_grad():
        return pipe.text_encoder(ids.to(device))[0]


def prompt_lengths(pipe, texts: Sequence[str]) -> list[int]:
    """Number of tokens (BOS and EOS included) of each prompt, before padding."""
    ids = pipe.tokenizer(list(texts), truncation=True).input_ids
    return [len(x) for x in ids]
