"""Rollouts from a merged dense copy of the (Q)LoRA policy (fasttune/rollout.py): the copy generates what
the live model generates, follows the optimizer, costs what its estimate says, samples the log-probs
training computes, falls back to the live model on a real out-of-memory, and serves `fasttune generate`."""

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from fasttune.config import GRPOConfig, load_config
from fasttune.grpo import GRPOTask
from fasttune.models import load_model, load_tokenizer
from fasttune.rollout import MergedCopy, Rollouts, Sampling, TransformersEngine, copy_bytes
from fasttune.train import make_optimizer

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def grpo_task(tmp_path, *sets, log=None):
    sets = [f'run.output_dir={json.dumps(str(tmp_path / "run"))}',
            f'data.train={json.dumps(str(ROOT / "examples/data/grpo_arithmetic.jsonl"))}', *sets]
    cfg = load_config(ROOT / "examples/grpo.toml", sets, schema=GRPOConfig)
    lines = []
    task = GRPOTask(cfg, load_tokenizer(cfg.model), log or (lambda *a: lines.append(" ".join(map(str, a)))))
    model = load_model(cfg)
    torch.manual_seed(0)
    for n, p in model.named_parameters():  # a non-trivial adapter: merged must differ from the base
        if "lora_B" in n:
            p.data.normal_(0, 0.05)
    task.setup(model, CPU, tmp_path)
    return task, model, lines


def prompt_rows(task, k=3):
    prompts = task.prompts[:k]
    P = max(len(p["ids"]) for p in prompts)
    pad = task.tok.pad_token_id
    ids = torch.tensor([[pad] * (P - len(p["ids"])) + p["ids"] for p in prompts])
    mask = torch.tensor([[0] * (P - len(p["ids"])) + [1] * len(p["ids"]) for p in prompts])
    return ids, mask


def greedy(task, n=16):
    return Sampling(n, 0.0, 1.0, task.stops, task.tok.pad_token_id)


def live_greedy(task, model, ids, mask, n=16):
    model.eval()
    return TransformersEngine("dynamic").generate(model, ids, mask, greedy(task, n))


@pytest.mark.parametrize("four_bit", [True, False])
def test_merged_copy_generates_what_the_live_policy_generates(tmp_path, four_bit):
    task, model, lines = grpo_task(tmp_path, f"model.load_in_4bit={str(four_bit).lower()}", 'grpo.rollout_weights="merged"')
    assert task.rollouts.weights == "merged"
    ids, mask = prompt_rows(task)
    merged = task.rollouts.generate(model, ids, mask, greedy(task))
    assert torch.equal(merged, live_greedy(task, model, ids, mask))
    with torch.no_grad(), model.disable_adapter():  # and the adapter matters: the base alone says something else
        assert not torch.equal(merged, live_greedy(task, model, ids, mask))


def _reference_weight(layer):
    """float64: the base (dequantized) + scale · B @ A."""
    import bitsandbytes.functional as bf

    w = layer.base_layer.weight
    base = bf.dequantize_4bit(w.data, w.quant_state) if getattr(w, "quant_state", None) is not None else w.data
    A, B = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
    return base.double() + layer.scaling["default"] * B @ A


def test_the_copy_follows_each_optimizer_step_in_place(tmp_path):
    task, model, _ = grpo_task(tmp_path, 'grpo.rollout_weights="merged"')
    ids, mask = prompt_rows(task)
    task.rollouts.generate(model, ids, mask, greedy(task, 4))
    twin = task.rollouts.twin
    weights = {id(e["merged"]): e["merged"].data_ptr() for e in twin.layers}
    params = [p for p in model.parameters() if p.requires_grad]
    # the trainer's optimizer: fused AdamW, whose update does not bump the version counters by itself
    opt = make_optimizer(params, replace(task.cfg.train, learning_rate=0.05, optimizer="adamw"))
    assert opt.defaults["fused"]
    for _ in range(2):  # two real steps on the GRPO loss
        torch.manual_seed(1)
        batch = task.rollout(task.prompts[:2])
        batch.advantages = torch.randn(len(batch.advantages))
        loss, _ = task.loss(model, batch, task.count(batch), CPU)
        loss.backward()
        opt.step()
        opt.zero_grad()
        assert task.rollouts.policy(model) is twin.model  # refreshed, not rebuilt
        assert twin.refresh() == 0  # nothing moved since: no work
    assert task.rollouts.refreshes == 2
    assert {id(e["merged"]): e["merged"].data_ptr() for e in twin.layers} == weights  # the same storage
    for e in twin.layers:
        assert torch.allclose(e["merged"].double(), _reference_weight(e["lora"]), rtol=1e-5, atol=1e-6)
    merged = task.rollouts.generate(model, ids, mask, greedy(task))
    assert torch.equal(merged, live_greedy(task, model, ids, mask))


