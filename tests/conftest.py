"""Test-session setup: offline Prefect, quiet logs, seeded and single-threaded torch."""

from __future__ import annotations

import os
import tempfile

# Set before Prefect, timm or huggingface_hub are imported anywhere.
_PREFECT_HOME = tempfile.mkdtemp(prefix="carrot-test-prefect-")
os.environ.setdefault("PREFECT_HOME", _PREFECT_HOME)
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["DO_NOT_TRACK"] = "1"
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("CARROT_HOME", tempfile.mkdtemp(prefix="carrot-test-home-"))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect server for the whole test session (entering it costs ~8 s)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness():
        yield
