"""python -m dyadlab.security: see dyadlab.security.cli."""

import sys

from dyadlab.security.cli import main

sys.exit(main())
