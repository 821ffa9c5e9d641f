"""The private APIs of other libraries dtrain relies on, one module per library (ray, deepspeed, torch, sklearn).

Nothing else in dtrain touches an underscored name, an internal module or an undocumented attribute of Ray,
DeepSpeed or PyTorch: it goes through here, so an upgrade that moves one breaks one file, and each module's
``check()`` (run by tests/unit/test_compat.py) names the symbol that moved.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class CompatError(RuntimeError):
    """A private API dtrain relies on is gone or changed (after an upgrade of that library)."""


def require(symbols: dict[str, Callable[[], Any]]) -> None:
    """Evaluate each getter; CompatError naming every symbol that no longer resolves."""
    missing = []
    for name, getter in symbols.items():
        try:
            if getter() is None:
                missing.append(f"{name} (None)")
        except Exception as err:  # noqa: BLE001 - any failure to resolve is what we report
            missing.append(f"{name} ({type(err).__name__}: {err})")
    if missing:
        raise CompatError("private APIs moved: " + "; ".join(missing))
