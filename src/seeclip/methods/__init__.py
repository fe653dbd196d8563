"""Methods on a frozen CLIP: the two-call interface, zero-shot CLIP and the prompt models.

The registry of buildable methods is :data:`seeclip.builders.METHODS` (it needs the trainer,
which sits above this package).
"""

from seeclip.methods.base import (
    Features,
    Method,
    MethodEnv,
    Prediction,
    confidence_threshold,
)

__all__ = ["Features", "Method", "MethodEnv", "Prediction", "confidence_threshold"]
