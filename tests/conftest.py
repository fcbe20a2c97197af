"""pytest setup for the whole suite: offline hub, and the fixtures many tests use. Helpers live in testing_utils."""

from __future__ import annotations

import os

# Before anything imports huggingface_hub, which reads HF_HUB_OFFLINE once at import: set later, the hub client still
# tries the network and, with none here, waits out its retries (45 s in the unknown-model test).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from tests.testing_utils import char_tokenizer  # noqa: E402


@pytest.fixture
def tokenizer():
    return char_tokenizer()
