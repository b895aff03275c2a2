"""Shared test set-up: few torch threads (several test processes and clients share two cores), offline hub."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import settings  # noqa: E402

torch.set_num_threads(2)

# In CI, property tests and the route fuzzer draw the same examples every run (derandomized): a CI run checks
# the code, and new random inputs are explored by local runs, where a failure does not block a landing.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI", "").lower() == "true":
    settings.load_profile("ci")


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module of small matrix products: the two cores are shared with other test
    processes, and OpenMP threads waiting for each other under contention make such products many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
