"""Shared test set-up: few torch threads (several test processes and clients share two cores), offline hub."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module of small matrix products: the two cores are shared with other test
    processes, and OpenMP threads waiting for each other under contention make such products many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
