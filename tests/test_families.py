"""`fasttune sft`, `dpo` and `grpo` end to end on local model folders of the families users train: a
tiny random model of the architecture saved with the family's real tokenizer and chat template
(tests/real_tokenizers.py), QLoRA, a couple of steps each. Gemma 3's folder used to crash
(`apply()` refused the model type and the loss came back None)."""

import json
from pathlib import Path

import pytest
import torch
import transformers

import real_tokenizers
from fasttune.cli import main

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data"
SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=1024, tie_word_embeddings=False)
ARCHITECTURES = {
    "qwen3": lambda V: transformers.Qwen3Config(vocab_size=V, head_dim=8, **SMALL),
    "llama3": lambda V: transformers.LlamaConfig(vocab_size=V, **SMALL),
    "gemma3": lambda V: transformers.Gemma3TextConfig(vocab_size=V, head_dim=8, query_pre_attn_scalar=8,
                                                      sliding_window=16, **SMALL),
    "mistral": lambda V: transformers.MistralConfig(vocab_size=V, sliding_window=64, **SMALL),
    "qwen2.5": lambda V: transformers.Qwen2Config(vocab_size=V, **SMALL),
    "gemma2": lambda V: transformers.Gemma2Config(vocab_size=V, head_dim=8, query_pre_attn_scalar=8, sliding_window=16,
                                                  attn_logit_softcapping=50.0, final_logit_softcapping=30.0, **SMALL),
    "phi3": lambda V: transformers.Phi3Config(vocab_size=V, **SMALL),
    "phi4": lambda V: transformers.Phi3Config(vocab_size=V, **SMALL),  # Phi-4 is a Phi3ForCausalLM
    "deepseek_v3": lambda V: transformers.DeepseekV3Config(
        vocab_size=V, **{**SMALL, "num_key_value_heads": 4}, moe_intermediate_size=16, n_routed_experts=4,
        num_experts_per_tok=2, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8,
        v_head_dim=8, first_k_dense_replace=1, n_group=1, topk_group=1),
}


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def folder(request, tmp_path_factory):
    name = request.param
    tok = real_tokenizers.load(name)
    cfg = ARCHITECTURES[name](len(tok))
    cfg.bos_token_id, cfg.eos_token_id = tok.bos_token_id, tok.eos_token_id
    cfg.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    out = tmp_path_factory.mktemp(name) / "model"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return name, out


def _run(command, folder, tmp_path, data, extra=()):
    name, path = folder
    sets = [f"model.path={json.dumps(str(path))}", f"run.output_dir={json.dumps(str(tmp_path / command))}",
            f"data.train={json.dumps(str(DATA / data))}", "train.max_steps=2", "train.warmup_steps=1",
            "run.save_every=2", *extra]
    code = main([command, str(ROOT / "examples" / f"{command}.toml"), *[a for s in sets for a in ("--set", s)]])
    assert code == 0, f"{command} on {name} exited {code}"
    rows = [json.loads(line) for line in open(tmp_path / command / "metrics.jsonl")]
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert (tmp_path / command / "checkpoints" / "step-000002" / "adapter_model.safetensors").is_file()


def test_sft(folder, tmp_path):
    _run("sft", folder, tmp_path, "sft_alpaca.jsonl",
         ['data.eval=""', "data.max_seq_len=512", "train.micro_batch_size=512"])


def test_dpo(folder, tmp_path):
    _run("dpo", folder, tmp_path, "dpo_pairs.jsonl", ['data.eval=""', "train.micro_batch_size=2"])


def test_grpo(folder, tmp_path):
    _run("grpo", folder, tmp_path, "grpo_arithmetic.jsonl",
         ["grpo.num_generations=2", "grpo.max_completion_len=6", "grpo.num_iterations=1"])


def test_a_model_apply_cannot_handle(tmp_path):
    """Bloom computes attention outside transformers' interface: packing is refused with one line
    naming the key; padded, it trains on its own attention and loss. DPO and GRPO (padded batches)
    train it too."""
    tok = real_tokenizers.load("llama3")
    cfg = transformers.BloomConfig(vocab_size=len(tok), hidden_size=32, n_layer=2, n_head=4,
                                   bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
    path = tmp_path / "bloom"
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    folder = ("bloom", path)
    with pytest.raises(AssertionError, match="exited 2"):
        _run("sft", folder, tmp_path / "packed", "sft_alpaca.jsonl", ['data.eval=""'])
    _run("sft", folder, tmp_path, "sft_alpaca.jsonl", ['data.eval=""', "data.packing=false", "train.micro_batch_size=2"])
    # DPO and GRPO take the final hidden states from the model's own base (ALiBi: no position ids)
    _run("dpo", folder, tmp_path, "dpo_pairs.jsonl", ['data.eval=""', "train.micro_batch_size=2"])
    _run("grpo", folder, tmp_path, "grpo_arithmetic.jsonl",
         ["grpo.num_generations=2", "grpo.max_completion_len=6", "grpo.num_iterations=1", 'data.eval=""'])


def test_remote_code_needs_the_key(tmp_path, capsys):
    path = tmp_path / "custom"
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "my_custom_lm", "auto_map": {
        "AutoConfig": "configuration_custom.CustomConfig", "AutoModelForCausalLM": "modeling_custom.CustomLM"}}))
    (path / "configuration_custom.py").write_text("raise RuntimeError('custom code ran')\n")
    real_tokenizers.load("llama3").save_pretrained(path)
    code = main(["sft", str(ROOT / "examples" / "sft.toml"), "--set", f"model.path={json.dumps(str(path))}",
                 "--set", f"run.output_dir={json.dumps(str(tmp_path / 'run'))}"])
    err = capsys.readouterr().err
    assert code == 2 and "model.trust_remote_code" in err and "custom code ran" not in err, err
    (path / "tokenizer.json").unlink()
    (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    code = main(["sft", str(ROOT / "examples" / "sft.toml"), "--set", f"model.path={json.dumps(str(path))}"])
    assert code == 2 and "cannot load its tokenizer" in capsys.readouterr().err


def test_a_shared_prompt_prefill_generates_the_same(folder):
    """Each distinct prompt prefilled once (fasttune/rollout.py, shared_prompt_cache) gives the completions
    of prefilling every row, on each family's cache (sliding windows, softcaps, MLA)."""
    from fasttune.rollout import Sampling, TransformersEngine

    name, path = folder
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    texts = ["What is 2 + 2?", "Name a colour, please, in one word.", "Hi"]
    rows = [tok(t)["input_ids"] for t in texts]
    P, pad = max(map(len, rows)), tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    order = [0, 1, 0, 2, 1, 0]  # repeated, interleaved, left-padded to different lengths
    ids = torch.tensor([[pad] * (P - len(rows[i])) + rows[i] for i in order])
    mask = torch.tensor([[0] * (P - len(rows[i])) + [1] * len(rows[i]) for i in order])
    s = Sampling(10, 0.0, 1.0, [tok.eos_token_id], pad)
    with torch.no_grad():
        want = TransformersEngine("dynamic", share_prompts=False).generate(model, ids, mask, s)
        got = TransformersEngine("dynamic").generate(model, ids, mask, s)
    assert torch.equal(got, want), name
