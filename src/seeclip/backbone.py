"""A frozen open_clip CLIP with the three readings SeeCLIP needs.

1. ``encode_image`` -> the normalised global embedding and the spatial tokens in the joint space
   (ViT: patch tokens after ``ln_post`` and ``proj``; ModifiedResNet: the MaskCLIP reading of the
   last feature map through the attention pool's value and output projections).
2. ``embed_tokens`` + ``encode_text_embeddings`` -> text features from token *embeddings*, so that
   learned vectors can be spliced into prompts; the transformer runs only up to the batch's
   longest prompt, which is exact under the causal mask.
3. ``logit_scale`` -> CLIP's temperature (tau in docs/method.md).
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import hashlib
import logging
import os
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from open_clip.modified_resnet import ModifiedResNet
from open_clip.transformer import QuickGELU, ResidualAttentionBlock, VisionTransformer
from torch import Tensor, nn

from seeclip import hub
from seeclip.hub import WeightsUnavailableError
from seeclip.io import UnreadableFileError, load_checkpoint, load_tensors
from seeclip.registry import Registry
from seeclip.zoo import tiny_clip

__all__ = [
    "BACKBONES",
    "Backbone",
    "BackboneSpec",
    "WeightsUnavailableError",
    "build_backbone",
    "list_backbones",
]

_CONFIG_DIR = Path(__file__).parent / "model_configs"
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors")


@dataclass(frozen=True)
class BackboneSpec:
    """A backbone shipped with seeclip (its open_clip config lives in ``model_configs/``)."""

    name: str  # what users type, e.g. "tiny-vit"
    arch: str  # open_clip architecture name
    description: str  # one line for `seeclip list`
    surgery: Callable[[nn.Module], nn.Module] | None = None  # applied before weights load
    weights: Path | None = None  # shipped checkpoint used when no --pretrained is given


BACKBONES: Registry[BackboneSpec] = Registry("backbone")
BACKBONES.add(
    "tiny-vit",
    BackboneSpec(
        "tiny-vit", "tiny-vit", "ViT, 32px, 8px patches (16 tokens), d=64; random weights"
    ),
)
BACKBONES.add(
    "tiny-rn",
    BackboneSpec("tiny-rn", "tiny-rn", "ModifiedResNet, 64px (2x2=4 tokens), d=64; random weights"),
)
BACKBONES.add(
    "tiny-digits",
    BackboneSpec(
        "tiny-digits",
        tiny_clip.ARCH,
        "CLIP pretrained by seeclip on its digits corpus (shipped; ResNet OS8, 32px, 16 tokens, "
        "d=128); the default of the demo and the digits preset",
        surgery=tiny_clip.output_stride8,
        weights=tiny_clip.TINY_DIGITS_WEIGHTS,
    ),
)
BACKBONES.add(
    "tiny-glyphs",
    BackboneSpec(
        "tiny-glyphs",
        "tiny-glyphs",
        "CLIP pretrained by seeclip on its glyphs corpus (shipped; ResNet OS8, 48px, 36 tokens, "
        "d=128); the default of the glyphs preset",
        surgery=functools.partial(tiny_clip.output_stride8, pooled_query=True),
        weights=tiny_clip.TINY_MODELS["tiny-glyphs"].weights,
    ),
)
BACKBONES.add(
    "tiny-glyphs-random",
    BackboneSpec(
        "tiny-glyphs-random",
        "tiny-glyphs",
        "the tiny-glyphs architecture with random weights (the no-pretraining reference)",
        surgery=functools.partial(tiny_clip.output_stride8, pooled_query=True),
    ),
)
BACKBONES.add(
    "tiny-digits-random",
    BackboneSpec(
        "tiny-digits-random",
        tiny_clip.ARCH,
        "the tiny-digits architecture with random weights (the no-pretraining reference)",
        surgery=tiny_clip.output_stride8,
    ),
)


def has_weights(name: str, pretrained: str | None) -> bool:
    """False when :func:`build_backbone` would draw ``name``'s weights at random."""
    if pretrained is not None or name.startswith("hf-hub:"):
        return True
    spec = BACKBONES.get(name) if name in BACKBONES else None
    return spec is not None and spec.weights is not None


def list_backbones() -> list[tuple[str, str]]:
    """(name, one-line description) pairs for `seeclip list`."""
    rows = [(name, spec.description) for name, spec in BACKBONES.items()]
    rows.append(
        (
            "<open_clip name>",
            "any open_clip architecture (e.g. ViT-B-16 with --pretrained openai, RN50) "
            "or hf-hub:org/repo; --pretrained also takes a local checkpoint file",
        )
    )
    return rows


