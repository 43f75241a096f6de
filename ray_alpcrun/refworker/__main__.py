"""``python -m ray_alpcrun.refworker``"""

from ray_alpcrun.refworker.cli import main

raise SystemExit(main())
