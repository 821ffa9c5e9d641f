"""Data sets by name (dtrain.data.catalog: DATASETS, load_data, load_arrays, ...), reached as dtrain.data's own names.

The catalog is imported when one of its names is first used, not with the package: the per-batch transforms of the
streamed data sets (dtrain.data.stream_batches), which each of Ray Data's worker processes imports, need numpy only,
and a worker that imported torch with them would spend seconds and hundreds of MB on it.
"""

from __future__ import annotations

from typing import Any

__all__ = ["DATASETS", "Arrays", "DataBundle", "data_loader", "fourier_features", "load_arrays", "load_data"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from dtrain.data import catalog

        return getattr(catalog, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
