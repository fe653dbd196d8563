import sys

from seeclip.cli import main

sys.exit(main())
