"""Test setup: the Triton path runs under the interpreter when there is no CUDA.

TRITON_INTERPRET must be set before triton is imported, so this happens before any import of
torch, triton or fasttune. FASTTUNE_NAN_FILL makes kernels' output buffers start as NaN so
that a row a kernel never writes fails the comparison instead of passing on stale memory.
"""

import os
import shutil
import subprocess


def _has_cuda() -> bool:
    # Decided without importing torch (which would be harmless) or triton (which would not be).
    if os.environ.get("CUDA_VISIBLE_DEVICES") == "":
        return False
    return shutil.which("nvidia-smi") is not None and subprocess.run(
        ["nvidia-smi", "-L"], capture_output=True
    ).returncode == 0


if not _has_cuda():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("FASTTUNE_NAN_FILL", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


if torch.cuda.is_available():
    # On a GPU machine every test's tensors are made on CUDA, so the whole suite exercises the
    # compiled Triton kernels (and the torch path on CUDA), not only the gpu-marked tests.
    torch.set_default_device("cuda")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (no GPU on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
