"""A recipe's first lines are its own: bitsandbytes' import-time 'Failed to load CPU gemm_4bit_forward from
kernels-community' (and kernels' 'Skipping publisher trust check' before it, offline) are held back unless the run
loads a 4-bit base on the CPU, the one run they concern; every other record of those loggers passes."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

import wlora_trl.recipes  # noqa: F401  (attaches the filters, as every recipe start does)
from wlora_trl.recipes import common, quiet_imports

REPO = Path(__file__).resolve().parents[2]
BNB_LOGGER = "bitsandbytes.backends.cpu.ops"
KERNELS_LOGGER = "kernels._internals.hf_hub"
# bitsandbytes 0.50.2's call, with kernels 0.19.1's reason as CI's pinned stack logged it
BNB_FORMAT = (
    "Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure you already `pip install "
    "kernels` and the kernels >= 0.11.1"
)
BNB_REASON = (
    "Kernel repository 'kernels-community/quantization-bitsandbytes' could not verify publisher trust status. Set "
    "trust_remote_code=True or add the repository ID to the trust_remote_code allowlist to allow loading kernels "
    "from untrusted sources."
)
KERNELS_SKIP = (
    "Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes' because Hugging Face Hub is in "
    "offline mode."
)


@pytest.fixture
def nothing_held(monkeypatch):
    """What imports earlier in this process held back stays out of these tests, and theirs out of it."""
    monkeypatch.setattr(quiet_imports, "_held", [])


def _log_what_the_import_logs() -> None:
    logging.getLogger(KERNELS_LOGGER).warning(KERNELS_SKIP)
    logging.getLogger(BNB_LOGGER).warning(BNB_FORMAT, BNB_REASON)


def test_the_kernel_messages_are_held_back_and_every_other_record_passes(nothing_held, caplog):
    caplog.set_level(logging.INFO)
    _log_what_the_import_logs()
    logging.getLogger(BNB_LOGGER).warning("Failed to load CPU-only bitsandbytes library")
    logging.getLogger(KERNELS_LOGGER).warning("Skipping publisher trust check for 'someone/else' because ...")
    logging.getLogger("bitsandbytes").warning(BNB_FORMAT, "from another logger")
    assert [record.getMessage() for record in caplog.records] == [
        "Failed to load CPU-only bitsandbytes library",
        "Skipping publisher trust check for 'someone/else' because ...",
        BNB_FORMAT % "from another logger",
    ]
    assert [record.getMessage() for record in quiet_imports.held_records()] == [KERNELS_SKIP, BNB_FORMAT % BNB_REASON]


def test_attaching_twice_holds_each_record_once(nothing_held):
    quiet_imports.hold_back_kernel_messages()
    _log_what_the_import_logs()
    assert len(logging.getLogger(BNB_LOGGER).filters) == 1 and len(quiet_imports.held_records()) == 2


class _Parser:
    def __init__(self, *parsed):
        self.parsed = parsed

    def parse_args_and_config(self):
        return self.parsed


@pytest.mark.parametrize(
    "model_args, uses_gpu, written",
    [
        (SimpleNamespace(load_in_4bit=True), False, True),  # 4-bit on the CPU: the kernel would have served it
        (SimpleNamespace(load_in_4bit=True), True, False),  # 4-bit on a GPU: bitsandbytes' CUDA kernels
        (SimpleNamespace(load_in_4bit=False, load_in_8bit=True), False, False),
        (SimpleNamespace(load_in_4bit=False), False, False),
    ],
)
def test_a_recipe_writes_them_for_a_4bit_base_on_the_cpu_only(
    nothing_held, caplog, monkeypatch, model_args, uses_gpu, written
):
    _log_what_the_import_logs()
    monkeypatch.setattr(common, "_uses_gpu", lambda: uses_gpu)
    caplog.set_level(logging.INFO)
    common.run_recipe(lambda *args: None, lambda: _Parser(SimpleNamespace(), model_args))
    messages = [record.getMessage() for record in caplog.records if record.name in (BNB_LOGGER, KERNELS_LOGGER)]
    assert messages == ([KERNELS_SKIP, BNB_FORMAT % BNB_REASON] if written else [])


@pytest.mark.slow
def test_a_recipe_start_prints_no_kernel_messages():
    """The real import chain (trl -> transformers -> peft -> bitsandbytes -> kernels), in a fresh process."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "examples/sft_gsm8k.py", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0 and "--load_in_4bit" in done.stdout, done.stderr[-2000:]
    assert "gemm_4bit_forward" not in done.stderr and "publisher trust" not in done.stderr, done.stderr[-2000:]
