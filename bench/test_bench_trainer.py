"""The trainer's throughput and memory: `make demo`'s QLoRA run on the built-in tiny Llama.

Time is the whole command (process start and model load included); tokens/s is the mean of the
steps' own rates and peak memory the training process's peak RSS, both from its metrics.jsonl.
The whole-model comparison against transformers + PEFT + bitsandbytes (padded batches, SDPA, full
logits) and Liger-Kernel is bench/e2e.py (bench/test_bench_e2e.py at a tiny shape).
"""

import pytest
import torch

import cases
from harness import bench_case

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the trainer's CPU examples; on a GPU the device "
                                "time goes to the kernel suites and bench/e2e.py's whole-model steps")

SHAPE = {"steps": 100}


def _mean(rows, key):
    return sum(r[key] for r in rows) / len(rows)


def _from_run(res):
    """The run's own numbers: the steps' mean rate (not the process setup) and its peak RSS."""
    rows = cases.LAST_RUN["rows"]
    res.tokens_per_s, res.tflops = _mean(rows, "tokens_per_s"), None
    res.peak_bytes = int(max(r["peak_memory_mb"] for r in rows) * 2**20)
    return rows


def test_sft_demo(benchmark, recorder):
    res = bench_case(benchmark, recorder, "sft_demo", "fasttune", SHAPE, "fp32", tokens=1, flops=0, rounds=1,
                     memory=False)
    rows = _from_run(res)
    res.extra = {"first_loss": rows[0]["loss"], "last_loss": rows[-1]["loss"]}


@pytest.mark.parametrize("ranks", [1, 2])
def test_sft_ranks(benchmark, recorder, ranks):
    """torchrun with 1 and 2 CPU processes, the same global batch: global tokens/s as a smoke result only."""
    res = bench_case(benchmark, recorder, "sft_ranks", "fasttune", {"steps": 30, "ranks": ranks}, "fp32", tokens=1,
                     flops=0, rounds=1, memory=False)
    rows = _from_run(res)
    res.extra = {"last_loss": rows[-1]["loss"]}


DPO = {"pairs": 8, "4bit": True}


@pytest.mark.parametrize("provider", ["naive", "fasttune"])
def test_dpo_step(benchmark, recorder, provider):
    """A DPO forward + backward of the example's micro-batch (8 pairs, QLoRA) against the plain way (full
    logits for policy and reference). The tiny model's vocabulary is 260, so this measures the trainer's
    path, not the fused head's memory saving, which grows with the vocabulary (see dpo_loss above)."""
    res = bench_case(benchmark, recorder, "dpo_step", provider, DPO, "fp32", tokens=1, flops=0)
    res.tokens_per_s, res.tflops = cases.LAST_RUN["dpo_tokens"] / res.median_s, None


def test_grpo_demo(benchmark, recorder):
    """The GRPO example: where a step's time goes (generation, reference, policy forward + backward)."""
    res = bench_case(benchmark, recorder, "grpo_demo", "fasttune", {"steps": 20}, "fp32", tokens=1, flops=0,
                     rounds=1, memory=False)
    rows = _from_run(res)
    res.extra = {"split": {k: round(_mean(rows, k), 4) for k in ("generation_s", "reference_s", "training_s")}}
