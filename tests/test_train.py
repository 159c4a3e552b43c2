"""The SFT trainer end to end on the built-in tiny model (CPU): training, batching, resume, errors, merge."""

import json
import math
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fasttune.batches import packed_batch, padded_batch
from fasttune.cli import main
from fasttune.config import load_config
from fasttune.data import load_sft
from fasttune.models import load_model, load_tokenizer
from fasttune.sft import train_sft
from fasttune.train import TrainingError

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data"


def config(tmp_path, **sections):
    """examples/sft.toml with overrides, writing into tmp_path."""
    sets = [f"run.output_dir={json.dumps(str(tmp_path / 'run'))}", f"data.train={json.dumps(str(DATA / 'sft_alpaca.jsonl'))}",
            'data.eval=""']
    for section, kv in sections.items():
        sets += [f"{section}.{k}={json.dumps(v) if isinstance(v, (str, list)) else str(v).lower() if isinstance(v, bool) else v}"
                 for k, v in kv.items()]
    return load_config(ROOT / "examples" / "sft.toml", sets)


def losses(run_dir):
    return [json.loads(line)["loss"] for line in open(Path(run_dir) / "metrics.jsonl")]


def test_qlora_sft_learns(tmp_path):
    cfg = config(tmp_path, train={"max_steps": 40, "warmup_steps": 2}, run={"save_every": 20})
    summary = train_sft(cfg, log=lambda *_: None)
    seen = losses(cfg.run.output_dir)
    assert sum(seen[-10:]) / 10 < 0.7 * sum(seen[:5]) / 5, seen
    run = Path(cfg.run.output_dir)
    assert (run / "loss.png").stat().st_size > 0 and (run / "config.toml").is_file()
    last = run / "checkpoints" / "step-000040"
    assert (last / "adapter_model.safetensors").is_file() and (last / "adapter_config.json").is_file()
    assert summary["steps"] == 40


def test_qlora_uses_real_4bit_layers(tmp_path):
    import bitsandbytes as bnb

    model = load_model(config(tmp_path))
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    assert model.get_base_model().config._attn_implementation == "fasttune"
    # eval-mode passes under no_grad keep the layout training uses (no AVX512-BF16 repacking on the CPU)
    model.eval()
    w = {n: p.data.clone() for n, p in model.named_parameters() if p.dtype == torch.uint8}
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]))
    assert w and all(torch.equal(p.data, w[n]) for n, p in model.named_parameters() if n in w)


@pytest.mark.parametrize("train", ["sft_alpaca.jsonl", "sft_sharegpt.json", "sft_messages.jsonl"])
def test_each_format_trains(tmp_path, train):
    cfg = config(tmp_path, data={"train": str(DATA / train)}, train={"max_steps": 3}, model={"load_in_4bit": False})
    assert train_sft(cfg, log=lambda *_: None)["steps"] == 3


def test_packing_gives_the_same_loss_and_gradients(tmp_path):
    cfg = config(tmp_path, model={"load_in_4bit": False})
    tok = load_tokenizer(cfg.model)
    examples = load_sft(DATA / "sft_messages.jsonl", tok, cfg.data)[0][:5]
    model = load_model(cfg)
    out = {}
    for name, batch in (("packed", packed_batch(examples)), ("padded", padded_batch(examples, tok.pad_token_id))):
        model.zero_grad()
        loss = model(**batch.model_kwargs(torch.device("cpu")), num_items_in_batch=batch.trained).loss
        loss.backward()
        out[name] = (loss.detach(), [p.grad.clone() for p in model.parameters() if p.requires_grad])
    assert torch.allclose(out["packed"][0], out["padded"][0], rtol=1e-5)
    for a, b in zip(out["packed"][1], out["padded"][1]):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    """Micro-batch 1 × 8 accumulation steps = one micro-batch of 8 sequences: the same loss and the same
    accumulated gradient (its norm, before clipping). Weights after an Adam step are not compared: the
    first step moves each weight by about ±lr·sign(g), which rounding can flip where g is near 0."""
    data = tmp_path / "eight.jsonl"
    data.write_text("".join((DATA / "sft_alpaca.jsonl").read_text().splitlines(keepends=True)[:8]))
    rows = {}
    for name, (mbs, acc) in {"one_by_eight": (1, 8), "eight": (8, 1)}.items():
        cfg = config(tmp_path / name, data={"train": str(data), "packing": False}, model={"load_in_4bit": False},
                     train={"micro_batch_size": mbs, "grad_accum": acc, "max_steps": 2, "warmup_steps": 0})
        train_sft(cfg, log=lambda *_: None)
        rows[name] = [json.loads(line) for line in open(Path(cfg.run.output_dir) / "metrics.jsonl")]
    for a, b in zip(rows["one_by_eight"], rows["eight"]):
        assert a["trained_tokens"] == b["trained_tokens"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)


