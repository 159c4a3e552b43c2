"""What the harness, the cases and the end-to-end benchmarks share: the device, waiting for it,
the dtypes by name, `Unavailable` for a provider that cannot run here, and peak memory in this
process (CUDA: the allocator's peak; CPU: peak RSS, VmHWM, reset through /proc/self/clear_refs)."""

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Unavailable(Exception):
    """A provider that cannot run here; the message says why."""


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def cuda_only(name):
    if not torch.cuda.is_available():
        raise Unavailable(f"{name} runs on CUDA only")


def rss(field: str = "VmRSS") -> int:
    """This process's resident memory (VmRSS) or its peak since the last reset (VmHWM), in bytes."""
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak():
    """Start a peak-memory window; `peak()` reads the highest total memory since then."""
    sync()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS


def peak() -> int:
    """Peak bytes since `reset_peak()`: allocated CUDA memory, or the process's RSS on the CPU."""
    sync()
    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else rss("VmHWM")


def in_use() -> int:
    """Bytes in use now, on the same scale as `peak()`."""
    sync()
    return torch.cuda.memory_allocated() if torch.cuda.is_available() else rss("VmRSS")
