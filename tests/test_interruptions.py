"""Interrupted and damaged runs lose nothing: real signals to real `python -m fasttune` processes
(and two gloo ranks under torchrun), real damaged files, a real write failure (RLIMIT_FSIZE).

A stopped run writes a checkpoint of the step it was in, says so in one line, exits 143 (SIGTERM)
or 130 (SIGINT), and the same command resumes it with the losses of a run never interrupted."""

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fasttune import checkpoint
from fasttune.checkpoint import CheckpointError
from fasttune.config import load_config
from fasttune.sft import train_sft

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
ENV = dict(os.environ)
# small and quick: a full-precision base (no 4-bit dequantizing), a constant learning rate, no eval
FAST = ['model.load_in_4bit=false', 'train.lr_scheduler="constant"', "train.warmup_steps=0", 'data.eval=""',
        "run.log_every=1", "run.keep=10", "run.save_every=1000"]
TASKS = {"sft": ("sft.toml", ["train.micro_batch_size=256", "data.max_seq_len=256"]),
         "dpo": ("dpo.toml", ["train.micro_batch_size=2", "dpo.max_len=96", "dpo.max_prompt_len=48"]),
         # one iteration per sample: a stop between two iterations of one sample would resample
         "grpo": ("grpo.toml", ["grpo.num_iterations=1", "grpo.max_completion_len=8", "grpo.num_generations=2"])}
STEPS = 8


def argv(task, out, *extra):
    config, own = TASKS[task]
    sets = [f"run.output_dir={json.dumps(str(out))}", *FAST, *own, f"train.max_steps={STEPS}", *extra]
    return [sys.executable, "-m", "fasttune", task, str(EXAMPLES / config), *[x for s in sets for x in ("--set", s)]]


def start(cmd, log, **kw):
    return subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=log, stderr=subprocess.STDOUT, **kw)


def run(cmd, tmp_path, name, **kw):
    log = tmp_path / f"{name}.log"
    with open(log, "w") as f:
        rc = start(cmd, f, **kw).wait(timeout=600)
    return rc, log.read_text()


def losses(out):
    return [json.loads(line)["loss"] for line in open(Path(out) / "metrics.jsonl")]


def wait_for(proc, predicate, what, timeout=400):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        assert proc.poll() is None, f"the process ended (rc {proc.returncode}) before {what}"
        time.sleep(0.02)
    proc.kill()
    raise AssertionError(f"timed out waiting for {what}")


def logged_steps(out):
    m = Path(out) / "metrics.jsonl"
    return len(m.read_text().splitlines()) if m.exists() else 0


def stop_and_resume(tmp_path, cmd, out, signum, after_step, group=False, resume_cmd=None):
    """Start `cmd`, send `signum` once step `after_step` is logged (to the process, or to its whole
    process group as Ctrl-C in a terminal does), check the stop, resume; returns the resumed output."""
    log = tmp_path / "stopped.log"
    with open(log, "w") as f:
        proc = start(cmd, f, start_new_session=True)  # its own group: the test's pytest is not signalled
        wait_for(proc, lambda: logged_steps(out) >= after_step, f"step {after_step} in metrics.jsonl")
        os.killpg(proc.pid, signum) if group else proc.send_signal(signum)
        rc = proc.wait(timeout=400)
    said = log.read_text()
    code = {signal.SIGTERM: 143, signal.SIGINT: 130}[signum]
    assert rc == code, said[-3000:]
    stopped = [line for line in said.splitlines() if line.startswith("stopped by")]
    assert len(stopped) == 1, said[-3000:]
    step = logged_steps(out)
    ck = out / "checkpoints" / f"step-{step:06d}"
    assert after_step <= step < STEPS
    assert stopped[0] == (f"stopped by {signal.Signals(signum).name} at step {step} of {STEPS}: checkpoint {ck}; "
                          "run the same command to resume")
    assert checkpoint.problem(ck) is None and (ck / checkpoint.MANIFEST).is_file()
    assert [p.name for p in checkpoint.checkpoints(out)] == [ck.name]  # save_every = 1000: only the stop's
    rc, said = run(resume_cmd or cmd, tmp_path, "resumed")
    assert rc == 0, said[-3000:]
    assert f"resuming from {ck} at step {step}" in said
    return said


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Each task's uninterrupted run (made once per task, on first use)."""
    made = {}

    def get(task):
        if task not in made:
            out = tmp_path_factory.mktemp(f"ref-{task}") / "run"
            rc, said = run(argv(task, out), out.parent, "ref")
            assert rc == 0, said[-3000:]
            made[task] = losses(out)
        return made[task]

    return get


@pytest.mark.parametrize("task,signum", [("sft", signal.SIGTERM), ("sft", signal.SIGINT), ("dpo", signal.SIGTERM),
                                         ("dpo", signal.SIGINT), ("grpo", signal.SIGTERM), ("grpo", signal.SIGINT)],
                         ids=["sft-term", "sft-int", "dpo-term", "dpo-int", "grpo-term", "grpo-int"])
