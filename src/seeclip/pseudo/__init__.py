"""Pluggable sources of pseudo-unknowns (label-C samples in the cache's feature format).

Every source is registered here, in one place (``seeclip list pseudo`` shows them):

- ``none``: no pseudo-unknowns; the unknown prompt only sees what the losses do to it.
- ``mixup``: feature mixes of two known classes of one source domain.
- ``pool``: a stored feature pool (``seeclip generate --backend feature``).
- ``diffusion``: the feature-space semantic-guided diffusion generator, run on demand.
- ``images``: a stored Stable Diffusion image pool through the feature cache.
- ``sd_online``: the paper's image-space generator, online: the model's own learned queries
  pick the semantic tokens at every step (or every N steps, or once per epoch).
- ``sd_images``: the image-space generator run on demand (default model: the shipped
  tiny-glyphs-sd), its pool cached and encoded like ``images``.
"""

from seeclip.pseudo.base import (
    PSEUDO_UNKNOWNS,
    PseudoContext,
    PseudoSources,
    PseudoUnknownSource,
    SourceFactory,
    by_domain,
    draw,
)
from seeclip.pseudo.diffusion import diffusion_unknowns
from seeclip.pseudo.mixup import MixupUnknowns, mixup_unknowns
from seeclip.pseudo.pools import (
    DomainPool,
    feature_pool_unknowns,
    image_pool_features,
    image_pool_unknowns,
)
from seeclip.pseudo.sd_images import sd_image_unknowns
from seeclip.pseudo.sd_online import OnlineImageUnknowns, sd_online_unknowns


def no_pseudo_unknowns(ctx: PseudoContext) -> None:
    """No pseudo-unknowns: the unknown prompt only sees what the losses do to it."""
    return None


for _name, _factory in (
    ("none", no_pseudo_unknowns),
    ("mixup", mixup_unknowns),
    ("pool", feature_pool_unknowns),
    ("diffusion", diffusion_unknowns),
    ("images", image_pool_unknowns),
    ("sd_images", sd_image_unknowns),
    ("sd_online", sd_online_unknowns),
):
    PSEUDO_UNKNOWNS.add(_name, _factory)

__all__ = [
    "PSEUDO_UNKNOWNS",
    "DomainPool",
    "MixupUnknowns",
    "OnlineImageUnknowns",
    "PseudoContext",
    "PseudoSources",
    "PseudoUnknownSource",
    "SourceFactory",
    "by_domain",
    "diffusion_unknowns",
    "draw",
    "feature_pool_unknowns",
    "image_pool_features",
    "image_pool_unknowns",
    "mixup_unknowns",
    "no_pseudo_unknowns",
    "sd_image_unknowns",
    "sd_online_unknowns",
]
