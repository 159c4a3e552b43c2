"""Rollout tokens/s on the real model (bench/rollout.py): fasttune's QLoRA policy sampling live, through
its merged dense copy (dynamic and static KV cache, continuous batching), against plain transformers
`generate` on the dense model, same prompts and lengths, in one run; the copy's memory beside it.
On a GPU, bench/gpu_check.sh's rollout stage runs the larger sizes instead."""

import pytest
import torch

import rollout

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU: bench/gpu_check.sh's rollout stage")

SIZE = {"prompts": 4, "generations": 2, "new_tokens": 16}


def test_rollout_tokens_per_s(recorder):
    results = rollout.measure(rollout.PROVIDERS, SIZE["prompts"], SIZE["generations"], SIZE["new_tokens"], rounds=2,
                              dev=torch.device("cpu"), emit=recorder.append)
    by = {r.provider: r for r in results}
    assert not by["hf_dense"].skipped and not by["fasttune_merged"].skipped, {p: r.skipped for p, r in by.items()}
    assert by["fasttune_merged"].extra["copy_bytes"] > 0
