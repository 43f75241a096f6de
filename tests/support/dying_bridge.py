"""``python -m tests.support.dying_bridge ARGS``: the bridge CLI, whose Bridge
actor's process exits in ``__init__``, as when it cannot join the cluster
(a client's ``RAY_AUTH_MODE=token`` on a cluster without auth)."""

from __future__ import annotations

import os
import sys
from typing import Any

from ray_alpcrun.bridge import actor, cli


class DiesAtStart(actor.Bridge):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        os._exit(1)


def dying_actor_class() -> Any:
    import ray

    return ray.remote(num_cpus=0, max_restarts=0, max_task_retries=0)(DiesAtStart)


if __name__ == "__main__":
    actor.bridge_actor_class = dying_actor_class  # start_bridge looks it up at each call
    sys.exit(cli.main(sys.argv[1:]))
