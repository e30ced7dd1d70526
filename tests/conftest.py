"""Test-session setup: offline Prefect, quiet logs, seeded and single-threaded torch."""

from __future__ import annotations

import os
import tempfile

# Set before Prefect, timm or huggingface_hub are imported anywhere. Fresh homes in every
# process, pytest-xdist workers included (they inherit the controller's environment, and two
# workers sharing one CARROT_HOME would meet in its stores and locks); never the user's own.
_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "main")
os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix=f"carrot-test-prefect-{_WORKER}-")
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["DO_NOT_TRACK"] = "1"
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["CARROT_HOME"] = tempfile.mkdtemp(prefix=f"carrot-test-home-{_WORKER}-")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

# Property tests draw the same examples on every run (no example database between runs):
# a failure reproduces, and a pass today is a pass tomorrow.
settings.register_profile("carrot", derandomize=True, database=None)
settings.load_profile("carrot")

# One thread: tiny matmuls under OpenMP slow down 10×+ when another process holds a core.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect server for the whole test session (entering it costs ~8 s)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness():
        yield


# --- stage-1 data fixtures (generated images; see tests/image_factory.py) ---


@pytest.fixture(scope="session")
def shapes_folder(tmp_path_factory):
    """ImageFolder of drawn shapes (3 classes) with odd modes and one corrupt JPEG."""
    from image_factory import make_shapes_folder

    return make_shapes_folder(tmp_path_factory.mktemp("shapes") / "shapes")


@pytest.fixture(scope="session")
def cub_root(tmp_path_factory):
    """CUB-200-2011-like root (3 classes, 4 images each)."""
    from image_factory import make_cub_root

    return make_cub_root(tmp_path_factory.mktemp("cub"))


@pytest.fixture(scope="session")
def nabirds_root(tmp_path_factory):
    """NABirds-like root (sparse class ids, names with spaces)."""
    from image_factory import make_nabirds_root

    return make_nabirds_root(tmp_path_factory.mktemp("nabirds"))


@pytest.fixture(scope="session")
def csv_manifest(tmp_path_factory):
    """CSV manifest path,label,split (with header) over generated images."""
    from image_factory import make_csv_manifest

    return make_csv_manifest(tmp_path_factory.mktemp("csv"))
