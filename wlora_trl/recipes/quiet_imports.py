"""Log records a third-party import writes at every recipe start that say nothing about the run: held back, not lost.

peft imports bitsandbytes whenever it is installed (`peft/helpers.py`, reached from `import trl`), and bitsandbytes
0.50, on a CPU with avx512_bf16, fetches its faster CPU 4-bit matmul kernel from the hub
(`kernels-community/quantization-bitsandbytes`, through the `kernels` package) while it is imported. Where that fails
(the publisher's trust status cannot be verified, or the hub is offline and the kernel not cached) every recipe
started with "Failed to load CPU gemm_4bit_forward from kernels-community: ...", after kernels' "Skipping publisher
trust check for 'kernels-community/quantization-bitsandbytes' ..." when HF_HUB_OFFLINE is set, even with nothing
quantized: first lines that read like a failure. The kernel serves 4-bit layers on the CPU only, and without it
bitsandbytes uses its own implementation.

So the recipes hold exactly these records back from the moment `wlora_trl.recipes` is imported (before any recipe
module imports trl), and `release_if_4bit_on_cpu` writes them after the flags are parsed for a run that loads a 4-bit
base on the CPU, the one run they concern. Every other record of these loggers passes as before.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

_KERNEL_REPO = "kernels-community/quantization-bitsandbytes"
# logger name -> the start of the one message held back from it
_HELD_MESSAGES = {
    "bitsandbytes.backends.cpu.ops": "Failed to load CPU gemm_4bit_forward from kernels-community: ",
    "kernels._internals.hf_hub": f"Skipping publisher trust check for '{_KERNEL_REPO}' ",
}
_held: list[logging.LogRecord] = []  # in the order they were logged


class HoldBack(logging.Filter):
    """Keeps the records of one logger whose message starts with `start`, passes every other one."""

    def __init__(self, start: str):
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage().startswith(self.start):
            _held.append(record)
            return False
        return True


def hold_back_kernel_messages() -> None:
    """Attach the filters (once: a second call changes nothing). A logger exists before its module is imported, so
    this works when it runs first; records written before it are not recalled."""
    for name, start in _HELD_MESSAGES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(attached, HoldBack) for attached in logger.filters):
            logger.addFilter(HoldBack(start))


def held_records() -> list[logging.LogRecord]:
    return list(_held)


def release_if_4bit_on_cpu(parsed_args: Iterable, uses_gpu: bool) -> bool:
    """Write the held records, as their loggers would have, when one of the parsed argument objects asks for a 4-bit
    base (`load_in_4bit`, trl's ModelConfig) and the run is on the CPU; returns whether anything was written."""
    if uses_gpu or not any(getattr(args, "load_in_4bit", False) for args in parsed_args):
        return False
    records = held_records()
    _held.clear()
    for record in records:
        # past the logger's own filter, to its handlers and its parents' (Python's last resort: stderr)
        logging.getLogger(record.name).callHandlers(record)
    return bool(records)
