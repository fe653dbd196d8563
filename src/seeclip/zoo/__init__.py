"""The tiny models seeclip ships and how they are trained, so every path runs offline.

- :mod:`~seeclip.zoo.tiny_clip`: the tiny CLIPs (``tiny-digits``, ``tiny-glyphs``) and their
  open_clip configs; :mod:`~seeclip.zoo.tiny_card`: their model cards.
- :mod:`~seeclip.zoo.pretrain`: contrastive pretraining on an embedded world's captioned
  corpus (``seeclip pretrain-clip``).
- :mod:`~seeclip.zoo.pretrain_diffusion`: the tiny text-to-image model ``tiny-glyphs-sd``
  (``seeclip pretrain-diffusion``); :mod:`~seeclip.zoo.sd_export`: its diffusers export.
- :mod:`~seeclip.zoo.loop`: the one resumable, staged training loop both pretrainings run on
  (checkpoint, ``stop_at``, bit-for-bit resume).

The weights themselves live in ``seeclip/weights/`` (package data).
"""
