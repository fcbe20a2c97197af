"""The `wlora-trl` command line: `eval` (lm-evaluation-harness), `sft` (the SFT recipe under `accelerate launch`),
`select` (its warm-up and switch only: stage 1 of the two-stage route), `report` and `export` (a saved run's selection
and a padded copy of its adapter), `config-path` (the packaged accelerate configs, in `accelerate_configs/`)."""

from .main import main

__all__ = ["main"]
