"""Run lm-eval on the base model and on each adapter, one model at a time.

Every model, base or adapter, is handed to lm-eval's HFLM as a *path* (`pretrained=<folder>`, `peft=<adapter>`), never
as an in-memory model, in one process or many. Only with a path does HFLM set itself up for data parallelism under
`accelerate launch` (its own Accelerator, device per rank, requests split by rank and gathered on rank 0); an in-memory
model makes every rank evaluate everything. Using the same path in a single process means the code the tests run is
the code a multi-GPU run runs. The cost is reloading the base for each adapter, small next to an evaluation.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import subprocess
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunSettings:
    model_path: str
    dtype: str  # "bfloat16" | "float32"
    load_in_8bit: bool
    device: str
    batch_size: int | str
    limit: int | float | None
    num_fewshot: int | None
    apply_chat_template: bool = False


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_dtype(device: str) -> str:
    # bf16 is what the paper trains and evaluates in on GPUs; on CPU it is slower than float32 and only emulated.
    return "float32" if device.startswith("cpu") else "bfloat16"


def _quantizing_hflm_class():
    """HFLM that quantizes a base model to 8 bit while loading it from a path.

    transformers 5 rejects `load_in_8bit=True` as a from_pretrained keyword, which is how lm-eval's `model_args`
    would pass it, and HFLM takes `quantization_config` only from a pre-quantized model's config.json, so the
    BitsAndBytesConfig is injected where HFLM calls from_pretrained. Loading from a path keeps data parallelism.
    """
    from lm_eval.models.huggingface import HFLM

    class QuantizingHFLM(HFLM):
        def __init__(self, *args, bnb_config=None, **kwargs):
            self._wlora_bnb_config = bnb_config  # read by _create_model, which HFLM.__init__ calls
            super().__init__(*args, **kwargs)

        def _create_model(self, *args, quantization_config=None, **kwargs):
            quantization_config = quantization_config or self._wlora_bnb_config
            return super()._create_model(*args, quantization_config=quantization_config, **kwargs)

    return QuantizingHFLM


def make_lm(settings: RunSettings, adapter: str | None):
    """lm-eval's HFLM for the base (adapter None) or the base with one LoRA adapter applied (unmerged)."""
    bnb_config = None
    if settings.load_in_8bit:
        from transformers import BitsAndBytesConfig

        bnb_config = BitsAndBytesConfig(load_in_8bit=True)
    cls = _quantizing_hflm_class()
    return cls(
        pretrained=settings.model_path,
        peft=adapter,
        dtype=settings.dtype,
        device=settings.device,
        batch_size=settings.batch_size,
        bnb_config=bnb_config,
    )


@contextlib.contextmanager
def _quiet_git_hash():
    """lm-eval records the git commit of the working directory by running `git describe`, whose "fatal: not a git
    repository" goes straight to the user's terminal outside a checkout. Same value, without the noise."""
    import lm_eval.evaluator

    original = lm_eval.evaluator.get_git_commit_hash

    def quiet() -> str | None:
        try:
            out = subprocess.run(["git", "describe", "--always"], capture_output=True, text=True, check=True)
            return out.stdout.strip()
        except (subprocess.CalledProcessError, FileNotFoundError):
            return None

    lm_eval.evaluator.get_git_commit_hash = quiet
    try:
        yield
    finally:
        lm_eval.evaluator.get_git_commit_hash = original


def evaluate_model(settings: RunSettings, adapter: str | None, tasks: list[str], task_manager) -> dict | None:
    """lm-eval's results for one model; None on ranks other than 0 of a data-parallel run."""
    import lm_eval

    lm = make_lm(settings, adapter)
    try:
        with _quiet_git_hash():
            return lm_eval.simple_evaluate(
                model=lm,
                tasks=tasks,
                task_manager=task_manager,
                limit=settings.limit,
                num_fewshot=settings.num_fewshot,
                apply_chat_template=settings.apply_chat_template,
                log_samples=False,
            )
    finally:
        # The next model must not share memory with this one (matters on GPUs and for 8-bit bases).
        del lm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
