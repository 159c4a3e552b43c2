"""varlen_attention, forward + backward, against the other ways to attend within packed samples.

GPU: fasttune's Triton kernel against torch's varlen_attn (flash-attention 2 inside PyTorch),
FlexAttention with a document mask, and padded SDPA, on fixed, uniform and SFT-like length mixes.
Goal there: ≥ 0.9 × varlen_attn and ≥ 2 × padded SDPA on the SFT-like mix.
CPU: fasttune's PyTorch path (per-sample SDPA) against a plain per-sample loop and padded SDPA, so
that CI tracks it. Nothing is asserted here: the correctness tests are in tests/test_attention.py.
"""

import pytest
import torch

from cases import attention_flops, sample_lengths
from harness import bench_case

if torch.cuda.is_available():
    DTYPE = "bf16"
    SHAPES = [
        {"T": 16384, "Hq": 32, "Hkv": 8, "D": 128, "mix": "sft"},
        {"T": 16384, "Hq": 32, "Hkv": 8, "D": 128, "mix": "uniform"},
        {"T": 16384, "Hq": 32, "Hkv": 8, "D": 128, "mix": "fixed"},
        {"T": 65536, "Hq": 32, "Hkv": 8, "D": 128, "mix": "sft"},
        {"T": 16384, "Hq": 32, "Hkv": 32, "D": 64, "mix": "sft"},
    ]
else:
    DTYPE = "fp32"
    SHAPES = [{"T": 4096, "Hq": 8, "Hkv": 2, "D": 64, "mix": "sft"}]
PROVIDERS = ["sdpa_padded", "per_sample", "varlen_attn", "flex", "fasttune"]


def _id(s):
    return "T{T}-H{Hq}x{Hkv}-D{D}-{mix}".format(**s)


@pytest.mark.parametrize("shape", SHAPES, ids=_id)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_varlen_attention(benchmark, recorder, provider, shape):
    lens = sample_lengths(shape["mix"], shape["T"], torch.Generator().manual_seed(0))
    bench_case(benchmark, recorder, "varlen_attention", provider, shape, DTYPE, tokens=shape["T"],
               flops=attention_flops(lens, shape["Hq"], shape["D"]))