def test_a_stop_signal_checkpoints_and_the_run_resumes_exactly(tmp_path, reference, task, signum):
    out = tmp_path / "run"
    # SIGINT to the whole process group, as Ctrl-C in a terminal sends it; SIGTERM to the process
    stop_and_resume(tmp_path, argv(task, out), out, signum, after_step=2, group=signum == signal.SIGINT)
    assert losses(out) == reference(task)


def test_a_second_ctrl_c_quits_at_once_leaving_the_last_checkpoint_intact(tmp_path):
    out = tmp_path / "run"
    log = tmp_path / "run.log"
    with open(log, "w") as f:
        proc = start(argv("sft", out, "run.save_every=1", "train.max_steps=50"), f, start_new_session=True)
        wait_for(proc, lambda: logged_steps(out) >= 2, "step 2 in metrics.jsonl")
        os.killpg(proc.pid, signal.SIGINT)
        wait_for(proc, lambda: "stopping after this step" in log.read_text(), "the first Ctrl-C's acknowledgement")
        os.killpg(proc.pid, signal.SIGINT)
        rc = proc.wait(timeout=60)
    said = log.read_text()
    assert rc == 130, said[-3000:]
    assert "second Ctrl-C: quitting now" in said and "stopped by" not in said and "Traceback" not in said
    kept = checkpoint.checkpoints(out)
    assert kept and checkpoint.find(out, "auto") == kept[-1]  # the newest checks out: none half-written
    assert all(checkpoint.problem(ck) is None for ck in kept)


# ---- damaged checkpoints --------------------------------------------------------------------------

