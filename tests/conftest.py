"""Shared fixtures (model factories) and the GPU skip hook; plain helpers live in support.py."""

from __future__ import annotations

import pytest
import torch

from support import TiedNet


@pytest.fixture
def tied_model() -> TiedNet:
    torch.manual_seed(0)
    return TiedNet()


@pytest.fixture
def make_mlp():
    def make(seed: int = 0, width: int = 8) -> torch.nn.Module:
        torch.manual_seed(seed)
        return torch.nn.Sequential(torch.nn.Linear(4, width), torch.nn.ReLU(), torch.nn.Linear(width, 2))

    return make


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 API server (moto in server mode, its own process on loopback) for the session."""
    from s3support import MotoServer

    server = MotoServer()
    yield server.endpoint
    server.stop()


@pytest.fixture
def s3_run(s3_endpoint):
    """``(url, storage_options)`` of a fresh directory in a fresh bucket of the test server."""
    from s3support import new_bucket, options

    return f"s3://{new_bucket(s3_endpoint)}/run", options(s3_endpoint)


def pytest_collection_modifyitems(config, items):
    """`@pytest.mark.gpu` tests run only where CUDA is available."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (run on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
