"""Methods on a frozen CLIP, one module each; :mod:`seeclip.methods.registry` lists them.

- :mod:`~seeclip.methods.zeroshot`, :mod:`~seeclip.methods.coop`,
  :mod:`~seeclip.methods.coop_unknown`, :mod:`~seeclip.methods.cocoop`,
  :mod:`~seeclip.methods.seeclip`: each holds its model, the loss it combines, its decision rule
  and its ``build`` factory.
- :mod:`~seeclip.methods.scoring`: the decision rules they share (C+1 argmax, max-softmax
  threshold, the source-calibrated threshold).
- :mod:`~seeclip.methods.base` (the two-call interface), :mod:`~seeclip.methods.prompt_model`
  and :mod:`~seeclip.methods.prompts` (what prompt learners share).
"""

from seeclip.methods.base import Features, Method, MethodEnv, Prediction

__all__ = ["Features", "Method", "MethodEnv", "Prediction"]
