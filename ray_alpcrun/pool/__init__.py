"""The Ray side: a pool of Ray actors that run a handler, and how work reaches them.

- ``dispatch`` (with its bookkeeping modules), ``coalesce`` and ``scaling`` are
  pure asyncio and never import Ray; they are tested against a fake backend.
- ``actor_pool`` owns the Ray actors (``ActorPool``), ``backend`` talks to them,
  ``pool_actor`` is the actor itself, ``cluster`` reads the cluster's shape.
- ``gpu``/``nvml`` check and pin GPUs; ``notebook`` is the in-process pool
  for notebooks (``RayPool``).

Importing this package imports nothing from Ray; its modules do, where needed.
"""
