"""fasttune beside TRL (SFTTrainer, DPOTrainer, GRPOTrainer with PEFT + bitsandbytes NF4) on the real
model, each run in a fresh process (bench/trl_compare.py says exactly what is the same on both sides).

Asserted: both sides run; the first losses (SFT) and the first step's mean chosen log-prob (DPO) agree
to 1e-3; fasttune's peak memory (SFT, DPO) under 0.9 x TRL's and its CPU time per step within 2 x TRL's
(same-run ratios, with margin). Every goal of issue #19 is reported as met or missed in the result's `goals` and
in the terminal output; none is asserted. BENCH_TRL_STEPS (default 4: the first step for the loss, the
rest timed) sets the steps of every run.
"""

import pytest
import torch

import trl_compare as tc

# issue #19's goals, as same-run ratios on the CPU: (trained tokens/s ≥ x TRL's, peak memory ≤ y TRL's)
GOALS = {"sft": (2.5, 0.6), "dpo": (2.0, 0.5), "grpo": (3.0, None)}
PROVIDERS = ["fasttune", "trl"] + (["trl_liger"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module")
def prepared():
    return tc.model_folder(), tc.adapter_folder()


def _goals(task, ours, peer):
    speed, memory = GOALS[task]
    key = "median_s"  # GRPO: a step; SFT, DPO: trained tokens/s (same batch on both sides, so the same ratio)
    ratio = getattr(peer, key) / getattr(ours, key)
    cpu = peer.extra["cpu_s_per_step"] / ours.extra["cpu_s_per_step"]
    out = {"speed_ratio": round(ratio, 3), "cpu_time_ratio": round(cpu, 3), "speed_goal": speed,
           "speed_met": ratio >= speed}
    if task != "grpo":
        tok = ours.extra["trained_tokens_per_s"] / peer.extra["trained_tokens_per_s"]
        out["trained_tokens_per_s_ratio"] = round(tok, 3)
    if memory is not None:
        mem = ours.peak_bytes / peer.peak_bytes
        out.update(memory_ratio=round(mem, 3), memory_goal=memory, memory_met=mem <= memory)
    # Other processes on the cores slow torch's threads unevenly (5-20 x when 2 threads share 2 busy cores):
    # ratios measured while other processes kept a quarter of a core or more busy say little, and are marked.
    out["other_cores"] = max(r.extra.get("other_cores") or 0.0 for r in (ours, peer))
    out["quiet_machine"] = out["other_cores"] < 0.25
    return out


@pytest.mark.parametrize("task", tc.TASKS)
def test_beside_trl(recorder, prepared, tmp_path, task, capsys):
    rs = tc.compare(task, PROVIDERS, recorder.append, tmp_path)
    ours, peer = rs["fasttune"], rs["trl"]
    assert not ours.skipped, ours.skipped
    assert not peer.skipped, peer.skipped  # TRL is a dev dependency: it must run on every CI machine
    if task != "grpo":  # GRPO: different samples on the two sides, so no loss to compare
        assert peer.extra["agrees"], (f"first-step numbers differ by {peer.extra['max_rel_diff']:.2e}: fasttune "
                                      f"{ours.extra['warmup_losses'] + ours.extra['warmup_checks']}, TRL "
                                      f"{peer.extra['warmup_losses'] + peer.extra['warmup_checks']}")
    goals = _goals(task, ours, peer)
    ours.extra["goals"] = goals
    with capsys.disabled():
        print(f"\n{task}: fasttune vs TRL: {goals}")
    # Bounds with margin on 2 shared cores (measured ratios: docs/trl-comparison.md). Memory (SFT 0.66
    # after the memory fix, DPO 0.88 before it, ~0.7 expected after): under 0.9 x TRL's; GRPO's are about equal
    # (loading dominates), so none is asserted. Speed: CPU seconds per step (robust to other processes'
    # load, unlike wall time) at most 2 x TRL's. The goals themselves are reported, not asserted.
    if task != "grpo":
        assert ours.peak_bytes < 0.9 * peer.peak_bytes, goals
    assert goals["cpu_time_ratio"] > 0.5, goals
