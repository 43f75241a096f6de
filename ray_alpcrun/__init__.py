"""ray_alpcrun: a Ray cluster as the compute back end of ALPCRUN.CH.

Importing the package is cheap: Ray, CuPy and NVML are imported only where
they are used.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
