"""Device selection for the CUDA validation tests (`pytest -m gpu tests/gpu`, run by benchmarks/gpu/run.py).

Every test module here sets `pytestmark = pytest.mark.gpu`. With CUDA they run on `cuda`. Without it they are skipped, so the CPU suite and CI
are unchanged, except under the kit's dry run (`WLORA_GPU_KIT_DRY_RUN=1`), where the tests whose code paths do not
need CUDA run on the CPU with the same assertions: that is how the kit is checked before a GPU is at hand.
"""

from __future__ import annotations

import os

import pytest
import torch

CUDA = torch.cuda.is_available()
DRY_RUN = os.environ.get("WLORA_GPU_KIT_DRY_RUN") == "1"


@pytest.fixture
def device() -> str:
    """`cuda`, or `cpu` under the dry run; skips otherwise."""
    if CUDA:
        return "cuda"
    if DRY_RUN:
        return "cpu"
    pytest.skip("needs CUDA (or WLORA_GPU_KIT_DRY_RUN=1 for the CPU dry run)")


@pytest.fixture
def cuda() -> str:
    """For tests that only mean something on a GPU (CUDA generators, fp16 GradScaler, several devices)."""
    if not CUDA:
        pytest.skip("needs CUDA")
    return "cuda"