def _sft_process(cfg_path, out_dir, steps):
    cmd = [sys.executable, "-m", "fasttune.cli", "sft", str(cfg_path), "--set", f"run.output_dir={json.dumps(str(out_dir))}",
           "--set", f"train.max_steps={steps}", "--set", "run.save_every=3", "--set", "run.keep=10",
           "--set", f"data.train={json.dumps(str(DATA / 'sft_alpaca.jsonl'))}", "--set", 'data.eval=""']
    return subprocess.Popen(cmd, cwd=out_dir.parent, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_kill_and_resume_gives_the_same_losses(tmp_path):
    cfg_path = ROOT / "examples" / "sft.toml"
    steps = 12
    reference = tmp_path / "reference"
    assert _sft_process(cfg_path, reference, steps).wait(timeout=300) == 0

    run = tmp_path / "killed"
    proc = _sft_process(cfg_path, run, steps)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline:  # kill it once step 7 is logged: mid-run, after the step-6 checkpoint
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 7:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(p.name for p in (run / "checkpoints").glob("step-*"))
    assert done and done[-1] < "step-000012", done
    assert _sft_process(cfg_path, run, steps).wait(timeout=300) == 0
    assert losses(run) == losses(reference)


def test_resume_refuses_a_changed_run(tmp_path):
    train_sft(config(tmp_path, train={"max_steps": 2}, run={"save_every": 1}), log=lambda *_: None)
    cfg = config(tmp_path, train={"max_steps": 4}, data={"train_on": "all"})
    with pytest.raises(Exception, match=r"config changed what the run trains \(data.train_on: 'assistant' -> 'all'\)"):
        train_sft(cfg, log=lambda *_: None)


def test_nan_loss_stops_and_keeps_the_last_checkpoint(tmp_path):
    cfg = config(tmp_path, model={"load_in_4bit": False}, train={"max_steps": 20, "learning_rate": 1e30,
                 "max_grad_norm": 0.0, "warmup_steps": 0, "lr_scheduler": "constant"}, run={"save_every": 1})
    with pytest.raises(TrainingError, match=r"the loss is (nan|inf) at step \d+; stopped before the optimizer step\. "
                                            r"Last good checkpoint: .*step-0000\d\d"):
        train_sft(cfg, log=lambda *_: None)


@pytest.mark.parametrize("case,expect", [
    ("malformed", r"bad\.jsonl:2: not valid JSON"),
    ("unknown_key", r"c\.toml:\d+: \[train\] lerning_rate is not a known key; did you mean 'learning_rate'"),
    ("missing_file", r"nope\.jsonl: no such data file"),
    ("empty", r"empty\.jsonl: the file is empty"),
    ("all_masked", r"no example has a trained token"),
    ("overlong", r"sft_alpaca\.jsonl:1: \d+ tokens, more than data.max_seq_len = 40"),
])
def test_bad_input_is_one_clear_error(tmp_path, capsys, case, expect):
    (tmp_path / "bad.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{"messages": [\n')
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "masked.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    files = {"malformed": "bad.jsonl", "missing_file": "nope.jsonl", "empty": "empty.jsonl", "all_masked": "masked.jsonl"}
    train = tmp_path / files[case] if case in files else DATA / "sft_alpaca.jsonl"
    body = (ROOT / "examples" / "sft.toml").read_text()
    body = body.replace('train = "examples/data/sft_alpaca.jsonl"', f'train = "{train}"')
    if case == "unknown_key":
        body = body.replace("learning_rate =", "lerning_rate =")
    if case == "overlong":
        body = body.replace("max_seq_len = 256", 'max_seq_len = 40\noverlong = "error"')
    toml = tmp_path / "c.toml"
    toml.write_text(body)
    for command in ("check", "sft"):
        code = main([command, str(toml), "--set", f"run.output_dir={json.dumps(str(tmp_path / 'run'))}"])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("error: ") and "Traceback" not in err, err
        assert re.search(expect, err), err


def test_check_reports_data_and_packing(capsys):
    assert main(["check", str(ROOT / "examples" / "sft.toml")]) == 0
    out = capsys.readouterr().out
    assert "300 examples (alpaca)" in out and "% filled" in out and "«" in out and "ok:" in out


def test_merge_gives_the_adapter_models_logits(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from fasttune import builtin

    cfg = config(tmp_path, model={"load_in_4bit": False}, train={"max_steps": 5}, run={"save_every": 5})
    train_sft(cfg, log=lambda *_: None)
    out = tmp_path / "merged"
    assert main(["merge", cfg.run.output_dir, "--out", str(out), "--dtype", "fp32"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(builtin.resolve(cfg.model.path))
    adapter = PeftModel.from_pretrained(base, Path(cfg.run.output_dir) / "checkpoints" / "step-000005")
    ids = torch.randint(0, 200, (2, 17))
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, adapter(ids).logits, atol=1e-5)
    assert (out / "tokenizer.json").is_file()


@pytest.mark.parametrize("option", [{"train": {"optimizer": "adamw_8bit"}}, {"train": {"optimizer": "paged_adamw_8bit"}},
                                    {"model": {"finetune": "full"}}, {"train": {"gradient_checkpointing": True}},
                                    {"data": {"packing": False}, "train": {"micro_batch_size": 4}},
                                    {"train": {"lr_scheduler": "linear"}}, {"lora": {"rslora": True, "dropout": 0.1}}],
                         ids=["adamw_8bit", "paged_adamw_8bit", "full", "grad_ckpt", "padded", "linear", "rslora"])
def test_training_options(tmp_path, option):
    cfg = config(tmp_path, **{k: dict(v, **({"max_steps": 3} if k == "train" else {})) for k, v in option.items()},
                 **({} if "train" in option else {"train": {"max_steps": 3}}))
    summary = train_sft(cfg, log=lambda *_: None)
    assert summary["steps"] == 3 and math.isfinite(summary["last_loss"])
    again = train_sft(config(tmp_path, **{k: dict(v, **({"max_steps": 4} if k == "train" else {})) for k, v in option.items()},
                             **({} if "train" in option else {"train": {"max_steps": 4}})), log=lambda *_: None)
    assert again["steps"] == 4  # resumed from step 3's checkpoint