@pytest.mark.parametrize("four_bit,refreshable", [(True, True), (True, False), (False, True)])
def test_the_estimate_is_what_the_copy_allocates(tmp_path, four_bit, refreshable):
    task, model, lines = grpo_task(tmp_path, f"model.load_in_4bit={str(four_bit).lower()}")
    twin = MergedCopy(model, torch.float32, refreshable=refreshable)
    assert twin.bytes == copy_bytes(model, torch.float32, refreshable=refreshable) > 0
    shared = {p.data_ptr() for p in model.parameters()}
    assert twin.model.get_input_embeddings().weight.data_ptr() in shared  # shared, not copied
    assert any("merged float32 copy needs" in line and line.endswith(": merged") for line in lines), lines  # auto, logged


@pytest.mark.parametrize("dtype,tol", [("fp32", 1e-4), ("bf16", 5e-2)])
def test_training_logps_agree_with_the_samplers(tmp_path, dtype, tol):
    """The merged copy samples; training scores the same tokens on the live 4-bit policy: the log-probs agree."""
    task, model, _ = grpo_task(tmp_path, f'model.compute_dtype="{dtype}"', 'grpo.rollout_weights="merged"',
                               "grpo.temperature=0.7")
    torch.manual_seed(3)
    batch = task.sample(model, task.prompts[:2])
    # the same draw again, from the sampler itself, keeping its logits
    torch.manual_seed(3)
    ids, mask = batch.input_ids[:, : batch.prompt_len], batch.attention_mask[:, : batch.prompt_len]
    s = Sampling(task.g.max_completion_len, 0.7, 1.0, task.stops, task.tok.pad_token_id)
    out = task.rollouts.twin.model.generate(input_ids=ids, attention_mask=mask, output_logits=True,
                                            return_dict_in_generate=True, **s.kwargs())
    C = batch.completion_ids.shape[1]
    assert torch.equal(out.sequences[:, ids.shape[1]:], batch.completion_ids)
    logits = torch.stack(out.logits[:C], 1).float() / 0.7
    sampler = logits.log_softmax(-1).gather(-1, batch.completion_ids[..., None])[..., 0]
    trained = task.logps(model, batch)  # fasttune's fused log-probs on the live policy, as the loss takes them
    m = batch.completion_mask
    assert m.sum() > 10
    assert torch.allclose(trained[m].float(), sampler[m], rtol=tol, atol=tol), (trained[m] - sampler[m]).abs().max()


