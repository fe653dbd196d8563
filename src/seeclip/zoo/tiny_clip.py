"""The small CLIPs that seeclip pretrains on its embedded worlds: tiny-digits and tiny-glyphs.

Both are open_clip's ModifiedResNet (layers 1,1,1,1) with a 4-layer text transformer, built from
``model_configs/<name>.json`` and then changed by :func:`output_stride8` so that the last feature
map is 1/8 of the input side instead of 1/32:

- ``tiny-digits``: width 32, 32 px, 4x4 = 16 spatial tokens (the ``digits`` world);
- ``tiny-glyphs``: width 16, 48 px, 6x6 = 36 spatial tokens (the ``glyphs`` world); its
  attention pool computes only the pooled query (same output, less work).

The weights (fp16 safetensors) and their cards ship in ``weights/``; see ``docs/tiny_clip.md``.
The card is :mod:`seeclip.zoo.tiny_card`'s, the training loop :mod:`seeclip.zoo.pretrain`'s.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F
from open_clip.modified_resnet import AttentionPool2d, ModifiedResNet
from torch import nn

from seeclip.io import load_tensors

__all__ = [
    "ARCH",
    "TINY_MODELS",
    "PooledAttentionPool2d",
    "TinyModel",
    "build_tiny_clip",
    "TINY_DIGITS_CARD",
    "TINY_DIGITS_WEIGHTS",
    "SURGERY",
    "build_tiny_digits",
    "model_config",
    "output_stride8",
    "resnet_tokens",
]

ARCH = "tiny-digits"  # the open_clip config name (model_configs/tiny-digits.json)
SURGERY = "output_stride8"  # recorded in the weights' metadata; loading checks it
_CONFIG_DIR = Path(__file__).parents[1] / "model_configs"
_WEIGHTS_DIR = Path(__file__).parents[1] / "weights"


@dataclass(frozen=True)
class TinyModel:
    """A tiny CLIP seeclip pretrains: its open_clip config name and where its files ship."""

    arch: str  # open_clip config name (model_configs/<arch>.json)
    pooled_query: bool  # attention pool computes only the pooled query (PooledAttentionPool2d)

    @property
    def weights(self) -> Path:
        return _WEIGHTS_DIR / f"{self.arch}.safetensors"

    @property
    def card(self) -> Path:
        return _WEIGHTS_DIR / f"{self.arch}.card.json"


TINY_MODELS: dict[str, TinyModel] = {
    "tiny-digits": TinyModel("tiny-digits", pooled_query=False),
    "tiny-glyphs": TinyModel("tiny-glyphs", pooled_query=True),
}
TINY_DIGITS_WEIGHTS = TINY_MODELS["tiny-digits"].weights
TINY_DIGITS_CARD = TINY_MODELS["tiny-digits"].card


class PooledAttentionPool2d(AttentionPool2d):
    """open_clip's attention pool that computes only the pooled (mean-token) query.

    open_clip attends from all H*W+1 positions and keeps position 0; the keys and values are
    the same here, so the output equals open_clip's while the query projection, the attention
    and the output projection run on one position instead of H*W+1.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(2).permute(2, 0, 1)  # NCHW -> (HW)NC
        x = torch.cat([x.mean(dim=0, keepdim=True), x], dim=0)
        x = x + self.positional_embedding[:, None, :].to(x.dtype)
        out, _ = F.multi_head_attention_forward(
            query=x[:1],
            key=x,
            value=x,
            embed_dim_to_check=x.shape[-1],
            num_heads=self.num_heads,
            q_proj_weight=self.q_proj.weight,
            k_proj_weight=self.k_proj.weight,
            v_proj_weight=self.v_proj.weight,
            in_proj_weight=None,
            in_proj_bias=torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias]),
            bias_k=None,
            bias_v=None,
            add_zero_attn=False,
            dropout_p=0.0,
            out_proj_weight=self.c_proj.weight,
            out_proj_bias=self.c_proj.bias,
            use_separate_proj_weight=True,
            training=self.training,
            need_weights=False,
        )
        return out[0]


@functools.cache
def _register_configs() -> None:
    open_clip.add_model_config(_CONFIG_DIR)


def model_config(arch: str = ARCH) -> dict:
    """The open_clip config of a tiny model (``model_configs/<arch>.json``), before surgery."""
    _register_configs()
    return open_clip.get_model_config(arch)


