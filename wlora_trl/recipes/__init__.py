"""Runnable recipes. Each module exposes `make_parser()` (a `trl.TrlParser`, so every flag also works from a YAML
`--config`) and `main(...) -> dict`, and runs with `python -m wlora_trl.recipes.<name>` or through the thin wrappers
in `examples/`.

- `sft`: causal-LM SFT on GSM8K with WeightLoRA / WeightLoRA+ / random selection / plain LoRA / AdaLoRA / EVA, with a
  before/after evaluation and the selection heatmap.
- `classify`: GLUE-style sequence classification / regression with an encoder (SST-2, MRPC, CoLA, RTE, BoolQ, or any
  dataset with one or two text columns), every method side by side, the task's official GLUE metric before/after.
- `classify_boolq`: `classify` with `--task boolq` and the BoolQ recipe's original defaults.
- `peers`: AdaLoRA and EVA (stock PEFT) at WeightLoRA's budget, for both recipes' `--method adalora|eva`.
"""

from .quiet_imports import hold_back_kernel_messages

# First, before any recipe module imports trl (and, through peft, bitsandbytes): see quiet_imports.
hold_back_kernel_messages()
