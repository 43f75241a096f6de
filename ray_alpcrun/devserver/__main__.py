"""``python -m ray_alpcrun.devserver``: see ``cli``."""

import sys

from ray_alpcrun.devserver.cli import main

sys.exit(main())
