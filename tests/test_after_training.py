"""After training: `fasttune generate`, `chat` and `eval` on a short SFT run of the demo, DPO and GRPO
evaluation, TensorBoard and wandb (offline) logging, and the errors of each command."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fasttune.cli import main
from fasttune.config import load_config
from fasttune.sft import train_sft

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
DATA = EXAMPLES / "data"


def quiet(*_):
    pass


def form_ok(instruction, inp, completion):
    """Whether a completion has the form the demo's task asks for (a tiny model learns the form first)."""
    c = completion.strip()
    if instruction.startswith("Repeat"):
        return len(c.split()) == 3
    if instruction.startswith("Write the phrase"):
        return len(c.split()) == 2 and c.replace(" ", "").isalpha() and c.isupper()
    if instruction.startswith("Add"):
        return c.isdigit()
    return len(c.split()) == 1 and c.isalpha() and c.islower()  # reverse the letters


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    """The demo's QLoRA SFT, shortened, with TensorBoard on."""
    out = tmp_path_factory.mktemp("sft") / "run"
    cfg_path = out.parent / "sft.toml"
    text = (EXAMPLES / "sft.toml").read_text()
    text = text.replace('output_dir = "runs/sft-demo"', f"output_dir = {json.dumps(str(out))}\nreport_to = [\"tensorboard\"]")
    text = text.replace("examples/data/", f"{DATA}/").replace("max_steps = 300", "max_steps = 150")
    cfg_path.write_text(text)
    summary = train_sft(load_config(cfg_path), log=quiet)
    assert summary["steps"] == 150
    return cfg_path, out


def held_out():
    recs = [json.loads(line) for line in open(DATA / "sft_alpaca_eval.jsonl")]
    return [r for r in recs]


def test_generate_shows_what_training_taught(sft_run, tmp_path):
    """Greedy completions of the held-out prompts: the adapter answers in the task's form (three words,
    capitals, a number, one reversed word) far more often than the base model."""
    _, run = sft_run
    recs = held_out()
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"{r['instruction']}\n\n{r['input']}"}) + "\n" for r in recs))
    share = {}
    for name, extra in (("adapter", []), ("base", ["--base"])):
        out = tmp_path / f"{name}.jsonl"
        assert main(["generate", str(run), "--prompts", str(prompts), "--out", str(out), "--temperature", "0",
                     "--max-new-tokens", "24", *extra]) == 0
        rows = [json.loads(line) for line in open(out)]
        assert [r["prompt"] for r in rows] == [f"{r['instruction']}\n\n{r['input']}" for r in recs]
        share[name] = sum(form_ok(r["instruction"], r["input"], row["completion"]) for r, row in zip(recs, rows)) / len(recs)
    assert share["adapter"] >= 0.6 and share["base"] <= 0.1, share


def test_generate_samples_and_reads_a_merged_folder(sft_run, tmp_path):
    _, run = sft_run
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps([{"messages": [{"role": "user", "content": "Add the two numbers.\n\n3 + 4"}]}]))
    merged = tmp_path / "merged"
    assert main(["merge", str(run), "--out", str(merged), "--dtype", "fp32"]) == 0
    out = tmp_path / "merged.jsonl"
    assert main(["generate", str(merged), "--prompts", str(prompts), "--out", str(out), "--num-samples", "3",
                 "--temperature", "1.0", "--max-new-tokens", "8"]) == 0
    rows = [json.loads(line) for line in open(out)]
    assert [r["sample"] for r in rows] == [0, 1, 2] and all(r["temperature"] == 1.0 for r in rows)


def test_eval_before_and_after(sft_run, capsys):
    cfg_path, run = sft_run
    out = {}
    for name, extra in (("base", ["--adapter", "base"]), ("run", [])):  # default: the run's last checkpoint
        capsys.readouterr()
        assert main(["eval", str(cfg_path), *extra]) == 0
        printed = capsys.readouterr().out.strip().splitlines()
        out[name] = json.loads(printed[-1])
        assert "eval_token_accuracy" in "\n".join(printed[:-1])  # the readable table above the JSON line
    assert out["run"]["eval_loss"] < 0.6 * out["base"]["eval_loss"], out
    assert out["run"]["eval_token_accuracy"] > out["base"]["eval_token_accuracy"] + 0.2, out
    assert out["run"]["eval_perplexity"] == pytest.approx(2.718281828 ** out["run"]["eval_loss"], rel=1e-6)
    last = [json.loads(line) for line in open(run / "metrics.jsonl")][-1]
    assert out["run"]["eval_loss"] == pytest.approx(last["eval_loss"], rel=1e-4)  # what training logged