def resnet_tokens(
    visual: ModifiedResNet, images: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """A ModifiedResNet's pooled output [B, d] and its spatial tokens [B, N, d], neither normalised.

    The tokens are MaskCLIP's: each position of the last feature map through the attention pool's
    value and output projections, so they live in the pooled output's space.
    """
    x = visual.stem(images)
    x = visual.layer4(visual.layer3(visual.layer2(visual.layer1(x))))
    pool = visual.attnpool
    return pool(x), pool.c_proj(pool.v_proj(x.flatten(2).transpose(1, 2)))


def output_stride8(model: nn.Module, *, pooled_query: bool = False) -> nn.Module:
    """Turn a ModifiedResNet CLIP into an output-stride-8 one, in place.

    The 2x2 average pools of the first block of ``layer3`` and ``layer4`` (main path and
    shortcut) become identities, so a 32 px input ends in a 4x4 map (16 tokens) instead of 1x1
    (48 px: 6x6). No parameter changes shape except the attention pool's positional embedding,
    which gets an (S/8)^2+1 grid: the pool is rebuilt with the same widths and heads (do this
    before loading weights); ``pooled_query`` rebuilds it as a :class:`PooledAttentionPool2d`.
    """
    visual = model.visual
    if not isinstance(visual, ModifiedResNet):
        raise TypeError(f"output_stride8 needs a ModifiedResNet, got {type(visual).__name__}")
    for layer in (visual.layer3, visual.layer4):
        block = layer[0]
        if isinstance(block.avgpool, nn.Identity):
            raise ValueError("output_stride8 was already applied to this model")
        block.avgpool = nn.Identity()
        block.downsample[0] = nn.Identity()  # the "-1" AvgPool2d in front of the 1x1 conv
        block.stride = 1
    pool = visual.attnpool
    width, heads = pool.k_proj.in_features, pool.num_heads
    cls = PooledAttentionPool2d if pooled_query else AttentionPool2d
    new_pool = cls(visual.image_size // 8, width, heads, pool.c_proj.out_features)
    std = width**-0.5  # open_clip's ModifiedResNet.init_parameters for the projections
    for proj in (new_pool.q_proj, new_pool.k_proj, new_pool.v_proj, new_pool.c_proj):
        nn.init.normal_(proj.weight, std=std)
    visual.attnpool = new_pool
    return model


def build_tiny_digits(
    weights: Path | str | None = None, *, seed: int = 0
) -> tuple[nn.Module, object, object]:
    """:func:`build_tiny_clip` of ``tiny-digits``."""
    return build_tiny_clip("tiny-digits", weights, seed=seed)


def build_tiny_clip(
    name: str, weights: Path | str | None = None, *, seed: int = 0
) -> tuple[nn.Module, object, object]:
    """Build a tiny CLIP exactly as trained: config, then :func:`output_stride8`.

    Args:
        name: a key of :data:`TINY_MODELS`.
        weights: a safetensors file written by ``seeclip pretrain-clip`` (fp16 is cast to
            fp32); None leaves the seeded random initialisation.
        seed: seeds the random initialisation (only matters without weights).

    Returns:
        ``(model, preprocess, tokenizer)``: the fp32 CLIP in eval mode, open_clip's eval
        transform at the model's size (resize, centre crop, CLIP normalisation) and its tokenizer.
    """
    if name not in TINY_MODELS:
        raise ValueError(f"no tiny model {name!r}; choose one of {sorted(TINY_MODELS)}")
    tiny = TINY_MODELS[name]
    _register_configs()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, _, preprocess = open_clip.create_model_and_transforms(tiny.arch, pretrained=None)
        output_stride8(model, pooled_query=tiny.pooled_query)
    tokenizer = open_clip.get_tokenizer(tiny.arch)
    if weights is not None:
        state = load_tensors(weights)
        _check_metadata(Path(weights), tiny.arch)
        model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    model.eval()
    return model, preprocess, tokenizer


def _check_metadata(path: Path, expected: str) -> None:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    arch, surgery = meta.get("arch", ARCH), meta.get("surgery", SURGERY)
    if (arch, surgery) != (expected, SURGERY):
        raise ValueError(f"{path}: weights are for {arch}+{surgery}, not {expected}+{SURGERY}")
