"""dpo_loss, grpo_loss and kto_loss against the naive TRL way (full fp32 logits, log_softmax, gather).

Both with a frozen head (the LoRA setting fasttune trains in): the gradient flows to the
hidden states. CPU: DPO with B=4 pairs of T=1024 (half prompt), GRPO with 8 completions of 512, KTO with
8 completions of 1024 (half prompt),
H=1024, V=32768, fp32. GPU: the Llama-3-8B head in bf16, Liger-Kernel's chunked losses as peers.
Asserted, from this run alone: fasttune's peak memory ≤ 0.2 × naive. Time ratios are recorded.
"""

import pytest
import torch

from harness import bench_case, peak_memory

ON_GPU = torch.cuda.is_available()
HEAD = {"H": 4096, "V": 128256} if ON_GPU else {"H": 1024, "V": 32768}
DTYPE = "bf16" if ON_GPU else "fp32"
DPO = {"B": 4, "T": 1024, **HEAD}
GRPO = {"G": 8, "T": 512, **HEAD}
KTO = {"B": 8, "T": 1024, **HEAD}
PROVIDERS = ["naive", "liger", "fasttune"]


@pytest.mark.parametrize("provider", PROVIDERS)
def test_dpo(benchmark, recorder, provider):
    tokens = 2 * DPO["B"] * DPO["T"]
    # head matmuls a naive frozen-head step does: logits and dh, on every token
    bench_case(benchmark, recorder, "dpo_loss", provider, DPO, DTYPE, tokens=tokens,
               flops=4 * tokens * DPO["H"] * DPO["V"])


@pytest.mark.parametrize("provider", PROVIDERS)
def test_grpo(benchmark, recorder, provider):
    tokens = GRPO["G"] * GRPO["T"]
    bench_case(benchmark, recorder, "grpo_loss", provider, GRPO, DTYPE, tokens=tokens,
               flops=4 * tokens * GRPO["H"] * GRPO["V"])


@pytest.mark.parametrize("provider", PROVIDERS)
def test_kto(benchmark, recorder, provider):
    tokens = KTO["B"] * KTO["T"]
    bench_case(benchmark, recorder, "kto_loss", provider, KTO, DTYPE, tokens=tokens,
               flops=4 * tokens * KTO["H"] * KTO["V"])


@pytest.mark.parametrize("kernel,shape", [("dpo_loss", DPO), ("grpo_loss", GRPO), ("kto_loss", KTO)],
                         ids=["dpo", "grpo", "kto"])
def test_memory_bound(kernel, shape):
    ours = peak_memory(kernel, "fasttune", shape, DTYPE)
    naive = peak_memory(kernel, "naive", shape, DTYPE)
    assert ours <= 0.2 * naive, f"{kernel}: fasttune peak {ours / 2**20:.0f} MiB > 0.2 × naive {naive / 2**20:.0f} MiB"