def test_chat_answers_piped_input(sft_run, tmp_path):
    """Piped: one user turn per line, replies printed; the first reply equals generate's greedy completion."""
    _, run = sft_run
    question = "Write the phrase in capital letters. tiger lemon"
    p = subprocess.run([sys.executable, "-m", "fasttune", "chat", str(run), "--temperature", "0", "--max-new-tokens", "16"],
                       input=f"{question}\n/reset\n/system Answer with the result only.\n{question}\n/exit\nnever read\n",
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    replies = p.stdout.strip().split("\n")
    prompts = tmp_path / "q.jsonl"
    prompts.write_text(json.dumps({"prompt": question}) + "\n")
    assert main(["generate", str(run), "--prompts", str(prompts), "--out", str(tmp_path / "g.jsonl"),
                 "--temperature", "0", "--max-new-tokens", "16"]) == 0
    assert replies[0] == json.loads(open(tmp_path / "g.jsonl").read())["completion"].strip()
    assert len(replies) == 2  # the second turn, after /reset and /system; nothing after /exit


def test_tensorboard_event_files(sft_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, run = sft_run
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    losses = [json.loads(line)["loss"] for line in open(run / "metrics.jsonl")]
    assert [round(e.value, 6) for e in acc.Scalars("loss")] == pytest.approx(losses, rel=1e-6)
    assert {"lr", "grad_norm", "tokens_per_s", "eval_loss"} <= set(acc.Tags()["scalars"])


def test_wandb_offline(tmp_path):
    cfg = load_config(EXAMPLES / "sft.toml", [f"run.output_dir={json.dumps(str(tmp_path / 'run'))}", "train.max_steps=2",
                                              f"data.train={json.dumps(str(DATA / 'sft_alpaca.jsonl'))}", 'data.eval=""',
                                              'run.report_to=["wandb"]'])
    os.environ["WANDB_MODE"] = "offline"
    try:
        train_sft(cfg, log=quiet)
    finally:
        del os.environ["WANDB_MODE"]
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb")), runs


def test_dpo_eval_and_curves(tmp_path, capsys):
    """DPO eval on the example's held-out pairs: the base is its own reference (margin 0); 20 steps of
    DPO make the margin positive. loss.png gains the reward accuracy and margin panels."""
    sets = [f"run.output_dir={json.dumps(str(tmp_path / 'run'))}", "train.max_steps=20", "run.eval_every=0",
            f"data.train={json.dumps(str(DATA / 'dpo_pairs.jsonl'))}", f"data.eval={json.dumps(str(DATA / 'dpo_pairs_eval.jsonl'))}"]
    out = {}
    for name, extra in (("base", ["--adapter", "base"]), ("run", None)):
        if extra is None:
            assert main(["dpo", str(EXAMPLES / "dpo.toml"), *[x for s in sets for x in ("--set", s)]]) == 0
            extra = []
        capsys.readouterr()
        assert main(["eval", str(EXAMPLES / "dpo.toml"), *extra, *[x for s in sets for x in ("--set", s)]]) == 0
        out[name] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["base"]["eval_reward_margin"] == 0 and out["base"]["eval_pairs"] == 20
    assert out["run"]["eval_reward_margin"] > 0 and out["run"]["eval_reward_accuracy"] > 0.5, out
    from PIL import Image

    assert Image.open(tmp_path / "run" / "loss.png").size[0] > 1000  # three panels


def test_grpo_eval_during_training_and_after(tmp_path, capsys):
    prompts = tmp_path / "eval.jsonl"
    prompts.write_text("".join((DATA / "grpo_arithmetic.jsonl").read_text().splitlines(keepends=True)[:4]))
    sets = [f"run.output_dir={json.dumps(str(tmp_path / 'run'))}", "train.max_steps=2", "run.eval_every=1",
            f"data.train={json.dumps(str(DATA / 'grpo_arithmetic.jsonl'))}", f"data.eval={json.dumps(str(prompts))}"]
    args = [x for s in sets for x in ("--set", s)]
    assert main(["grpo", str(EXAMPLES / "grpo.toml"), *args]) == 0
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert all({"eval_reward", "eval_reward/math_answer", "eval_completion_len"} <= set(r) for r in rows)
    capsys.readouterr()
    assert main(["eval", str(EXAMPLES / "grpo.toml"), *args]) == 0
    m = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert m["eval_prompts"] == 4 and m["eval_samples"] == 16
    assert {"eval_reward/format", "eval_reward/digit_ratio"} <= set(m)


def _tiny_model_folder(path):
    """A model of another shape than the built-in one, with its tokenizer."""
    import transformers

    from fasttune import builtin

    tok = transformers.AutoTokenizer.from_pretrained(builtin.resolve("builtin:tiny-llama"))
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2, pad_token_id=tok.pad_token_id)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.mark.parametrize("case", ["no_adapter", "other_base", "bad_prompts", "empty_prompt", "no_checkpoint",
                                  "bad_flag"])
def test_errors_are_one_line(sft_run, tmp_path, capsys, case):
    cfg_path, run = sft_run
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "hello"}) + "\n")
    if case == "no_adapter":
        (tmp_path / "empty").mkdir()
        argv, expect = ["generate", str(tmp_path / "empty"), "--prompts", str(prompts)], "not a fasttune run, checkpoint or model folder"
    elif case == "other_base":
        other = _tiny_model_folder(tmp_path / "other")
        argv = ["eval", str(cfg_path), "--adapter", str(run), "--set", f"model.path={json.dumps(str(other))}"]
        expect = "its adapter was trained on"
    elif case == "bad_prompts":
        prompts.write_text(json.dumps({"text": "hello"}) + "\n")
        argv, expect = ["generate", str(run), "--prompts", str(prompts)], 'p.jsonl:1: a prompt record needs "prompt"'
    elif case == "empty_prompt":
        prompts.write_text(json.dumps({"prompt": "hello"}) + "\n" + json.dumps({"prompt": "  "}) + "\n")
        argv, expect = ["generate", str(run), "--prompts", str(prompts)], "p.jsonl:2: the prompt is empty"
    elif case == "bad_flag":
        argv, expect = ["chat", str(run), "--max-new-tokens", "-1"], "--max-new-tokens -1: must be at least 1"
    else:
        argv = ["eval", str(cfg_path), "--set", f"run.output_dir={json.dumps(str(tmp_path / 'nothing'))}"]
        expect = "no checkpoint in run.output_dir"
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len([line for line in err if line.startswith("error:")]) == 1 and expect in err[-1], err


