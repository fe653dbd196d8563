"""Methods: each module registers its factories in :data:`METHODS`."""

from seeclip.methods import learned, zeroshot  # noqa: F401  (fill the registry)
from seeclip.methods.base import METHODS, Features, Method, MethodContext, Prediction

__all__ = ["METHODS", "Features", "Method", "MethodContext", "Prediction"]
