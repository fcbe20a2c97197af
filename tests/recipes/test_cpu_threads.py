"""A CPU run under `accelerate launch` uses the machine's cores (accelerate defaults its processes to one thread);
a thread count the user chose wins, and several processes share the cores."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from wlora_trl.recipes import cpu_threads

CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)

# A recipe entry point as the examples have it (run_recipe), whose main reports torch's thread count.
SCRIPT = textwrap.dedent(
    """
    import os, torch
    from wlora_trl.recipes.common import run_recipe

    class Parser:
        def parse_args_and_config(self):
            return ()

    run_recipe(lambda: print(f"rank {os.environ.get('RANK', '0')} threads {torch.get_num_threads()}"), Parser)
    """
)


def _launch(tmp_path, *launch_args, env_overrides=None) -> list[int]:
    script = tmp_path / "threads.py"
    script.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env.update(env_overrides or {})
    env["CUDA_VISIBLE_DEVICES"] = ""  # a CPU run even where a GPU is present
    out = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", *launch_args, str(script)],
        env=env, capture_output=True, text=True, check=True, timeout=300,
    ).stdout  # fmt: skip
    return sorted(int(line.rsplit(" ", 1)[1]) for line in out.splitlines() if line.startswith("rank "))


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CORES < 2 or not sys.platform.startswith("linux"), reason="needs 2+ cores and Linux's /proc"),
]


def test_one_launched_cpu_process_uses_every_core(tmp_path):
    # Before: accelerate's OMP_NUM_THREADS=1 stood, and the flagship trained on one core of two.
    assert _launch(tmp_path, "--num_processes", "1") == [CORES]


def test_processes_share_the_cores(tmp_path):
    assert _launch(tmp_path, "--multi_gpu", "--num_processes", "2") == [max(1, CORES // 2)] * 2


@pytest.mark.parametrize(
    "launch_args, env",
    [((), {"OMP_NUM_THREADS": "1"}), (("--num_cpu_threads_per_process", "1"), {})],
    ids=["OMP_NUM_THREADS", "num_cpu_threads_per_process"],
)
def test_a_thread_count_the_user_chose_wins(tmp_path, launch_args, env):
    assert _launch(tmp_path, "--num_processes", "1", *launch_args, env_overrides=env) == [1]


def test_outside_accelerate_and_on_a_gpu_nothing_changes(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("ACCELERATE_DYNAMO_BACKEND", raising=False)
    assert cpu_threads.use_the_cpu_cores(uses_gpu=False) is None  # python script.py: not accelerate's default
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "NO")
    assert cpu_threads.use_the_cpu_cores(uses_gpu=True) is None
