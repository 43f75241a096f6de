"""Example handlers for ray_alpcrun, used by the tests and benchmarks
(``examples.workloads:noop`` and friends)."""
