"""fused_linear_cross_entropy against the naive head and the peers, forward + backward.

CPU: N=8192, H=1024, V=32768 in fp32. GPU: the Llama-3-8B head, N=8192, H=4096, V=128256 in bf16.
Asserted, from this run alone: fasttune's peak memory ≤ 0.15 × naive, and on the CPU ≤ torch's
chunked F.linear_cross_entropy. Time ratios are recorded, not asserted.
"""

import pytest
import torch

from harness import bench_case, peak_memory

ON_GPU = torch.cuda.is_available()
KERNEL = "fused_linear_cross_entropy"
if ON_GPU:
    SHAPES, DTYPE = [{"N": 8192, "H": 4096, "V": 128256}], "bf16"
else:
    SHAPES, DTYPE = [{"N": 8192, "H": 1024, "V": 32768}], "fp32"
PROVIDERS = ["naive", "torch_chunked", "torch_compile", "liger", "cce", "matmul_floor", "fasttune"]


def _id(shape):
    return "N{N}-H{H}-V{V}".format(**shape)


@pytest.mark.parametrize("shape", SHAPES, ids=_id)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_flce(benchmark, recorder, provider, shape):
    N, H, V = shape["N"], shape["H"], shape["V"]
    bench_case(benchmark, recorder, KERNEL, provider, shape, DTYPE, tokens=N, flops=6 * N * H * V)


@pytest.mark.parametrize("shape", SHAPES, ids=_id)
def test_flce_memory_bounds(shape):
    ours = peak_memory(KERNEL, "fasttune", shape, DTYPE)
    naive = peak_memory(KERNEL, "naive", shape, DTYPE)
    assert ours <= 0.15 * naive, f"fasttune peak {ours / 2**20:.0f} MiB > 0.15 × naive {naive / 2**20:.0f} MiB"
    if not ON_GPU:
        chunked = peak_memory(KERNEL, "torch_chunked", shape, DTYPE)
        assert ours <= chunked, f"fasttune peak {ours / 2**20:.0f} MiB > torch chunked {chunked / 2**20:.0f} MiB"
