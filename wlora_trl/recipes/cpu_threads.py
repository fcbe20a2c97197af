"""Give a CPU run under `accelerate launch` the machine's cores, unless the user chose a thread count.

`accelerate launch` sets `OMP_NUM_THREADS=1` for the processes it starts unless it was told otherwise (it picks
more only with `--cpu`), so on a machine without a GPU the README's `accelerate launch examples/sft_gsm8k.py` trained
on one core of two, at about half the speed of `python examples/sft_gsm8k.py`. The launched process cannot tell that
1 from a user's own `OMP_NUM_THREADS=1` by its environment alone, so it reads what its launcher was started with
(Linux's /proc): an `OMP_NUM_THREADS` in the launcher's environment, or `--num_cpu_threads_per_process` on its
command line, is the user's choice and wins. Otherwise each of the machine's processes gets an equal share of the
cores the process may run on.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)

THREADS_FLAG = "--num_cpu_threads_per_process"


def _launcher_pid() -> int | None:
    """The `accelerate launch` process that started this one (its parent; for several processes, torchrun's agent
    runs inside it), or None when this process was not started by accelerate."""
    if "ACCELERATE_DYNAMO_BACKEND" not in os.environ:  # set by every accelerate launcher, and only by them
        return None
    return os.getppid()


def _read_proc(pid: int, name: str) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/{name}", "rb") as f:
            return [item.decode(errors="replace") for item in f.read().split(b"\0") if item]
    except OSError:
        return None


def user_chose_threads(pid: int) -> bool | None:
    """Whether the launcher `pid` was given a thread count by its user; None where that cannot be read."""
    environ, cmdline = _read_proc(pid, "environ"), _read_proc(pid, "cmdline")
    if environ is None or cmdline is None:
        return None
    return any(item.startswith("OMP_NUM_THREADS=") for item in environ) or any(
        item == THREADS_FLAG or item.startswith(THREADS_FLAG + "=") for item in cmdline
    )


def fair_share_of_cores() -> int:
    """The cores this process may use, divided among the launched processes on this machine."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return max(1, cores // max(1, local_processes))


def use_the_cpu_cores(uses_gpu: bool) -> int | None:
    """Raise torch's thread count to this process's share of the cores when `accelerate launch` defaulted it to one
    on a CPU run. Returns the new count, or None when nothing changed (a GPU run, a run not started by accelerate,
    a thread count the user chose, or one that could not be told apart from the default)."""
    if uses_gpu or os.environ.get("OMP_NUM_THREADS") != "1":
        return None
    pid = _launcher_pid()
    if pid is None or user_chose_threads(pid) is not False:
        return None
    threads = fair_share_of_cores()
    if threads <= 1:
        return None
    import torch

    torch.set_num_threads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)  # for anything this process starts
    if os.environ.get("LOCAL_RANK", "0") == "0":  # once per machine, not once per process
        logger.info(
            "accelerate launch set OMP_NUM_THREADS=1; each CPU process uses %d threads instead (its share of the "
            "cores). Set OMP_NUM_THREADS or --num_cpu_threads_per_process to choose.",
            threads,
        )
    return threads