def sft_config(out, *extra):
    return load_config(EXAMPLES / "sft.toml", [f"run.output_dir={json.dumps(str(out))}", *FAST,
                                               "train.micro_batch_size=256", "data.max_seq_len=256", *extra])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run of 4 steps with checkpoints at 2 and 4, kept pristine; each test damages a copy."""
    out = tmp_path_factory.mktemp("trained") / "run"
    train_sft(sft_config(out, "train.max_steps=4", "run.save_every=2"), log=lambda *_: None)
    return out


def damage(path, how):
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "emptied":
        path.write_bytes(b"")
    else:  # one bit flipped in the middle: same size, different bytes
        i = len(data) // 2
        path.write_bytes(data[:i] + bytes([data[i] ^ 0x10]) + data[i + 1 :])


@pytest.mark.parametrize("how", ["truncated", "emptied", "bit-flipped"])
@pytest.mark.parametrize("name", ["adapter_model.safetensors", "trainer_state.pt", "manifest.json"])
def test_a_damaged_latest_checkpoint_is_skipped_everywhere(tmp_path, trained, name, how):
    import shutil

    from fasttune.cli import main
    from fasttune.checkpoint import run_of
    from fasttune.evaluation import eval_target

    out = tmp_path / "run"
    shutil.copytree(trained, out)
    bad, good = out / "checkpoints" / "step-000004", out / "checkpoints" / "step-000002"
    damage(bad / name, how)

    # resume = "auto": one warning naming the file, then the previous checkpoint
    said = []
    train_sft(sft_config(out, "train.max_steps=5", "run.save_every=2"), log=said.append)
    warnings = [m for m in said if m.startswith("warning:")]
    assert len(warnings) == 1 and "skipping checkpoint step-000004" in warnings[0] and str(bad / name) in warnings[0]
    assert f"resuming from {good} at step 2" in said
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")] == [1, 2, 3, 4, 5]

    # merge, generate/chat (infer) and eval pick the same way; naming the damaged one is one clear error
    damage(out / "checkpoints" / "step-000005" / name, how)  # the resumed run's own last one, damaged alike
    assert run_of(str(out))[1] == out / "checkpoints" / "step-000004"
    assert eval_target(sft_config(out), None, log=lambda *_: None)[0] == out / "checkpoints" / "step-000004"
    with pytest.raises(CheckpointError, match=rf"fails its check, nothing was loaded from it: {bad.parent / 'step-000005' / name}"):
        run_of(str(out / "checkpoints" / "step-000005"))
    assert main(["merge", str(out / "checkpoints" / "step-000005"), "--out", str(tmp_path / "merged")]) == 2
    assert not (tmp_path / "merged").exists()


def test_resume_naming_a_damaged_checkpoint_is_one_clear_error(tmp_path, trained, capsys):
    import shutil

    from fasttune.cli import main

    out = tmp_path / "run"
    shutil.copytree(trained, out)
    ck = out / "checkpoints" / "step-000004"
    size = (ck / "trainer_state.pt").stat().st_size
    damage(ck / "trainer_state.pt", "truncated")
    before = (out / "metrics.jsonl").read_text()
    code = main(["sft", str(EXAMPLES / "sft.toml"), *[x for s in [f"run.output_dir={json.dumps(str(out))}", *FAST,
                 "train.micro_batch_size=256", "data.max_seq_len=256", "train.max_steps=6",
                 f"run.resume={json.dumps(str(ck))}"] for x in ("--set", s)]])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    state = ck / "trainer_state.pt"
    assert err.strip().splitlines()[-1] == (f"error: run.resume = {str(ck)!r} fails its check, nothing was loaded from it: {state}: "
                           f"{state.stat().st_size} bytes, the manifest says {size} (truncated or damaged)")
    assert (out / "metrics.jsonl").read_text() == before  # nothing was run


def test_no_valid_checkpoint_is_one_clear_error_and_old_checkpoints_still_load(tmp_path, trained):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(trained, out)
    for ck in checkpoint.checkpoints(out):
        damage(ck / "adapter_model.safetensors", "bit-flipped")
    warned = []
    with pytest.raises(CheckpointError, match=r"no checkpoint in .*checkpoints passes its check"):
        checkpoint.find(out, "auto", warn=warned.append)
    assert len(warned) == 2

    # checkpoints of an earlier fasttune (no manifest): loaded, with a warning that they are not checked
    shutil.rmtree(out)
    shutil.copytree(trained, out)
    for ck in checkpoint.checkpoints(out):
        (ck / checkpoint.MANIFEST).unlink()
    said = []
    train_sft(sft_config(out, "train.max_steps=5", "run.save_every=2"), log=said.append)
    assert f"resuming from {out / 'checkpoints' / 'step-000004'} at step 4" in said
    assert any("has no manifest.json (written by an earlier fasttune): loaded without a check" in m for m in said)


# ---- a full disk -----------------------------------------------------------------------------------

def _file_size_limit(limit):
    def apply():  # in the child: writes past `limit` bytes fail with EFBIG instead of killing it (SIGXFSZ)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_a_write_that_fails_part_way_keeps_every_earlier_checkpoint(tmp_path, trained):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(trained, out)
    manifests = {ck.name: (ck / checkpoint.MANIFEST).read_text() for ck in checkpoint.checkpoints(out)}
    state = out / "checkpoints" / "step-000004" / "trainer_state.pt"
    limit = state.stat().st_size // 2  # the adapter may fit; the trainer state cannot
    rc, said = run(argv("sft", out, "train.max_steps=6", "run.save_every=1", "run.keep=1"), tmp_path, "full",
                   preexec_fn=_file_size_limit(limit))
    assert rc == 2, said[-3000:]
    errors = [line for line in said.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "Traceback" not in said, said[-3000:]
    assert errors[0].startswith(f"error: cannot write checkpoint step-000005 in {out / 'checkpoints'}: File too large. "
                                "It needs about ")
    assert "The earlier checkpoints are intact (last: step-000004)" in errors[0]
    need = int(errors[0].split("needs about ")[1].split(" bytes")[0].replace(",", ""))
    assert need >= state.stat().st_size * 0.9  # the estimate is of the right size
    # keep = 1 deleted nothing: the new checkpoint never became complete; no half-written folder is left
    assert {ck.name: (ck / checkpoint.MANIFEST).read_text() for ck in checkpoint.checkpoints(out)} == manifests
    assert all(checkpoint.problem(ck) is None for ck in checkpoint.checkpoints(out))
    assert not list((out / "checkpoints").glob(".tmp-*"))
    assert checkpoint.find(out, "auto") == out / "checkpoints" / "step-000004"


def test_time_based_saves(tmp_path):
    out = tmp_path / "run"
    # save_every = 1000 steps, but every 0.0001 minutes (6 ms): each step is slower than that
    train_sft(sft_config(out, "train.max_steps=3", "run.save_every_minutes=0.0001"), log=lambda *_: None)
    assert [p.name for p in checkpoint.checkpoints(out)] == ["step-000001", "step-000002", "step-000003"]
    train_sft(sft_config(out, "train.max_steps=6", "run.save_every_minutes=10"), log=lambda *_: None)
    assert [p.name for p in checkpoint.checkpoints(out)][-1] == "step-000006"
    assert "step-000004" not in [p.name for p in checkpoint.checkpoints(out)]


# ---- two gloo ranks under torchrun -----------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-process (gloo) ranks, as in tests/test_distributed.py")
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["term-to-launcher", "ctrl-c-to-group"])
def test_torchrun_ranks_stop_at_the_same_step_and_resume_exactly(tmp_path, signum):
    """`fasttune sft --nproc 2`: SIGTERM to the launcher (passed on to torchrun, which passes it to the
    ranks), or Ctrl-C to the whole process group (each rank gets it twice: from the terminal and from
    torchrun). Both ranks stop after the same step, rank 0 writes it, and 2 ranks resume it exactly as
    1 process with 2 micro-batches per step would have run."""
    one = tmp_path / "one"
    train_sft(sft_config(one, f"train.max_steps={STEPS}", "train.grad_accum=2"), log=lambda *_: None)
    out = tmp_path / "two"
    cmd = argv("sft", out) + ["--nproc", "2"]
    said = stop_and_resume(tmp_path, cmd, out, signum, after_step=2, group=signum == signal.SIGINT)
    assert "2 processes (ddp)" in said
    ref = [json.loads(line) for line in open(one / "metrics.jsonl")]
    got = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in got] == [r["step"] for r in ref]
    for a, b in zip(got, ref):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-6) and a["trained_tokens"] == b["trained_tokens"]
