"""Several processes: `torchrun` over gloo on CPU processes, the way DDP and FSDP2 run on GPUs.

The global batch is the unit: 2 ranks × 1 micro-batch train exactly as 1 process × 2 micro-batches
(losses and gradient norms to fp32 precision). A killed rank ends the job and the run resumes from
its last checkpoint; a resume on another world size continues exactly or is refused."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fasttune.checkpoint import ResumeError
from fasttune.config import ConfigError, load_config
from fasttune.distributed import mode_for

# CPU processes against a CPU process: on a GPU machine the ranks would ask for GPUs it may not have
# (one each), and the in-process runs would run on the GPU. bench/gpu_check.sh runs torchrun there.
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-process (gloo) tests; a GPU machine runs "
                                "torchrun on its GPU in bench/gpu_check.sh")
ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
# constant learning rate: runs of different lengths take identical steps
SAME = ["train.lr_scheduler=\"constant\"", "train.warmup_steps=0", "run.log_every=1", "run.keep=10"]


def sets(out, *extra):
    return [f"run.output_dir={json.dumps(str(out))}", *SAME, *extra]


def rows(out):
    return [json.loads(line) for line in open(Path(out) / "metrics.jsonl")]


def in_process(command, config, out, *extra):
    """One process (no torchrun), as `fasttune COMMAND` runs it."""
    from fasttune.dpo import train_dpo
    from fasttune.grpo import train_grpo
    from fasttune.sft import train_sft

    train = {"sft": train_sft, "dpo": train_dpo, "grpo": train_grpo}[command]
    return train(load_config(EXAMPLES / config, sets(out, *extra)), log=lambda *_: None)


def torchrun(command, config, out, *extra, nproc=2):
    """`torchrun --nproc_per_node N -m fasttune COMMAND CONFIG --set ...`, not waited for."""
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "fasttune", command, str(EXAMPLES / config), *[x for s in sets(out, *extra) for x in ("--set", s)]]
    return subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def launch(command, config, out, *extra, nproc=2):
    """`fasttune COMMAND CONFIG --nproc N`, the shortcut that starts torchrun; waits, returns (rc, output)."""
    argv = [sys.executable, "-m", "fasttune", command, str(EXAMPLES / config), "--nproc", str(nproc),
            *[x for s in sets(out, *extra) for x in ("--set", s)]]
    p = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600)
    return p.returncode, p.stdout + p.stderr


def assert_same_steps(a, b, rel=1e-5):
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b):
        assert x["trained_tokens"] == y["trained_tokens"], (x, y)
        assert x["loss"] == pytest.approx(y["loss"], rel=rel, abs=1e-6), (x, y)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-4), (x, y)


def test_qlora_ddp_equals_accumulation_and_survives_a_killed_rank(tmp_path):
    """QLoRA under DDP: 2 ranks × 1 micro-batch = 1 process × 2. Rank 1 killed mid-run: the job ends
    (no hang), the last checkpoint is intact, and the resumed run finishes with the same losses."""
    steps = ["train.max_steps=24", "run.save_every=4"]
    in_process("sft", "sft.toml", tmp_path / "one", "train.grad_accum=2", *steps)

    out = tmp_path / "two"
    job = torchrun("sft", "sft.toml", out, *steps)
    deadline = time.time() + 300
    while time.time() < deadline and job.poll() is None:
        if (out / "metrics.jsonl").exists() and len((out / "metrics.jsonl").read_text().splitlines()) >= 10:
            break
        time.sleep(0.05)
    workers = [int(p) for p in Path(f"/proc/{job.pid}/task/{job.pid}/children").read_text().split()]
    assert len(workers) == 2, workers
    os.kill(workers[1], signal.SIGKILL)
    output = job.communicate(timeout=120)[0]
    assert job.returncode != 0, output
    kept = sorted(p.name for p in (out / "checkpoints").glob("step-*"))
    assert kept and kept[-1] < "step-000024", kept

    rc, output = launch("sft", "sft.toml", out, *steps)
    assert rc == 0, output
    assert f"resuming from {out / 'checkpoints' / kept[-1]}" in output
    assert_same_steps(rows(out), rows(tmp_path / "one"))


def test_fsdp_full_finetune_equals_accumulation_and_resumes_on_another_world_size(tmp_path):
    """Full fine-tuning under FSDP2 (auto): sharded, the same steps as one process; its checkpoints hold
    the whole model, so one process resumes them exactly with the same global batch, and a resume that
    changes the global batch is refused, naming it."""
    full = ["model.finetune=\"full\"", "train.learning_rate=1e-4", "run.save_every=2"]
    in_process("sft", "sft.toml", tmp_path / "one", "train.grad_accum=2", "train.max_steps=6", *full)

    out = tmp_path / "two"
    rc, output = launch("sft", "sft.toml", out, "train.max_steps=4", *full)
    assert rc == 0, output
    assert "2 processes (fsdp)" in output
    assert (out / "checkpoints" / "step-000004" / "model.safetensors").is_file()
    with pytest.raises(ResumeError, match=r"micro-batches per step \(train.grad_accum × processes\): 2 -> 1"):
        in_process("sft", "sft.toml", out, "train.max_steps=6", *full)
    in_process("sft", "sft.toml", out, "train.grad_accum=2", "train.max_steps=6", *full)  # 1 process × 2
    assert_same_steps(rows(out), rows(tmp_path / "one"))


def test_dpo_ddp_with_a_precomputed_reference_equals_accumulation(tmp_path):
    """DPO: the reference log-probs are computed once, shared out over the ranks, and gathered."""
    extra = ["dpo.reference=\"precompute\"", "train.max_steps=3", "train.micro_batch_size=2"]
    in_process("dpo", "dpo.toml", tmp_path / "one", "train.grad_accum=2", *extra)
    rc, output = launch("dpo", "dpo.toml", tmp_path / "two", *extra)
    assert rc == 0, output
    assert_same_steps(rows(tmp_path / "two"), rows(tmp_path / "one"))
    assert [r["reward_accuracy"] for r in rows(tmp_path / "two")] == \
        pytest.approx([r["reward_accuracy"] for r in rows(tmp_path / "one")])
    assert len(list((tmp_path / "two").glob("reference_logps-train-*.pt"))) == 1


def test_grpo_ddp_trains_and_one_failing_rank_ends_the_job(tmp_path):
    """GRPO: each rank samples its own prompts' groups; rewards are reduced over ranks. A reward
    function that fails on rank 1 only ends the job on both ranks, with rank 1's message; a loss
    that is not finite on rank 1 only stops both ranks before the optimizer step."""
    rc, output = launch("grpo", "grpo.toml", tmp_path / "ok", "train.max_steps=2")
    assert rc == 0, output
    last = rows(tmp_path / "ok")[-1]
    assert last["step"] == 2 and {"reward", "reward/math_answer", "kl", "generation_s"} <= set(last)

    start = time.time()
    rc, output = launch("grpo", "grpo.toml", tmp_path / "bad", "train.max_steps=2",
                        f"grpo.reward_funcs=[\"{ROOT / 'tests' / 'grpo_rewards.py'}:fails_on_rank_1\"]",
                        "grpo.reward_weights=[]")
    assert rc != 0
    assert "error (rank 1 of 2): reward function" in output and "rank 1 met a record it cannot score" in output
    assert time.time() - start < 300

    # a non-finite loss on rank 1 alone is in the summed loss: both ranks stop before the optimizer step
    rc, output = launch("grpo", "grpo.toml", tmp_path / "nan", "train.max_steps=2", 'grpo.scale_rewards="none"',
                        f"grpo.reward_funcs=[\"{ROOT / 'tests' / 'grpo_rewards.py'}:overflows_on_rank_1\"]",
                        "grpo.reward_weights=[]")
    assert rc != 0
    # rank 1's message always; rank 0 stops at the same check, unless torchrun has ended it first
    assert "error (rank 1 of 2): the loss is" in output and "stopped before the optimizer step" in output, output
    metrics = tmp_path / "nan" / "metrics.jsonl"
    assert not metrics.exists() or not metrics.read_text().strip()  # rank 0 took no step either


def test_qlora_under_fsdp_is_refused_with_what_to_do(tmp_path):
    cfg = load_config(EXAMPLES / "sft.toml", ["train.parallel=\"fsdp\""])
    with pytest.raises(ConfigError, match=r"train.parallel = \"ddp\""):
        mode_for(cfg, launched=True)
    assert mode_for(cfg, launched=False) == "none"
    assert mode_for(load_config(EXAMPLES / "sft.toml", ["model.finetune=\"full\""]), True) == "fsdp"
    assert mode_for(load_config(EXAMPLES / "sft.toml"), True) == "ddp"
    # --nproc refuses it before starting torchrun: one line, exit code 2
    from fasttune.cli import main

    assert main(["sft", str(EXAMPLES / "sft.toml"), "--nproc", "2", "--set", "train.parallel=\"fsdp\""]) == 2
