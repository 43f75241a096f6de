"""``RayPool`` with a handler module that is not importable fails at once with
HandlerError, before starting Ray (issue 11, item 9)."""

from __future__ import annotations

from typing import Any

import pytest

from ray_alpcrun.errors import HandlerError
from ray_alpcrun.pool.notebook import RayPool


def test_a_missing_handler_module_fails_before_ray_starts(monkeypatch: Any) -> None:
    import ray

    def no_ray(**kwargs: Any) -> None:
        raise AssertionError("Ray was started for a handler that cannot load")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", no_ray)
    with pytest.raises(HandlerError, match="no_such_module_i11"):
        RayPool("no_such_module_i11:handle").start()
