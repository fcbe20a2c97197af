"""`wlora-trl eval`: lm-evaluation-harness on a base model and its LoRA adapters; the entry point is `command.py`."""
