#!/opt/venv/bin/python
"""The `dyadlab` command inside the images (the code lives in /opt/dyadlab)."""

import sys

from dyadlab.cli import main

sys.exit(main())
