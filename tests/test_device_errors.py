"""`aftermath client --device ...` with a device that is malformed or absent: one line naming the value and the
fix, exit 2, no traceback, and before the coordinator is contacted (nothing listens at the URL given: a client
that went on would wait for it for --give-up-after seconds). Every case runs the real command."""

from __future__ import annotations

import pytest
import torch

from aftermath.client.loop import available_memory, resolve_device
from aftermath.errors import ConfigError
from test_cli_errors import aftermath, one_line_error

NOBODY = "http://127.0.0.1:9"  # the discard port: nothing answers there


def client(device: str):
    return aftermath("client", "--coordinator", NOBODY, "--token", "t", "--device", device,
                     "--give-up-after", "600")


@pytest.mark.parametrize("device", ["cuda:banana", "gpu"])
def test_a_malformed_device_is_one_line(device):
    one_line_error(client(device), f"--device {device!r}", "auto, cpu, cuda or cuda:N")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
@pytest.mark.parametrize("device", ["cuda"])
def test_cuda_without_a_gpu_is_one_line(device):
    one_line_error(client(device), f"--device {device}", "no CUDA GPU", "--device cpu")


def test_auto_and_cpu_resolve_here_and_the_budget_is_the_devices():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert available_memory(torch.device("cpu")) > 0
    if torch.cuda.is_available():  # the GPU's own free memory, not the host's
        assert available_memory(torch.device("cuda", 0)) == torch.cuda.mem_get_info(0)[0]
    with pytest.raises(ConfigError, match="cuda:x"):
        resolve_device("cuda:x")
