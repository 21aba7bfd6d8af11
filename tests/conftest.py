"""Shared test setup: deterministic, offline, CPU."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# fast mode's compiled-graph files (issue 18) go to a temporary folder, never the user's cache
import tempfile  # noqa: E402

os.environ.setdefault("T2IADAPTER_COMPILE_CACHE", tempfile.mkdtemp(prefix="t2iadapter-test-compiled-"))

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def one_thread():
    """One intra-op thread: the same reductions in every run (and the CPU is shared); `usefixtures` it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def base():
    """The seeded tiny SD1-shaped base, one per test module (a module's tests may share and change it)."""
    from t2iadapter.bases import load_base

    return load_base("tiny")



@pytest.fixture(scope="module")
def sd_base(base):
    """`base` under the name the tests that compare SD1 and SDXL use."""
    return base


@pytest.fixture(scope="module")
def xl_base():
    """The seeded tiny SDXL-shaped base (two text encoders, added conditions), one per test module."""
    from t2iadapter.bases import load_base

    return load_base("tiny-xl")
