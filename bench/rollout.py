"""Rollout speed on the real model: SmolLM2-135M-Instruct, prompts × generations completions of a fixed
number of new tokens (min = max, so every provider makes the same tokens), sampled at temperature 1.

  hf_dense          plain transformers `generate` on the dense model (the GGUF dequantized), as a user would;
  fasttune_live     fasttune's QLoRA policy (NF4 base + LoRA r=16, a random adapter) sampling from itself;
  fasttune_merged   the same policy through its merged dense copy (fasttune/rollout.py), dynamic KV cache;
  fasttune_static   the merged copy with a static KV cache (compiled forward on CUDA);
  fasttune_continuous  the merged copy through transformers' continuous batching (generate_batch).

Each provider is warmed up once (a few tokens; on CUDA the static cache's compile), then the rounds
run interleaved (provider A, B, C, A, B, C, ...) so that a busy machine slows them alike; the median
round gives tokens/s. The merged copy's extra memory (its own allocations, exact) is recorded beside it.

    python bench/rollout.py --out rollout.jsonl --sizes 8x64,128x64

appends a JSON line per provider and size, and prints which engine was fastest at each size: the line
for fasttune/rollout.py's AUTO_ENGINE (bench/gpu_check.sh runs this on a lent GPU).
"""

import argparse
import gc
import json
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from common import device, sync  # noqa: E402
from harness import Result, env_info  # noqa: E402

PROVIDERS = ["hf_dense", "fasttune_live", "fasttune_merged", "fasttune_static", "fasttune_continuous"]
ENGINES = {"fasttune_merged": "dynamic", "fasttune_static": "static", "fasttune_continuous": "continuous"}
QUESTIONS = ["What is 17 + 25?", "Name three colours of the rainbow.", "Write a haiku about rain.",
             "Why is the sky blue?", "What is the capital of France?", "Give me a word that rhymes with cat.",
             "How many legs does a spider have?", "Say hello in Spanish."]


def models(dev):
    """(tokenizer, dense transformers model, fasttune QLoRA policy with a random adapter, compute dtype)."""
    import transformers

    import real_model
    from fasttune.config import GRPOConfig, parse_config
    from fasttune.models import compute_dtype, load_model, load_tokenizer

    try:
        folder, name = str(real_model.hf_folder()), "SmolLM2-135M-Instruct"
    except RuntimeError as e:  # no network to fetch it (the lent GPU): its architecture, random weights
        print(f"the real model is not available ({str(e)[:120]}...); SmolLM2's shape with random weights", flush=True)
        folder, name = random_smollm2(), "SmolLM2-135M shape, random weights"
    cfg = parse_config({"model": {"path": folder, "load_in_4bit": True}, "lora": {"r": 16, "alpha": 32}}, GRPOConfig)
    dtype = compute_dtype("auto", dev)
    tok = load_tokenizer(cfg.model)
    dense = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(dev).eval()
    policy = load_model(cfg, dev, quiet=True)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    MODEL["name"] = name
    return tok, dense, policy.eval(), dtype


MODEL = {"name": "SmolLM2-135M-Instruct"}


def random_smollm2() -> str:
    """A folder with SmolLM2-135M's config (30 layers, hidden 576, 9/3 heads, vocabulary 49152, tied
    embeddings), seeded random weights and the built-in ChatML byte tokenizer: the same generation work."""
    import tempfile

    import transformers

    from fasttune.builtin import byte_tokenizer

    folder = Path(tempfile.mkdtemp(prefix="smollm2-shape-"))
    cfg = transformers.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                   num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True,
                                   max_position_embeddings=8192, rms_norm_eps=1e-5, pad_token_id=0, eos_token_id=3)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return str(folder)


def prompt_batch(tok, prompts, generations, dev):
    """Left-padded chat prompts, each repeated `generations` times: ids, mask [prompts × generations, P]."""
    rows = []
    for i in range(prompts):
        msgs = [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]
        ids = tok(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True),
                  add_special_tokens=False)["input_ids"]
        rows += [ids] * generations
    P = max(map(len, rows))
    ids = torch.full((len(rows), P), tok.pad_token_id)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, P - len(r):], mask[i, P - len(r):] = torch.tensor(r), 1
    return ids.to(dev), mask.to(dev)


