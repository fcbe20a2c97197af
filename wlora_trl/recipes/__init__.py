"""Runnable recipes. Each module exposes `make_parser()` (a `trl.TrlParser`, so every flag also works from a YAML
`--config`) and `main(...) -> dict`, and runs with `python -m wlora_trl.recipes.<name>` or through the thin wrappers
in `examples/`.

- `sft`: causal-LM SFT on GSM8K with WeightLoRA / WeightLoRA+ / random selection / plain LoRA, with a before/after
  evaluation and the selection heatmap.
- `classify_boolq`: sequence classification on BoolQ with an encoder (the paper's NLU setting in miniature).
"""
