import sys

from ray_alpcrun.demo import main

sys.exit(main())
