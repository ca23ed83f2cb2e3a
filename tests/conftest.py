"""Test hygiene: offline hub, one torch thread (fast and deterministic on 2 cores), shared tiny fixtures."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# One thread by default (fast and deterministic on 2 cores); the portability job in .ci/run sets
# GOCA_TEST_THREADS=2 to show that no exact assertion depends on the thread count.
torch.set_num_threads(int(os.environ.get("GOCA_TEST_THREADS", "1")))


@pytest.fixture(scope="session")
def tiny_components_factory():
    """Builds fresh tiny components (the same weights every time) for a scheduler name."""
    from goca_scfg.testing import tiny_components

    return tiny_components
