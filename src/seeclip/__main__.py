"""``python -m seeclip`` and ``torchrun --nproc_per_node=N -m seeclip ...``: the command line."""

import sys

from seeclip.cli import main

sys.exit(main())