def test_chat_ends_with_the_error_when_generation_fails(sft_run, monkeypatch):
    """A failure inside the generating thread ends the chat with that error (it used to hang, waiting
    for tokens that never came)."""
    import io

    from fasttune.infer import chat, load

    loaded = load(sft_run[1], torch.device("cpu"))

    def broken(**_):
        raise RuntimeError("generation broke")

    monkeypatch.setattr(loaded.model, "generate", broken)
    with pytest.raises(RuntimeError, match="generation broke"):
        chat(loaded.model, loaded.tok, inp=io.StringIO("hello\n"), out=io.StringIO(), weights="live")  # the patched model


def test_a_resumed_run_continues_its_tensorboard_and_wandb_logs(tmp_path):
    """Killed after logging step 4 but before checkpointing it: the resume from step 2 logs steps 3
    and 4 again. TensorBoard drops the first run's events past step 2, so each step is there once, as
    in metrics.jsonl; wandb continues the same run id."""
    import shutil

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    sets = [f"run.output_dir={json.dumps(str(tmp_path / 'run'))}", "train.max_steps=4", "run.save_every=2",
            "run.log_every=1", f"data.train={json.dumps(str(DATA / 'sft_alpaca.jsonl'))}", 'data.eval=""',
            'run.report_to=["tensorboard", "wandb"]']
    os.environ["WANDB_MODE"] = "offline"
    try:
        train_sft(load_config(EXAMPLES / "sft.toml", sets), log=quiet)
        first_id = (tmp_path / "run" / "wandb_id").read_text()
        shutil.rmtree(tmp_path / "run" / "checkpoints" / "step-000004")
        train_sft(load_config(EXAMPLES / "sft.toml", sets), log=quiet)
    finally:
        del os.environ["WANDB_MODE"]
    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss")] == [1, 2, 3, 4]
    assert (tmp_path / "run" / "wandb_id").read_text() == first_id
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))  # ...-ID, or ...-ID-1 within the same second
    assert len(runs) == 2 and all(f"-{first_id}" in p.name for p in runs), runs


def test_chat_drops_the_oldest_turns_when_the_context_is_full(sft_run):
    import io

    from fasttune.infer import chat, load

    loaded = load(sft_run[1], torch.device("cpu"))
    loaded.model.config.max_position_embeddings = 160  # the byte tokenizer: a token per character
    lengths, generate = [], loaded.model.generate

    def measured(**kw):
        lengths.append(kw["input_ids"].shape[1])
        return generate(**kw)

    loaded.model.generate = measured
    lines = "".join(f"turn {i}: repeat the word apple\n" for i in range(8))
    chat(loaded.model, loaded.tok, inp=io.StringIO(lines), out=io.StringIO(), max_new_tokens=16, temperature=0,
         weights="live")  # the measured model itself, not a merged copy of it
    assert len(lengths) == 8 and all(n + 16 <= 160 for n in lengths), lengths
    assert lengths[-1] < sum(lengths[:3])  # history was dropped, not kept growing
