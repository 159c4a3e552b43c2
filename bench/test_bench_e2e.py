"""End-to-end QLoRA training steps (bench/e2e.py) at a tiny shape, so the GPU benchmark cannot rot.

The same code as the full shapes `bench/gpu_check.sh` runs (`python bench/e2e.py`): NF4 + LoRA r=16
models built from a config with random weights, SFT (packed row vs padded batch), DPO and GRPO steps,
every provider from the same LoRA weights on the same seeded batches. Asserted: the providers' first
losses (and, for DPO and GRPO, the policy's / reference's log-probs) agree within the dtype's
tolerance, and the counts are right. The CPU numbers are a smoke test of a 2-layer model, not a result.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import e2e
import report
from e2e_models import build_qlora

TINY = e2e.TINY
WARMUP, TIMED = 2, 2


@pytest.fixture(scope="module", params=["llama-tiny", "qwen2-tiny"])
def tiny(request):
    dev = e2e.device()
    model = build_qlora(request.param, dev, e2e.compute_dtype(dev))
    return request.param, model, e2e.lora_snapshot(model)


def _run(recorder, kind, tiny, providers, shape):
    name, model, init = tiny
    results = e2e.run_case(kind, name, model, init, providers, shape, recorder.append, warmup=WARMUP, timed=TIMED)
    return {r.provider: r for r in results}


def _assert_agree(rs):
    done = [r for r in rs.values() if not r.skipped]
    assert len(done) >= 2, {p: r.skipped for p, r in rs.items()}
    for r in done[1:]:
        assert r.extra["agrees"], (f"{r.provider} vs {r.extra['agrees_with']}: max relative difference "
                                   f"{r.extra['max_rel_diff']:.2e}; {r.extra} vs {done[0].extra}")


def test_model_is_real_qlora(tiny):
    """NF4 bitsandbytes layers under PEFT's 4-bit LoRA layers on every decoder linear, on the CPU too."""
    import bitsandbytes as bnb
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    name, model, init = tiny
    layers = model.get_base_model().model.layers
    lora = [m for m in layers.modules() if isinstance(m, LoraLinear4bit)]
    assert len(lora) == 7 * len(layers)
    assert all(isinstance(m.base_layer, bnb.nn.Linear4bit) and m.base_layer.weight.quant_state.quant_type == "nf4"
               for m in lora)
    assert len(init) == 2 * len(lora) and all(p.requires_grad for p in e2e.lora_params(model))


def test_sft_step(recorder, tiny):
    rs = _run(recorder, "e2e_sft", tiny, ["fasttune", "hf_plain"], {"seq": TINY["seq"]})
    _assert_agree(rs)
    ours, plain = rs["fasttune"], rs["hf_plain"]
    assert ours.extra["tokens_per_step"] == TINY["seq"] == plain.extra["tokens_per_step"]  # one packed row, same samples
    assert ours.extra["padded_tokens_per_step"] == TINY["seq"] < plain.extra["padded_tokens_per_step"]
    assert 0 < ours.extra["trained_tokens_per_s"] < ours.tokens_per_s


def test_dpo_step(recorder, tiny):
    shape = {k: TINY[k] for k in ("pairs", "prompt", "response")}
    rs = _run(recorder, "e2e_dpo", tiny, ["fasttune", "hf_plain"], shape)
    _assert_agree(rs)
    assert rs["fasttune"].extra["warmup_checks"][0] < 0  # a sum of log-probs


def test_grpo_step(recorder, tiny):
    shape = {k: TINY[k] for k in ("prompts", "generations", "prompt", "completion")}
    rs = _run(recorder, "e2e_grpo", tiny, ["fasttune", "hf_plain"], shape)
    _assert_agree(rs)
    for r in rs.values():
        split = r.extra["split"]
        assert all(v > 0 for v in split.values()), split
        assert sum(split.values()) <= r.median_s * 1.05 + 1e-3, (split, r.median_s)


def test_command_line_appends_each_result(tmp_path):
    """What bench/gpu_check.sh runs: one JSON line per provider (Liger last), exit 0 when all agree."""
    out = tmp_path / "e2e.jsonl"
    run = subprocess.run([sys.executable, str(Path(e2e.__file__)), "--out", str(out), "--model", "qwen2-tiny",
                          "--cases", "sft:1024"], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["provider"] for r in lines] == ["fasttune", "hf_plain", "liger"]
    assert lines[1]["extra"]["agrees"] and all(r["env"]["commit"] for r in lines)
    table = report.tables(report.load(out))
    assert "**e2e_sft** (qwen2-tiny, seq=1024" in table and "| hf_plain |" in table


def test_sft_step_liger(recorder, tiny):
    """Last: Liger-Kernel patches the model for good. Skipped with its reason where it cannot run."""
    providers = ["hf_plain", "liger"] if torch.cuda.is_available() else ["liger"]  # on the CPU: the skip only
    rs = _run(recorder, "e2e_sft", tiny, providers, {"seq": TINY["seq"]})
    if rs["liger"].skipped:
        pytest.skip(rs["liger"].skipped)
    _assert_agree(rs)
