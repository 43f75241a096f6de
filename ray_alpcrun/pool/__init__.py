"""The Ray side: a pool of Ray actors that run a handler, and how work reaches them.

- ``dispatch`` (who runs what: splitting, retries, timeouts), ``membership``
  (which actors are in the row: start, replace, grow, release; whether the pool
  serves), ``interfaces`` (the seams between them and the backends),
  ``waiting`` and ``chunks`` (its helpers), ``coalesce`` and ``scaling`` (the
  elastic pool's rules) are pure asyncio and never import Ray; they are tested
  against a fake backend.
- ``actor_pool`` creates the Ray actors and sizes the pool (``ActorPool``),
  ``backend`` calls them, ``pool_actor`` is the actor itself, ``cluster`` reads
  the Ray cluster's shape.
- ``gpu``/``nvml`` check and pin GPUs; ``notebook`` is the in-process pool for
  notebooks (``RayPool``).

Importing this package imports nothing from Ray; its modules do, where needed.
"""