def runners(tok, dense, policy, dtype, dev, new_tokens):
    """{provider: run(ids, mask, n) -> completions} and the merged copy's bytes."""
    from fasttune.rollout import Rollouts, Sampling, TransformersEngine

    def sampling(n):  # fixed lengths: no stop token, min = max
        return Sampling(n, 1.0, 1.0, [], tok.pad_token_id, min_new_tokens=n)

    live = Rollouts(policy, dtype, dev, weights="live", engine="dynamic", log=lambda *_: None)
    merged = Rollouts(policy, dtype, dev, weights="merged", engine="dynamic", log=lambda *_: None)
    twin = merged.policy(policy)
    out = {"hf_dense": lambda ids, mask, n: TransformersEngine("dynamic").generate(dense, ids, mask, sampling(n)),
           "fasttune_live": lambda ids, mask, n: live.generate(policy, ids, mask, sampling(n))}
    for name, how in ENGINES.items():
        def run(ids, mask, n, how=how):
            merged.engine_name = how
            return merged.generate(policy, ids, mask, sampling(n))
        out[name] = run
    assert twin is merged.twin.model
    return out, merged.twin.bytes


def measure(providers, prompts, generations, new_tokens, rounds, dev, loaded=None, emit=print):
    """Results for `providers` at one size; `loaded`: models() already built."""
    tok, dense, policy, dtype = loaded or models(dev)
    run, copy_bytes = runners(tok, dense, policy, dtype, dev, new_tokens)
    ids, mask = prompt_batch(tok, prompts, generations, dev)
    shape = {"model": MODEL["name"], "prompts": prompts, "generations": generations, "new_tokens": new_tokens,
             "lora_r": 16}
    times = {p: [] for p in providers}
    failed = {}
    for p in providers:  # warm-up: a few tokens (the static cache compiles here on CUDA)
        try:
            torch.manual_seed(0)
            run[p](ids, mask, min(4, new_tokens))
        except Exception as e:  # noqa: BLE001 - recorded as that provider's result
            failed[p] = f"failed: {type(e).__name__}: {str(e)[:200]}"
    for _ in range(rounds):
        for p in providers:
            if p in failed:
                continue
            torch.manual_seed(1)
            sync()
            t0 = time.perf_counter()
            comp = run[p](ids, mask, new_tokens)
            sync()
            times[p].append(time.perf_counter() - t0)
            assert comp.shape == (len(ids), new_tokens), comp.shape
    dtype_name = {torch.float32: "fp32", torch.bfloat16: "bf16"}.get(dtype, str(dtype))
    results = []
    for p in providers:
        res = Result("rollout", shape, dtype_name, p, env_info()["device"], skipped=failed.get(p))
        if p not in failed:
            res.median_s, res.min_s, res.rounds = statistics.median(times[p]), min(times[p]), rounds
            res.tokens_per_s = len(ids) * new_tokens / res.median_s
            if p != "hf_dense" and "hf_dense" in providers and "hf_dense" not in failed:
                res.extra["vs_hf_dense"] = statistics.median(times["hf_dense"]) / res.median_s
            if p in ENGINES:
                res.extra["copy_bytes"] = copy_bytes
        results.append(res)
        emit(res)
    return results


def fastest(results) -> str | None:
    done = [r for r in results if r.provider in ENGINES and not r.skipped]
    return ENGINES[max(done, key=lambda r: r.tokens_per_s).provider] if done else None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="JSON lines file; one line appended per result")
    ap.add_argument("--sizes", default="8x64,128x64", help="ROWSxNEW_TOKENS,...: rows = 8 prompts × rows/8 generations")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--providers", default=",".join(PROVIDERS), help="comma-separated, of: " + ", ".join(PROVIDERS))
    args = ap.parse_args(argv)
    dev = device()
    loaded = models(dev)

    def emit(res):
        with open(args.out, "a") as f:
            f.write(json.dumps({"env": env_info(), **asdict(res)}) + "\n")
        what = res.skipped or f"{res.tokens_per_s:,.0f} tok/s" + (
            f" ({res.extra['vs_hf_dense']:.2f}x hf_dense)" if "vs_hf_dense" in res.extra else "")
        print(f"rollout {json.dumps(res.shape)} {res.provider}: {what}", flush=True)

    choice = {}
    for size in args.sizes.split(","):
        rows, new = (int(x) for x in size.split("x"))
        results = measure(args.providers.split(","), min(rows, 8), max(1, rows // 8), new, args.rounds, dev, loaded, emit)
        choice[("large" if rows >= 64 else "small")] = fastest(results)
        gc.collect()
    kind = dev.type
    print("AUTO_ENGINE entries measured here: " + ", ".join(f'("{kind}", "{k}"): "{v}"' for k, v in choice.items()),
          flush=True)
    with open(args.out, "a") as f:
        f.write(json.dumps({"env": env_info(), "rollout_engine_choice": {f"{kind}/{k}": v for k, v in choice.items()}}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
