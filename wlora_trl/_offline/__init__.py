"""Private helpers for running offline: the default models served from PyPI packages (`models`) and the local data
folder (`data`). Used by the recipes, `wlora-trl eval` and the benchmarks, never by the method itself."""
