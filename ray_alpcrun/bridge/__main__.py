import sys

from ray_alpcrun.bridge.cli import main

sys.exit(main())
