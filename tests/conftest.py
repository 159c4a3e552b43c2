"""Test setup: the Triton path runs under the interpreter when there is no CUDA.

TRITON_INTERPRET must be set before triton is imported, so this happens before any import of
torch, triton or fasttune. FASTTUNE_NAN_FILL makes kernels' output buffers start as NaN so
that a row a kernel never writes fails the comparison instead of passing on stale memory.
FASTTUNE_4BIT_CACHE keeps the 4-bit copies of the suite's models in a folder of the session.
"""

import atexit
import os
import shutil
import subprocess
import tempfile


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
# QLoRA loads save a 4-bit copy of their model folder (fasttune/quantized_cache.py); the suite's
# many throwaway models keep theirs in a folder of this session, gone at its end.
_4BIT = tempfile.mkdtemp(prefix="fasttune-4bit-")
atexit.register(shutil.rmtree, _4BIT, True)
os.environ.setdefault("FASTTUNE_4BIT_CACHE", _4BIT)

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