@pytest.mark.parametrize("weights", ["merged", "live"])
def test_a_repeated_prompt_is_prefilled_once_with_the_same_completions(tmp_path, weights):
    """A GRPO group repeats its prompt: the dynamic engine runs each distinct prompt once (a forward on
    the distinct rows), and the completions equal those of prefilling every row."""
    task, model, _ = grpo_task(tmp_path, f'grpo.rollout_weights="{weights}"')
    ids, mask = prompt_rows(task)  # 3 prompts of different lengths, left-padded
    order = torch.tensor([0, 1, 0, 2, 1, 0])  # repeated, interleaved
    ids, mask = ids[order], mask[order]
    policy = task.rollouts.policy(model)
    policy.eval()
    want = TransformersEngine("dynamic", share_prompts=False).generate(policy, ids, mask, greedy(task, 12))
    sizes = []
    lm = policy.get_base_model() if hasattr(policy, "get_base_model") else policy  # the live model: under PEFT
    hook = lm.register_forward_pre_hook(lambda m, a, kw: sizes.append(kw["input_ids"].shape), with_kwargs=True)
    try:
        got = TransformersEngine("dynamic").generate(policy, ids, mask, greedy(task, 12))
    finally:
        hook.remove()
    assert sizes[0] == (3, ids.shape[1] - 1)  # the prefill: each distinct prompt once, all but its last token
    assert sizes[1] == (6, 1)  # then every row from the last prompt token on
    assert torch.equal(got, want)
    assert (got[0] == got[2]).all() and (got[1] == got[4]).all()
    sampling = Sampling(12, 1.0, 1.0, task.stops, task.tok.pad_token_id)
    torch.manual_seed(3)
    a = TransformersEngine("dynamic", share_prompts=False).generate(policy, ids, mask, sampling)
    torch.manual_seed(3)
    b = TransformersEngine("dynamic").generate(policy, ids, mask, sampling)
    assert torch.equal(a, b)  # the same random stream and (up to rounding) the same logits: the same samples


@pytest.mark.parametrize("how", ["static", "continuous"])
def test_other_engines_generate_the_same_greedy_completions(tmp_path, how):
    task, model, _ = grpo_task(tmp_path, 'grpo.rollout_weights="merged"')
    ids, mask = prompt_rows(task)
    twin = task.rollouts.policy(model)
    want = TransformersEngine("dynamic").generate(twin, ids, mask, greedy(task, 8))
    got = TransformersEngine(how).generate(twin, ids, mask, greedy(task, 8))
    pad = task.tok.pad_token_id
    for a, b in zip(want.tolist(), got.tolist()):  # the same up to the padding after a stop
        a, b = [t for t in a if t != pad], [t for t in b if t != pad]
        assert a == b


def test_where_a_copy_cannot_work_the_live_model_samples_and_says_why(tmp_path):
    task, model, _ = grpo_task(tmp_path)
    lines = []
    r = Rollouts(model, torch.float32, CPU, weights="merged", log=lines.append, sharded=True)
    assert r.weights == "live" and "sharded (FSDP2)" in lines[0]
    full, _, _ = grpo_task(tmp_path / "full", 'model.finetune="full"', "model.load_in_4bit=false", "grpo.beta=0")
    assert full.rollouts.weights == "live"
    r = Rollouts(full.model, torch.float32, CPU, weights="merged", log=lines.append)
    assert r.weights == "live" and "no LoRA adapter" in lines[-1]


OOM_SCRIPT = """
import json, resource, sys, torch, transformers
from fasttune.config import GRPOConfig, load_config
from fasttune.grpo import GRPOTask
from fasttune.models import load_model, load_tokenizer

# a model whose merged copy (the merged weights, fp32) needs 128 MiB; its 4-bit base 16 MiB
folder = sys.argv[1]
cfg = transformers.LlamaConfig(vocab_size=260, hidden_size=1024, intermediate_size=4096, num_hidden_layers=2,
                               num_attention_heads=8, num_key_value_heads=8, pad_token_id=0, eos_token_id=3)
transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)
from fasttune.builtin import byte_tokenizer
byte_tokenizer().save_pretrained(folder)
sets = [f"model.path={json.dumps(folder)}", f"run.output_dir={json.dumps(folder + '/run')}",
        f"data.train={json.dumps(sys.argv[2])}", 'grpo.rollout_weights="merged"', "grpo.max_completion_len=8",
        "grpo.beta=0", "grpo.num_iterations=1"]
cfg = load_config(sys.argv[3], sets, schema=GRPOConfig)
lines = []
task = GRPOTask(cfg, load_tokenizer(cfg.model), lambda *a: lines.append(" ".join(map(str, a))))
model = load_model(cfg)
task.setup(model, torch.device("cpu"), folder)
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)


def step(prompts):
    batch = task.rollout(prompts)
    loss, _ = task.loss(model, batch, task.count(batch), torch.device("cpu"))
    loss.backward()
    opt.step()
    opt.zero_grad()
    return batch


task.rollouts.weights = "live"  # a step on the live model first: threads, arenas and optimizer state exist
step(task.prompts[:2])
task.rollouts.weights = "merged"

def vm():
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmSize"))

# the cap: 112 MiB over what the process maps now, less than the copy's 128 MiB (logged); sampling and
# training from the 4-bit model need less (they passed at 100 MiB). At 160 MiB the copy fits and its
# rollout too (each prompt's prefill runs once per group), and the training step after it does not.
resource.setrlimit(resource.RLIMIT_AS, (vm() + 112 * 2**20, resource.RLIM_INFINITY))
steps = 0
for i in range(3):  # three optimizer steps, each on a fresh rollout
    batch = step(task.prompts[2 * i + 2 : 2 * i + 4])
    steps += 1
print(json.dumps({"steps": steps, "weights": task.rollouts.weights, "lines": lines,
                  "completions": int(batch.completion_ids.numel())}))
"""


