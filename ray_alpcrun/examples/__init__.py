"""Example handlers for ray_alpcrun, used by the demo, the notebook, the tests and
the benchmarks (``ray_alpcrun.examples.workloads:noop`` and friends, the Monte
Carlo pricer in :mod:`ray_alpcrun.examples.monte_carlo`). Shipped inside the
package so that every snippet that names them runs from any directory."""
