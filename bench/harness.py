"""The benchmark harness: one way to time, measure memory and record every case.

A case is a kernel (or workload) at one shape and dtype, run by one provider (fasttune, the naive
PyTorch way, or a peer). Time comes from pytest-benchmark in the test process (median of
rounds after a warm-up; short cases get more rounds, for at least 2 s of timed work). Peak memory comes from a fresh subprocess (`bench/probe.py`) that runs
the case once to warm up, then once more measured:
- CUDA: torch.cuda.max_memory_allocated() over the allocation before the run;
- CPU:  the process's peak RSS (VmHWM, reset through /proc/self/clear_refs) over its RSS before
  the run, with glibc told to hand every block of 64 KiB or more back to the system, so the
  number counts every allocation the case makes, torch's or not.
Peers that are not installed, or do not run on this device, raise `Unavailable`: the case is
skipped with the reason and recorded as skipped, never timed with a stand-in.
"""

import datetime
import functools
import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from common import Unavailable, device, sync  # noqa: F401 - the harness's API for the benchmark files

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"


MIN_TIMED_S = 2.0  # seconds of timed rounds per case at least (short cases get more rounds)
MAX_ROUNDS = 30


@dataclass
class Result:
    kernel: str
    shape: dict
    dtype: str
    provider: str
    device: str
    median_s: float | None = None
    min_s: float | None = None
    rounds: int = 0
    peak_bytes: int | None = None
    tokens_per_s: float | None = None
    tflops: float | None = None
    skipped: str | None = None
    extra: dict = field(default_factory=dict)


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    cpu = platform.processor() or "cpu"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu} ({os.cpu_count()} cores)"


def _version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


@functools.cache
def env_info() -> dict:
    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        except OSError:
            return ""

    packages = ["fasttune", "torch", "triton", "transformers", "peft", "bitsandbytes", "liger-kernel",
                "cut-cross-entropy", "flash-attn"]
    return {
        "device": device_name(),
        "date": datetime.date.today().isoformat(),
        "commit": git("rev-parse", "--short", "HEAD") + ("-dirty" if git("status", "--porcelain", "--", "kernels", "fasttune") else ""),
        "python": platform.python_version(),
        "versions": {p: v for p in packages if (v := _version(p))},
        "cuda": torch.version.cuda,
    }


_memory_cache: dict = {}


def cuda_peak(run) -> int:
    """Peak CUDA bytes one call of `run` allocates over what was allocated before it."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def peak_memory(kernel: str, provider: str, shape: dict, dtype: str, run=None) -> int:
    """Peak bytes one forward + backward of the case allocates: on CUDA in this process (the
    allocator's own count, exact and resettable), on the CPU in a fresh process (peak RSS)."""
    key = (kernel, provider, json.dumps(shape, sort_keys=True), dtype)
    if key not in _memory_cache and torch.cuda.is_available():
        if run is None:
            from cases import make_case

            run = make_case(kernel, provider, shape, dtype)
            run()  # warm-up
        _memory_cache[key] = cuda_peak(run)
    if key not in _memory_cache:
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
        out = subprocess.run(
            [sys.executable, str(BENCH / "probe.py"), kernel, provider, json.dumps(shape), dtype],
            capture_output=True, text=True, env=env, cwd=BENCH,
        )
        if out.returncode != 0:
            raise RuntimeError(f"memory probe for {kernel}/{provider} failed:\n{out.stderr[-3000:]}")
        _memory_cache[key] = json.loads(out.stdout.strip().splitlines()[-1])["peak_bytes"]
    return _memory_cache[key]


def results_path() -> Path:
    slug = "".join(c if c.isalnum() else "-" for c in device_name().lower()).strip("-")
    while "--" in slug:
        slug = slug.replace("--", "-")
    return RESULTS / f"{env_info()['date']}-{slug[:60]}.json"


def save(results: list[Result], path: Path | None = None) -> Path:
    """Merge these results into the device's file for today (same case and provider replaced)."""
    path = path or results_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(path.read_text())["results"] if path.exists() else []
    new = [asdict(r) for r in results]
    keys = {(r["kernel"], json.dumps(r["shape"], sort_keys=True), r["dtype"], r["provider"]) for r in new}
    kept = [r for r in old if (r["kernel"], json.dumps(r["shape"], sort_keys=True), r["dtype"], r["provider"]) not in keys]
    path.write_text(json.dumps({"env": env_info(), "results": kept + new}, indent=1) + "\n")
    return path


def bench_case(benchmark, recorder, kernel, provider, shape, dtype, *, tokens, flops, rounds=None, memory=True):
    """Time one case with pytest-benchmark, measure its memory, record both. Skips if unavailable."""
    import pytest

    from cases import PEERS, make_case

    res = Result(kernel, shape, dtype, provider, env_info()["device"])
    try:
        run = make_case(kernel, provider, shape, dtype)
        if provider in PEERS:
            run()  # a peer whose API changed is reported, not allowed to stop the suite
    except Unavailable as e:
        res.skipped = str(e)
    except Exception as e:  # noqa: BLE001 - only for peers, see above
        if provider not in PEERS:
            raise
        res.skipped = f"peer failed: {type(e).__name__}: {str(e)[:200]}"
    if res.skipped:
        recorder.append(res)
        pytest.skip(res.skipped)
    if rounds is None:
        # The warm-up call, timed, sets the rounds: at least BENCH_ROUNDS (3), and enough for
        # MIN_TIMED_S of timed work, so a 0.2 s case is a median of ~10 rounds, not of 3 noisy ones.
        t0 = time.perf_counter()
        run()
        first = time.perf_counter() - t0
        rounds = min(MAX_ROUNDS, max(int(os.environ.get("BENCH_ROUNDS", 3)), math.ceil(MIN_TIMED_S / max(first, 1e-6))))
        benchmark.pedantic(run, rounds=rounds, warmup_rounds=0, iterations=1)
    else:
        benchmark.pedantic(run, rounds=rounds, warmup_rounds=1, iterations=1)
    stats = benchmark.stats.stats
    res.median_s, res.min_s, res.rounds = stats.median, stats.min, rounds
    res.tokens_per_s = tokens / stats.median
    res.tflops = flops / stats.median / 1e12
    res.peak_bytes = peak_memory(kernel, provider, shape, dtype, run=run) if memory else None
    del run
    benchmark.extra_info.update(peak_bytes=res.peak_bytes, tokens_per_s=res.tokens_per_s, tflops=res.tflops)
    recorder.append(res)
    return res
