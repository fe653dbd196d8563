"""``tiny-digits``: the small CLIP that seeclip pretrains on its embedded ``digits`` world.

The architecture is open_clip's ModifiedResNet (layers 1,1,1,1, width 32, 32 px) with a 4-layer
text transformer, built from ``model_configs/tiny-digits.json`` and then changed by
:func:`output_stride8` so that the last feature map is 4x4 (16 spatial tokens) instead of 1x1.
The weights (fp16 safetensors) and their card ship in ``weights/``; see ``docs/tiny_clip.md``.
The card is :mod:`seeclip.tiny_card`'s, the training loop :mod:`seeclip.pretrain`'s.
"""

from __future__ import annotations

import functools
from pathlib import Path

import open_clip
import torch
from open_clip.modified_resnet import AttentionPool2d, ModifiedResNet
from safetensors.torch import load_file
from torch import nn

__all__ = [
    "ARCH",
    "TINY_DIGITS_CARD",
    "TINY_DIGITS_WEIGHTS",
    "SURGERY",
    "build_tiny_digits",
    "model_config",
    "output_stride8",
]

ARCH = "tiny-digits"  # the open_clip config name (model_configs/tiny-digits.json)
SURGERY = "output_stride8"  # recorded in the weights' metadata; loading checks it
_CONFIG_DIR = Path(__file__).parent / "model_configs"
TINY_DIGITS_WEIGHTS = Path(__file__).parent / "weights" / "tiny-digits.safetensors"
TINY_DIGITS_CARD = Path(__file__).parent / "weights" / "tiny-digits.card.json"


@functools.cache
def _register_configs() -> None:
    open_clip.add_model_config(_CONFIG_DIR)


def model_config() -> dict:
    """The open_clip config of :data:`ARCH` (``model_configs/tiny-digits.json``), before surgery."""
    _register_configs()
    return open_clip.get_model_config(ARCH)


def output_stride8(model: nn.Module) -> nn.Module:
    """Turn a ModifiedResNet CLIP into an output-stride-8 one, in place.

    The 2x2 average pools of the first block of ``layer3`` and ``layer4`` (main path and
    shortcut) become identities, so a 32 px input ends in a 4x4 map (16 tokens) instead of 1x1.
    No parameter changes shape except the attention pool's positional embedding, which gets a
    4x4+1 grid: the pool is rebuilt with the same widths and heads (do this before loading
    weights).
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
    new_pool = AttentionPool2d(visual.image_size // 8, width, heads, pool.c_proj.out_features)
    std = width**-0.5  # open_clip's ModifiedResNet.init_parameters for the projections
    for proj in (new_pool.q_proj, new_pool.k_proj, new_pool.v_proj, new_pool.c_proj):
        nn.init.normal_(proj.weight, std=std)
    visual.attnpool = new_pool
    return model


def build_tiny_digits(
    weights: Path | str | None = None, *, seed: int = 0
) -> tuple[nn.Module, object, object]:
    """Build the tiny-digits CLIP exactly as trained: config, then :func:`output_stride8`.

    Args:
        weights: a safetensors file written by ``seeclip pretrain-clip`` (fp16 is cast to
            fp32); None leaves the seeded random initialisation.
        seed: seeds the random initialisation (only matters without weights).

    Returns:
        ``(model, preprocess, tokenizer)``: the fp32 CLIP in eval mode, open_clip's eval
        transform for 32 px (resize 32, centre crop 32, CLIP normalisation) and its tokenizer.
    """
    _register_configs()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, _, preprocess = open_clip.create_model_and_transforms(ARCH, pretrained=None)
        output_stride8(model)
    tokenizer = open_clip.get_tokenizer(ARCH)
    if weights is not None:
        state = load_file(str(weights))
        _check_metadata(Path(weights))
        model.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    model.eval()
    return model, preprocess, tokenizer


def _check_metadata(path: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    arch, surgery = meta.get("arch", ARCH), meta.get("surgery", SURGERY)
    if (arch, surgery) != (ARCH, SURGERY):
        raise ValueError(f"{path}: weights are for {arch}+{surgery}, not {ARCH}+{SURGERY}")