@functools.cache
def _register_configs() -> None:
    open_clip.add_model_config(_CONFIG_DIR)


class Backbone(nn.Module):
    """A frozen open_clip CLIP with the three readings SeeCLIP needs.

    Attributes:
        name: what was asked for (a shipped name, an open_clip name or ``hf-hub:org/repo``).
        arch: the open_clip architecture that was built.
        pretrained: the weights loaded (tag or checkpoint path); None means random weights.
        model: the open_clip CLIP (frozen, always in eval mode).
        preprocess: open_clip's eval transform (PIL image -> normalised tensor).
        tokenizer: open_clip's tokenizer for this model.
    """

    def __init__(
        self,
        model: nn.Module,
        preprocess,
        tokenizer,
        *,
        name: str,
        arch: str,
        pretrained: str | None,
    ) -> None:
        super().__init__()
        self.name, self.arch, self.pretrained = name, arch, pretrained
        self.model = model
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        model.requires_grad_(False)
        model.eval()

        text = _text_parts(model)  # validates the text tower once
        visual = model.visual
        if isinstance(visual, VisionTransformer):
            _check_vit(visual)
            size = visual.image_size
            self.num_patches = visual.grid_size[0] * visual.grid_size[1]
        elif isinstance(visual, ModifiedResNet):
            size = visual.image_size
            self.num_patches = visual.attnpool.positional_embedding.shape[0] - 1  # H*W (+1 mean)
        else:
            raise TypeError(
                f"{arch}: image tower {type(visual).__name__} has no spatial-token reading; "
                "seeclip supports open_clip VisionTransformer and ModifiedResNet towers"
            )
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.embed_dim = int(visual.output_dim)
        self.text_width = int(text.token_embedding.embedding_dim)
        self.context_length = int(
            getattr(tokenizer, "context_length", text.positional_embedding.shape[0])
        )

    def train(self, mode: bool = True) -> Backbone:
        """Keeps the wrapped CLIP in eval mode whatever the parent module does."""
        super().train(mode)
        self.model.eval()
        return self

    @property
    def _text(self) -> _TextParts:
        # Resolved on each use: .to(device) replaces buffers such as the causal mask.
        return _text_parts(self.model)

    @property
    def text_tower(self) -> _TextParts:
        """The text tower's parts (embeddings, transformer blocks, causal mask, ln_final,
        projection), for code that runs it block by block
        (:mod:`seeclip.methods.shared_prefix`)."""
        return self._text

    @property
    def text_projection(self) -> Tensor | None:
        """The text tower's projection W [width, d] (final hidden state -> joint space), or None.

        A bias, where a tower has one, is left out.
        """
        w = self._text.text_projection
        return w.weight.T if isinstance(w, nn.Linear) else w

    @property
    def token_table(self) -> Tensor:
        """The text tower's token embedding table [vocab, width]."""
        return self._text.token_embedding.weight

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def logit_scale(self) -> float:
        """CLIP's learned temperature, exp(logit_scale) (about 100 for trained models)."""
        return float(self.model.logit_scale.detach().exp().reshape(-1)[0])

    @functools.cached_property
    def fingerprint(self) -> str:
        """sha256 over the architecture, the activation and every state_dict tensor's bytes."""
        h = hashlib.sha256()
        quick = any(isinstance(m, QuickGELU) for m in self.model.modules())
        h.update(f"{self.arch}|quick_gelu={quick}".encode())
        for key, value in sorted(self.model.state_dict().items()):
            t = value.detach().cpu().contiguous()
            h.update(f"{key}|{t.dtype}|{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    # ----------------------------------------------------------------- image
    def encode_image(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Global feature (L2-normalised) [B, d] and spatial tokens (not normalised) [B, N, d]."""
        visual = self.model.visual
        images = images.to(self.device)
        if isinstance(visual, VisionTransformer):
            # forward() returns (pooled @ proj, tokens) with output_tokens set; tokens are the
            # CLS-free patch tokens after ln_post but before proj.
            visual.output_tokens = True
            try:
                pooled, tokens = visual(images)
            finally:
                visual.output_tokens = False
            if visual.final_ln_after_pool:
                tokens = visual.ln_post(tokens)
            tokens = tokens @ visual.proj
        else:
            pooled, tokens = tiny_clip.resnet_tokens(visual, images)  # MaskCLIP tokens
        return F.normalize(pooled, dim=-1), tokens

    # ------------------------------------------------------------------ text
    def tokenize(self, texts: Sequence[str]) -> Tensor:
        """Token ids [n, context_length] (long, on CPU)."""
        if isinstance(texts, str):
            texts = [texts]
        return self.tokenizer(list(texts)).long()

    def eot_index(self, ids: Tensor) -> Tensor:
        """Position of each prompt's end token, as this model's text pooling finds it."""
        if self._text.pool_type == "eos":
            return (ids == self._text.eos_id).int().argmax(dim=-1)
        return ids.argmax(dim=-1)  # 'argmax': the EOT id is the largest in the vocabulary

    def embed_tokens(self, ids: Tensor) -> Tensor:
        """Token embeddings [n, L, text_width] (before positional embeddings)."""
        return self._text.token_embedding(ids.to(self.device))

    def encode_text_embeddings(
        self, embeds: Tensor, eot_index: Tensor, *, truncate: bool = True
    ) -> Tensor:
        """Text features [n, d] (not normalised) from token embeddings [n, L, text_width].

        With ``truncate`` the transformer sees only the first ``max(eot_index) + 1`` positions:
        under the causal mask no position before an end token attends past it, so this is exact.
        """
        text = self._text
        cast = text.transformer.get_cast_dtype()
        eot_index = eot_index.to(embeds.device).long()
        length = int(eot_index.max()) + 1 if truncate else embeds.shape[1]
        x = embeds[:, :length].to(cast) + text.positional_embedding[:length].to(cast)
        mask = text.attn_mask[:length, :length]
        blocks = text.transformer.resblocks
        if _eot_only_ok(text.transformer):
            # The last block only at the end token, the one position read out: its keys and
            # values still come from every position, so this is exact, and it saves that
            # block's attention queries and MLP on the other L - 1 positions.
            for block in blocks[:-1]:
                x = block(x, attn_mask=mask)
            x = _last_block_at(blocks[-1], x, eot_index)
            x = text.ln_final(x)
        else:
            x = text.transformer(x, attn_mask=mask)  # NLD in and out
            x = text.ln_final(x)
            x = x[torch.arange(x.shape[0], device=x.device), eot_index]
        proj = text.text_projection
        if proj is None:
            return x
        return proj(x) if isinstance(proj, nn.Linear) else x @ proj

    def encode_text(self, texts: Sequence[str], *, normalize: bool = True) -> Tensor:
        """Text features [n, d] of plain prompts."""
        ids = self.tokenize(texts).to(self.device)
        feats = self.encode_text_embeddings(self.embed_tokens(ids), self.eot_index(ids))
        return F.normalize(feats, dim=-1) if normalize else feats


# Run the text tower's last block at the end token only (exact; benchmarks/seeclip_scaling.py
# measures it against the whole block by switching this off).
EOT_ONLY_LAST_BLOCK = True


def _eot_only_ok(transformer: nn.Module) -> bool:
    """Whether the last block can run at the end token alone: open_clip's batch-first
    transformer of plain self-attention blocks, without gradient checkpointing."""
    blocks = getattr(transformer, "resblocks", None)
    return (
        EOT_ONLY_LAST_BLOCK
        and blocks is not None
        and len(blocks) > 0
        and getattr(transformer, "batch_first", False)
        and not getattr(transformer, "grad_checkpointing", False)
        and isinstance(blocks[-1], ResidualAttentionBlock)
        and not hasattr(blocks[-1], "ln_1_kv")
        and isinstance(blocks[-1].attn, nn.MultiheadAttention)
    )


def _last_block_at(block: nn.Module, x: Tensor, eot_index: Tensor) -> Tensor:
    """``block`` (a ResidualAttentionBlock) evaluated at position ``eot_index[i]`` of each row:
    [N, L, w] -> [N, w]. The query attends to positions <= its end token, as under the causal
    mask."""
    n, length, _ = x.shape
    rows = torch.arange(n, device=x.device)
    q = x[rows, eot_index].unsqueeze(1)  # [N, 1, w]
    kv = block.ln_1(x)
    future = torch.arange(length, device=x.device)[None, :] > eot_index[:, None]  # [N, L]
    mask = torch.zeros(n, length, dtype=x.dtype, device=x.device)
    mask = mask.masked_fill(future, float("-inf"))
    mask = mask.repeat_interleave(block.attn.num_heads, dim=0).unsqueeze(1)  # [N * h, 1, L]
    out = block.attn(block.ln_1(q), kv, kv, need_weights=False, attn_mask=mask)[0]
    q = q + block.ls_1(out)
    q = q + block.ls_2(block.mlp(block.ln_2(q)))
    return q[:, 0]


@dataclass
class _TextParts:
    """The text tower's pieces, wherever this open_clip model class keeps them."""

    token_embedding: nn.Embedding
    positional_embedding: Tensor
    transformer: nn.Module
    ln_final: nn.Module
    text_projection: Tensor | nn.Linear | None
    attn_mask: Tensor
    pool_type: str
    eos_id: int | None


def _text_parts(model: nn.Module) -> _TextParts:
    # CLIP keeps the text tower's parts on the model; CustomTextCLIP keeps a TextTransformer.
    tower = getattr(model, "text", model)
    kind = type(tower).__name__
    if not hasattr(tower, "token_embedding"):
        raise TypeError(f"text tower {kind} exposes no token embeddings; prompt learning needs one")
    if getattr(tower, "cls_emb", None) is not None:
        raise TypeError(f"text tower {kind} appends a CLS embedding (CoCa); not supported")
    pool = getattr(tower, "text_pool_type", None) or getattr(tower, "pool_type", "argmax")
    if pool not in ("argmax", "eos"):
        raise TypeError(f"text tower {kind} pools with {pool!r}; seeclip needs 'argmax' or 'eos'")
    if getattr(tower, "attn_mask", None) is None:
        raise TypeError(f"text tower {kind} has no causal mask; seeclip needs a causal text tower")
    return _TextParts(
        token_embedding=tower.token_embedding,
        positional_embedding=tower.positional_embedding,
        transformer=tower.transformer,
        ln_final=tower.ln_final,
        text_projection=tower.text_projection,
        attn_mask=tower.attn_mask,
        pool_type=pool,
        eos_id=getattr(tower, "text_eos_id", getattr(tower, "eos_id", None)),
    )


def _check_vit(visual: VisionTransformer) -> None:
    if visual.attn_pool is not None or visual.pool_type not in ("tok", "avg"):
        raise TypeError(
            "VisionTransformer with attentional pooling or pool_type 'none' has no patch-token "
            "reading; seeclip needs a CLS ('tok') or average-pooled ViT"
        )
    if visual.proj is None:
        raise TypeError("VisionTransformer has no output projection (proj is None)")


# ---------------------------------------------------------------------- building
def build_backbone(
    name: str, *, pretrained: str | None = None, device: str | torch.device = "cpu", seed: int = 0
) -> Backbone:
    """Builds a frozen backbone.

    Args:
        name: a shipped name (see ``BACKBONES``), any open_clip architecture ("ViT-B-16",
            "RN50") or "hf-hub:org/repo".
        pretrained: None for random weights (seeded by ``seed``), an open_clip pretrained tag
            ("openai", "laion2b_s34b_b88k") or a local checkpoint file (.pt/.pth/.bin/
            .safetensors holding a state_dict or {"state_dict": ...}, "module." prefixes of a
            DDP save removed). For OpenAI weights in a local file use the "-quickgelu"
            architecture (e.g. "ViT-B-16-quickgelu"); their original TorchScript files are
            refused with the one-line command that converts them to a state_dict.
        device: where the model lives.
        seed: seeds the random initialisation (the global RNG is left untouched).

    Raises:
        WeightsUnavailableError: the weights are neither cached nor downloadable (fails in
            seconds when offline).
        ValueError: unknown architecture or pretrained tag; checkpoint does not fit the arch.
    """
    _register_configs()
    spec = BACKBONES.get(name) if name in BACKBONES else None
    arch = spec.arch if spec else name
    if spec is not None and spec.weights is not None and pretrained is None:
        if not spec.weights.is_file():
            raise WeightsUnavailableError(
                f"{name}: shipped weights {spec.weights} are missing from this installation; "
                f"reinstall seeclip or train them with `seeclip pretrain-clip --world "
                f"{name.removeprefix('tiny-')} --out DIR` and pass "
                f"--pretrained DIR/{name}.safetensors"
            )
        pretrained = str(spec.weights)
    source = arch  # what open_clip builds from: the arch, or a cached hf-hub snapshot
    kwargs: dict = {"device": device}
    checkpoint = None
    if arch.startswith("hf-hub:"):
        if pretrained is not None:
            raise ValueError(f"{name}: an hf-hub: name brings its own weights; drop --pretrained")
        source = hub.resolve_hf_hub_name(arch)  # "local-dir:<snapshot>" when cached
        pretrained = arch
    elif arch not in open_clip.list_models():
        close = difflib.get_close_matches(arch, open_clip.list_models(), n=5, cutoff=0.5)
        hint = f"; did you mean: {', '.join(close)}" if close else ""
        raise ValueError(
            f"unknown backbone {name!r}: not a seeclip backbone ({', '.join(BACKBONES)}) "
            f"nor an open_clip architecture{hint}"
        )
    elif pretrained is not None and _looks_like_path(pretrained):
        checkpoint = Path(pretrained).expanduser()
        if not checkpoint.is_file():
            raise FileNotFoundError(f"checkpoint file not found: {checkpoint}")
        pretrained = str(checkpoint)
    elif pretrained is not None:
        kwargs.update(hub.resolve_tag(arch, pretrained))

    with torch.random.fork_rng(devices=[]), _quiet_random_init():
        torch.manual_seed(seed)
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(source, **kwargs)
        except (RuntimeError, OSError) as err:
            if "pretrained" not in kwargs and source == arch:
                raise
            raise WeightsUnavailableError(
                f"could not load pretrained weights {pretrained!r} for {arch}: {err}"
            ) from err
        if spec is not None and spec.surgery is not None:
            model = spec.surgery(model)
    if checkpoint is not None:
        _load_checkpoint(model, checkpoint, arch)
    tokenizer = open_clip.get_tokenizer(source)
    return Backbone(model, preprocess, tokenizer, name=name, arch=arch, pretrained=pretrained)


@contextlib.contextmanager
def _quiet_random_init():
    """Drop open_clip's "initialized randomly" warning: Backbone.pretrained=None says it."""

    def keep(record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()

    root = logging.getLogger()
    root.addFilter(keep)
    try:
        yield
    finally:
        root.removeFilter(keep)


def _looks_like_path(value: str) -> bool:
    return (
        value.lower().endswith(_CHECKPOINT_SUFFIXES)
        or os.sep in value
        or value.startswith(("~", "."))
        or Path(value).is_file()
    )


# Keys OpenAI's original files carry besides the weights (no open_clip model has them).
_OPENAI_EXTRAS = ("input_resolution", "context_length", "vocab_size")


def _is_torchscript(path: Path) -> bool:
    """Whether ``path`` is a TorchScript archive (a zip with ``constants.pkl``, as
    ``torch.jit.save`` writes; ``torch.save`` archives have none)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(n.split("/", 1)[-1] == "constants.pkl" for n in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    if path.suffix == ".safetensors":
        state = load_tensors(path)
    elif _is_torchscript(path):
        # OpenAI's original CLIP files. torch.jit.load can run code from the file (its docs
        # say so) and torch.load(weights_only=True) refuses them: convert once, knowingly.
        out = path.with_name(f"{path.stem}-state_dict.pt")
        raise UnreadableFileError(
            f"{path} is a TorchScript archive (like OpenAI's original CLIP files), which seeclip "
            "does not load because loading one can run code; if you trust it, convert it once: "
            f'python -c "import torch; torch.save(torch.jit.load({str(path)!r}, '
            f"map_location='cpu').state_dict(), {str(out)!r})\" and pass --pretrained {out} "
            "(OpenAI weights need a -quickgelu architecture, e.g. ViT-B-16-quickgelu)"
        )
    else:
        state = load_checkpoint(path)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(
            f"{path}: expected a state_dict (name -> tensor), got {type(state).__name__}"
        )
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def _load_checkpoint(model: nn.Module, path: Path, arch: str) -> None:
    """Loads a local state_dict strictly, with an error that names what does not fit."""
    state = _read_state_dict(path)
    if "positional_embedding" in state and not hasattr(model, "positional_embedding"):
        state = open_clip.model.convert_to_custom_text_state_dict(state)
    own = model.state_dict()
    state = {k: v for k, v in state.items() if k in own or k not in _OPENAI_EXTRAS}
    if "logit_scale" in state and "logit_scale" in own:
        state["logit_scale"] = state["logit_scale"].reshape(own["logit_scale"].shape)
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(state))
        if state[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape", shapes)):
            if items:
                more = f" (+{len(items) - 3} more)" if len(items) > 3 else ""
                parts.append(f"{len(items)} {label}: {'; '.join(items[:3])}{more}")
        raise ValueError(
            f"checkpoint {path} does not fit architecture {arch!r}: {' | '.join(parts)}. "
            "Was it saved from a different architecture?"
        )
    model.load_state_dict(state, strict=True)