def test_an_out_of_memory_with_the_copy_falls_back_to_live_once(tmp_path):
    """A real allocation failure: the process's address space is capped (RLIMIT_AS) below what the
    copy needs but above what sampling and training from the 4-bit model need. glibc is told to map
    every block of 64 KiB or more on its own, so that freed memory leaves the address space at once."""
    script = tmp_path / "oom.py"
    script.write_text(textwrap.dedent(OOM_SCRIPT))
    run = subprocess.run([sys.executable, str(script), str(tmp_path / "model"),
                          str(ROOT / "examples/data/grpo_arithmetic.jsonl"), str(ROOT / "examples/grpo.toml")],
                         capture_output=True, text=True, timeout=600,
                         env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    warnings = [line for line in out["lines"] if "out of memory with the merged copy" in line]
    assert out["steps"] == 3 and out["weights"] == "live" and out["completions"] > 0, out
    assert len(warnings) == 1 and "can't allocate memory" in warnings[0], out["lines"]


def test_generate_on_an_adapter_run_uses_the_merged_copy(tmp_path):
    """`fasttune generate` on a QLoRA run: the merged copy (said on stderr) gives the live model's greedy text."""
    from fasttune.sft import train_sft

    sets = [f"run.output_dir={json.dumps(str(tmp_path / 'run'))}", "train.max_steps=3", "run.save_every=3",
            f"data.train={json.dumps(str(ROOT / 'examples/data/sft_alpaca.jsonl'))}", 'data.eval=""']
    train_sft(load_config(ROOT / "examples/sft.toml", sets), log=lambda *_: None)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["What is 2+2?", "Name a colour."]))
    out = {}
    for weights in ("merged", "live"):
        run = subprocess.run([sys.executable, "-m", "fasttune.cli", "generate", str(tmp_path / "run"), "--prompts",
                              str(prompts), "--temperature", "0", "--max-new-tokens", "12", "--weights", weights],
                             capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-2000:]
        out[weights] = [json.loads(line)["completion"] for line in run.stdout.splitlines()]
        assert ("merged float32 copy needs" in run.stderr) == (weights == "merged"), run.stderr[-2000:]
    assert out["merged"] == out["live"] and len(out["live"]) == 2


def test_real_model_merged_greedy_equals_live(tmp_path):
    """SmolLM2-135M-Instruct, QLoRA with a random adapter: 8 greedy tokens, merged copy against live."""
    sys.path.insert(0, str(ROOT / "tests"))
    import real_model

    folder = real_model.hf_folder()
    task, model, _ = grpo_task(tmp_path, f"model.path={json.dumps(str(folder))}", 'grpo.rollout_weights="merged"',
                               "lora.r=8")
    ids, mask = prompt_rows(task, k=2)
    merged = task.rollouts.generate(model, ids, mask, greedy(task, 8))
    assert torch.equal(merged, live_greedy(task, model, ids, mask, 8))
