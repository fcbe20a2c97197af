"""The `wlora-trl` command line: `eval` (lm-evaluation-harness), `sft` (the SFT recipe under `accelerate launch`),
`config-path` (the packaged accelerate configs, in `accelerate_configs/`)."""

from .main import main

__all__ = ["main"]
