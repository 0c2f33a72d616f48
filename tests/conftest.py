"""Fixtures shared by the test files."""
from __future__ import annotations

import pytest
import torch

from helpers import write_cifar


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    """A tiny CIFAR-10 binary folder (see ``helpers.write_cifar``)."""
    return write_cifar(tmp_path_factory.mktemp("data") / "cifar-10-batches-bin")


@pytest.fixture(autouse=True)
def keep_threads():
    """Tests that train set torch's thread count; put it back after each test."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
