"""Monte Carlo pricing of a book of European and arithmetic-Asian options.

* :mod:`.pricing`: market data, tasks and results (compact binary formats), closed forms;
* :mod:`.engine`: the simulation, on NumPy or CuPy; :mod:`.cuda_kernel`: its fused GPU kernel;
* :mod:`.handler`: ``MonteCarloHandler``, the ray_alpcrun handler;
* :mod:`.client`: builds a book, submits it, prints prices, standard errors and paths/s.
"""
