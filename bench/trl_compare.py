"""fasttune beside TRL on the same job, on the real model (SmolLM2-135M-Instruct), each run in a fresh process.

The same for both sides of each task:
  model     SmolLM2-135M-Instruct, from the GGUF of tests/real_model.py converted once with transformers
            into an fp32 safetensors folder (cached beside the GGUF); both load that folder, quantize it to
            bitsandbytes NF4 (double quantization), compute in fp32 on the CPU, bf16 on a GPU;
  adapter   one LoRA adapter (r 16, alpha 32, dropout 0, the 7 linear layers of each decoder layer) made
            once with PEFT and saved (B drawn small and non-zero, so the adapter changes the model); both
            start from it (fasttune `model.adapter`, TRL a trainable `PeftModel` of it);
  data      the first examples of the shipped example data (examples/data): one step's batch, so the
            first step of both sees the same examples (each later step sees them again);
  training  learning rate, constant schedule, no warm-up, no weight decay, grad-norm clip 1, AdamW,
            gradient checkpointing on, the same number of steps, the same batch.
  loading   each side as its users run it: TRL quantizes the fp32 folder on every load; fasttune
            quantizes it on its first load and saves a 4-bit copy that later runs read (as unsloth's
            pre-quantized checkpoints). That first load runs in a process of its own before fasttune's
            timed run and is reported beside it (`first_load`: seconds, peak memory, the copy's size).
Per task:
  sft   fasttune packs the examples into one row (varlen attention, fused loss); TRL's SFTTrainer gets
        the very token ids and labels fasttune trains (an `input_ids` + `labels` dataset), padded: the
        objective is the same (mean over trained tokens) and the first losses must agree to 1e-3.
        (TRL tokenizing the conversations itself would also train the "\\n" after each <|im_end|>.)
  dpo   sigmoid loss, beta 0.1, the reference is the starting adapter on both sides (TRL copies a
        pretrained adapter to a frozen "ref" adapter; fasttune loads `model.adapter` a second time).
        TRL gets the rendered prompt and "response<|im_end|>" as text, so the trained tokens equal
        fasttune's. At step 1 the policy is the reference, so both losses are log 2; the check that
        matters is the mean chosen log-prob, which must agree to 1e-3.
  grpo  4 completions of one prompt per step (at most 24 new tokens, temperature 1), the shipped
        math_answer and format rewards, loss dapo, beta 0.04, one iteration. Samples differ between
        the two (different random streams), so first losses are not comparable. Reference: fasttune
        takes the base with the adapter off, TRL a frozen copy of the starting adapter (same cost).
Recorded per run: seconds per step (median of the steps after the first), tokens/s and trained
tokens/s, peak memory (this process's peak RSS, VmHWM, on the CPU; torch.cuda.max_memory_allocated on
a GPU), the first step's loss, and for GRPO the step split into generation, reference and training.

    python bench/trl_compare.py run PROVIDER TASK WORKDIR     # one run (the fresh process)
    python bench/trl_compare.py all --out FILE.jsonl           # every task, every provider (gpu_check.sh)

PROVIDER is fasttune, trl or trl_liger (TRL with use_liger_kernel=True; CUDA only).
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(BENCH))

MODEL = "SmolLM2-135M-Instruct"
TASKS = ["sft", "dpo", "grpo"]
LR = 1e-4
LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
SIZES = {"sft": {"examples": 8}, "dpo": {"pairs": 4},
         "grpo": {"prompts": 1, "generations": 4, "completion": 24, "beta": 0.04}}
TOLERANCE = 1e-3


def steps() -> int:
    """Steps per run: BENCH_TRL_STEPS (default 4: the first for the loss, the other 3 timed)."""
    return max(2, int(os.environ.get("BENCH_TRL_STEPS", 4)))


# ---- the shared model, adapter and data, made once ------------------------------------------------------------


def _atomic(out: Path, make):
    """make(tmp_folder) once; the folder appears under `out` only when complete."""
    if out.is_dir():
        return out
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    make(tmp)
    try:
        os.replace(tmp, out)
    except OSError:  # another process made it first
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def model_folder() -> Path:
    """SmolLM2-135M-Instruct as an fp32 safetensors folder: the GGUF as fasttune converts it, once."""
    import real_model

    return real_model.hf_folder()


def adapter_folder() -> Path:
    """The starting LoRA adapter, made once with PEFT on the dense model (seed 0, B ~ N(0, 0.002))."""
    folder = model_folder()

    def make(tmp):
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        torch.manual_seed(0)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32),
                               LoraConfig(task_type="CAUSAL_LM", **LORA))
        g = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.002)
        model.save_pretrained(tmp)

    import real_model

    return _atomic(real_model.gguf_path().parent / "lora-r16-init", make)


def _jsonl(path: Path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_job(task: str, workdir: Path) -> Path:
    """The task's data file and fasttune config in `workdir`; returns the config."""
    workdir.mkdir(parents=True, exist_ok=True)
    data = ROOT / "examples" / "data"
    n = steps()
    size = SIZES[task]
    if task == "sft":
        rows = [json.loads(x) for x in (data / "sft_alpaca.jsonl").read_text().splitlines()[: size["examples"]]]
        section = (f'[data]\ntrain = "{_jsonl(workdir / "train.jsonl", rows)}"\nmax_seq_len = 512\npacking = true\n'
                   f'[train]\nmicro_batch_size = 4096\n')
    elif task == "dpo":
        rows = [json.loads(x) for x in (data / "dpo_pairs.jsonl").read_text().splitlines()[: size["pairs"]]]
        section = (f'[data]\ntrain = "{_jsonl(workdir / "train.jsonl", rows)}"\n'
                   f'[dpo]\nbeta = 0.1\nloss_type = "sigmoid"\nreference = "live"\n'
                   f'[train]\nmicro_batch_size = {size["pairs"]}\n')
    else:
        rows = [json.loads(x) for x in (data / "grpo_arithmetic.jsonl").read_text().splitlines()[: 4]]
        section = (f'[data]\ntrain = "{_jsonl(workdir / "train.jsonl", rows)}"\n'
                   f'[grpo]\nnum_generations = {size["generations"]}\nprompts_per_step = {size["prompts"]}\n'
                   f'max_completion_len = {size["completion"]}\ntemperature = 1.0\nloss_type = "dapo"\n'
                   f'beta = {size["beta"]}\nnum_iterations = 1\nreward_funcs = ["math_answer", "format"]\n'
                   f'[train]\n')
    config = workdir / "fasttune.toml"
    config.write_text(
        f'[model]\npath = "{model_folder()}"\nadapter = "{adapter_folder()}"\nload_in_4bit = true\n'
        f'bnb_4bit_quant_type = "nf4"\nbnb_4bit_use_double_quant = true\n'
        + section.replace("[train]\n", f'[train]\nlearning_rate = {LR}\nlr_scheduler = "constant"\nwarmup_steps = 0\n'
                          f'max_steps = {n}\nweight_decay = 0.0\nmax_grad_norm = 1.0\noptimizer = "adamw"\n'
                          f'gradient_checkpointing = true\nseed = 0\n')
        + f'[run]\noutput_dir = "{workdir / "run"}"\nsave_every = 1000\nresume = "never"\nlog_every = 1\n')
    return config


# ---- fasttune: its command line on the config, numbers from its metrics.jsonl ------------------------------


def run_fasttune(task: str, workdir: Path) -> dict:
    """`fasttune TASK config.toml` (its command line, in this process); each step's wall and CPU time
    taken where the loop writes its metrics line, the rest from metrics.jsonl."""
    from fasttune import batches, cli, runlog

    config = write_job(task, workdir)
    marks, tokens, last = [], [], []
    write, step = runlog.RunLog.write, batches.Stream.step

    def step_batches(self, *a, **kw):  # the step's micro-batches, whose `tokens` the loop sums
        last[:] = step(self, *a, **kw)
        return last

    def timed_write(self, row):
        marks.append((time.perf_counter(), time.process_time()))
        tokens.append(sum(b.tokens for b in last))
        return write(self, row)

    runlog.RunLog.write, batches.Stream.step = timed_write, step_batches
    t0 = (time.perf_counter(), time.process_time())
    rc = cli.main([task, str(config)])
    if rc:
        raise RuntimeError(f"fasttune {task} exited {rc}")
    rows = [json.loads(x) for x in (workdir / "run" / "metrics.jsonl").read_text().splitlines()]
    times = [rows[0]["elapsed_s"]] + [b[0] - a[0] for a, b in zip(marks, marks[1:])]
    cpu = [marks[0][1] - t0[1]] + [b[1] - a[1] for a, b in zip(marks, marks[1:])]
    out = {"step_s": times, "cpu_s": cpu, "tokens": tokens,
           "trained": [r["trained_tokens"] for r in rows], "losses": [r["loss"] for r in rows],
           "peak_bytes": peak_bytes()}
    if task == "dpo":
        out["check"] = rows[0]["logps_chosen"]
    if task == "grpo":
        out["split"] = [{k: r[k] for k in ("generation_s", "reference_s", "training_s")} for r in rows]
        out["reward"] = [r.get("reward") for r in rows]
    return out


# ---- TRL: its trainers in this process ----------------------------------------------------------------------


def peak_bytes() -> int:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _trl_model():
    """The NF4 base with the starting adapter, trainable, as a TRL user loads it."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(model_folder(), quantization_config=bnb, dtype=dtype,
                                                 device_map={"": 0 if cuda else "cpu"})
    return PeftModel.from_pretrained(model, adapter_folder(), is_trainable=True)


def _common_args(workdir, liger):
    import torch

    return dict(output_dir=str(workdir / "trl"), learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0,
                max_steps=steps(), weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch", logging_steps=1,
                save_strategy="no", report_to=[], seed=0, gradient_checkpointing=True,
                gradient_checkpointing_kwargs={"use_reentrant": False}, bf16=torch.cuda.is_available(),
                use_liger_kernel=liger, dataloader_num_workers=0, disable_tqdm=True)


def _timer():
    from transformers import TrainerCallback

    class Timer(TrainerCallback):
        def __init__(self):
            self.step_s, self.cpu_s, self.logs = [], [], []

        def on_step_begin(self, args, state, control, **kw):
            _sync()
            self.t0 = (time.perf_counter(), time.process_time())

        def on_step_end(self, args, state, control, **kw):
            _sync()
            self.step_s.append(time.perf_counter() - self.t0[0])
            self.cpu_s.append(time.process_time() - self.t0[1])

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.logs.append(dict(logs))

    return Timer()


def _sync():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _fasttune_cfg(task, workdir):
    from fasttune.config import DPOConfig, GRPOConfig, SFTConfig, load_config

    schema = {"sft": SFTConfig, "dpo": DPOConfig, "grpo": GRPOConfig}[task]
    return load_config(write_job(task, workdir), [], schema=schema)


def trl_sft(workdir, liger):
    """SFTTrainer on fasttune's own token ids and labels of the same examples: the same objective."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from fasttune.data import load_sft
    from fasttune.models import load_tokenizer

    cfg = _fasttune_cfg("sft", workdir)
    tok = load_tokenizer(cfg.model)
    examples, _ = load_sft(cfg.data.train, tok, cfg.data)
    ds = Dataset.from_dict({"input_ids": [e.input_ids for e in examples], "labels": [e.labels for e in examples]})
    tokens = sum(len(e.input_ids) for e in examples)
    trained = sum(sum(x != -100 for x in e.labels[1:]) for e in examples)
    timer = _timer()
    args = SFTConfig(**_common_args(workdir, liger), per_device_train_batch_size=len(examples), max_length=None,
                     packing=False)
    trainer = SFTTrainer(model=_trl_model(), args=args, train_dataset=ds, processing_class=tok, callbacks=[timer])
    trainer.train()
    return {"step_s": timer.step_s, "cpu_s": timer.cpu_s, "tokens": [tokens] * len(timer.step_s), "trained": [trained] * len(timer.step_s),
            "losses": [x["loss"] for x in timer.logs], "peak_bytes": peak_bytes()}


def trl_dpo(workdir, liger):
    """DPOTrainer on the rendered prompts and "response<|im_end|>" texts: fasttune's trained tokens."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from fasttune.models import load_tokenizer

    cfg = _fasttune_cfg("dpo", workdir)
    tok = load_tokenizer(cfg.model)
    rows = [json.loads(x) for x in Path(cfg.data.train).read_text().splitlines()]
    end = tok.eos_token  # <|im_end|>, the end of an assistant turn in ChatML
    ds = Dataset.from_dict({
        "prompt": [tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], tokenize=False,
                                           add_generation_prompt=True) for r in rows],
        "chosen": [r["chosen"] + end for r in rows], "rejected": [r["rejected"] + end for r in rows]})
    timer = _timer()
    args = DPOConfig(**_common_args(workdir, liger), per_device_train_batch_size=len(rows), beta=0.1,
                     loss_type=["sigmoid"], max_length=None)
    trainer = DPOTrainer(model=_trl_model(), args=args, train_dataset=ds, processing_class=tok, callbacks=[timer])
    data = trainer.train_dataset
    tokens = sum(2 * len(p) + len(c) + len(r) for p, c, r in zip(data["prompt_ids"], data["chosen_ids"],
                                                                  data["rejected_ids"]))
    trained = sum(len(c) + len(r) for c, r in zip(data["chosen_ids"], data["rejected_ids"]))
    trainer.train()
    n = len(timer.step_s)
    return {"step_s": timer.step_s, "cpu_s": timer.cpu_s, "tokens": [tokens] * n, "trained": [trained] * n,
            "losses": [x["loss"] for x in timer.logs], "check": timer.logs[0].get("logps/chosen"),
            "peak_bytes": peak_bytes()}


def trl_grpo(workdir, liger):
    """GRPOTrainer (use_vllm=False) with the shipped reward functions; generation timed by wrapping its
    `_generate`, reference and rewards as the rest of `_generate_and_score_completions`."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from fasttune.models import load_tokenizer
    from fasttune.rewards import format_reward, math_answer

    cfg = _fasttune_cfg("grpo", workdir)
    tok = load_tokenizer(cfg.model)
    rows = [json.loads(x) for x in Path(cfg.data.train).read_text().splitlines()]
    ds = Dataset.from_dict({"prompt": [[{"role": "user", "content": r["prompt"]}] for r in rows],
                            "answer": [r["answer"] for r in rows]})
    size = SIZES["grpo"]
    timer = _timer()
    args = GRPOConfig(**_common_args(workdir, liger), per_device_train_batch_size=size["prompts"] * size["generations"],
                      num_generations=size["generations"], max_completion_length=size["completion"], temperature=1.0,
                      top_p=1.0, loss_type="dapo", beta=size["beta"], num_iterations=1, use_vllm=False,
                      scale_rewards="group", reward_weights=[1.0, 1.0])
    trainer = GRPOTrainer(model=_trl_model(), reward_funcs=[math_answer, format_reward], args=args, train_dataset=ds,
                          processing_class=tok, callbacks=[timer])
    split, counts = [], []
    generate, score = trainer._generate, trainer._generate_and_score_completions

    def timed_generate(*a, **kw):
        _sync()
        t0 = time.perf_counter()
        out = generate(*a, **kw)
        _sync()
        split[-1]["generation_s"] = time.perf_counter() - t0
        return out

    def timed_score(*a, **kw):
        split.append({})
        _sync()
        t0 = time.perf_counter()
        out = score(*a, **kw)
        _sync()
        split[-1]["reference_s"] = time.perf_counter() - t0 - split[-1]["generation_s"]
        counts.append((int(out["prompt_mask"].sum() + out["completion_mask"].sum()), int(out["completion_mask"].sum())))
        return out

    trainer._generate, trainer._generate_and_score_completions = timed_generate, timed_score
    trainer.train()
    for s, t in zip(split, timer.step_s):
        s["training_s"] = t - s["generation_s"] - s["reference_s"]
    return {"step_s": timer.step_s, "cpu_s": timer.cpu_s, "tokens": [c[0] for c in counts], "trained": [c[1] for c in counts],
            "losses": [x["loss"] for x in timer.logs], "peak_bytes": peak_bytes(), "split": split,
            "reward": [x.get("reward") for x in timer.logs]}


def run_one(provider: str, task: str, workdir: Path) -> dict:
    """One run in this process; the numbers as a dict (also written to workdir/result.json)."""
    workdir.mkdir(parents=True, exist_ok=True)
    if provider == "fasttune_first_load":
        out = first_load(task, workdir)
    elif provider == "fasttune":
        out = run_fasttune(task, workdir)
    else:
        import torch

        liger = provider == "trl_liger"
        if liger and not torch.cuda.is_available():
            raise SystemExit("trl_liger: Liger-Kernel runs on CUDA only")
        out = {"sft": trl_sft, "dpo": trl_dpo, "grpo": trl_grpo}[task](workdir, liger)
    (workdir / "result.json").write_text(json.dumps(out))
    return out


# ---- many runs, each in a fresh process, as harness Results ------------------------------------------------


def measure(provider: str, task: str, workdir: Path, timeout=1800):
    """Run `provider` on `task` in a fresh process; (Result-like dict of numbers) or raises with its log."""
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    before = _cpu_seconds()
    res = subprocess.run([sys.executable, str(Path(__file__).resolve()), "run", provider, task, str(workdir)],
                         capture_output=True, text=True, env=env, timeout=timeout)
    if res.returncode != 0:
        raise RuntimeError(f"{provider} {task} failed (exit {res.returncode}):\n{res.stdout[-1500:]}\n{res.stderr[-4000:]}")
    # Steps measured beside other work are slower, unevenly (torch's threads wait for each other): the
    # cores that other processes kept busy during the run, on average, are recorded with it.
    after = _cpu_seconds()
    others = ((after[0] - before[0]) - (after[1] - before[1])) / max(after[2] - before[2], 1e-9)
    return {**json.loads((workdir / "result.json").read_text()), "other_cores": round(max(others, 0.0), 2)}


def _cpu_seconds():
    """(busy CPU seconds of the whole machine, CPU seconds of this process's finished children, wall seconds)."""
    import resource

    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    busy = (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return busy, kids.ru_utime + kids.ru_stime, time.monotonic()


def first_load(task: str, workdir: Path) -> dict:
    """fasttune's first QLoRA load of the model, in this process: it quantizes the fp32 folder and saves the
    4-bit copy (fasttune/quantized_cache.py) that every later run, the timed ones included, loads instead."""
    from fasttune import quantized_cache
    from fasttune.models import load_model

    cfg = _fasttune_cfg(task, workdir)
    t = time.perf_counter()
    load_model(cfg, quiet=True)
    return {"load_s": round(time.perf_counter() - t, 3), "peak_bytes": peak_bytes(),
            "copy_bytes": sum(f.stat().st_size for f in quantized_cache.cache_root().glob("*/*") if f.is_file())}


def to_result(provider, task, m):
    """The harness's Result of one run: median of the steps after the first."""
    from harness import Result, env_info

    timed = list(range(1, len(m["step_s"]))) or [0]
    med = statistics.median(m["step_s"][i] for i in timed)
    tokens = statistics.mean(m["tokens"][i] for i in timed)
    trained = statistics.mean(m["trained"][i] for i in timed)
    shape = {"model": MODEL, **SIZES[task], "steps": len(m["step_s"]), "ckpt": True}
    import torch

    res = Result(f"e2e_trl_{task}", shape, "bf16" if torch.cuda.is_available() else "fp32", provider,
                 env_info()["device"], median_s=med, min_s=min(m["step_s"][i] for i in timed), rounds=len(timed),
                 peak_bytes=m["peak_bytes"], tokens_per_s=tokens / med)
    res.extra = {"trained_tokens_per_s": trained / med, "tokens_per_step": tokens, "first_loss": m["losses"][0],
                 "warmup_losses": m["losses"][:1], "warmup_checks": [m["check"]] if m.get("check") is not None else [],
                 "losses": m["losses"], "step_s": m["step_s"], "cpu_s": m.get("cpu_s"), "gradient_checkpointing": True,
                 "cpu_s_per_step": statistics.median(m["cpu_s"][i] for i in timed) if m.get("cpu_s") else None,
                 "other_cores": m.get("other_cores")}
    if "split" in m:
        res.extra["split"] = {k: round(statistics.median(m["split"][i][k] for i in timed), 3)
                              for k in ("generation_s", "reference_s", "training_s")}
        res.extra["reward"] = m.get("reward")
    return res


def agreement(ours, peer, task):
    """Relative difference of the compared first-step numbers (None for GRPO: different samples)."""
    if task == "grpo":
        return None
    a = ours.extra["warmup_losses"] + ours.extra["warmup_checks"]
    b = peer.extra["warmup_losses"] + peer.extra["warmup_checks"]
    return max(abs(x - y) / max(abs(x), 1e-6) for x, y in zip(a, b))


def compare(task, providers, emit, tmp: Path):
    """Every provider on `task`, each in its own process; agreement marked against fasttune's run."""
    from harness import Result, env_info

    import importlib.util

    import torch

    results = {}
    os.environ["FASTTUNE_4BIT_CACHE"] = str(tmp / "4bit")  # fasttune's first load makes its 4-bit copy here
    for p in providers:
        why = None
        if p == "trl_liger" and not torch.cuda.is_available():
            why = "Liger-Kernel runs on CUDA only"
        elif p.startswith("trl") and importlib.util.find_spec("trl") is None:
            why = "trl is not installed"
        elif p == "trl_liger" and importlib.util.find_spec("liger_kernel") is None:
            why = "liger-kernel is not installed (make gpu-wheels)"
        if why:
            r = Result(f"e2e_trl_{task}", {"model": MODEL, **SIZES[task]}, "", p, env_info()["device"], skipped=why)
            results[p] = r
            emit(r)
            continue
        try:
            first = measure("fasttune_first_load", task, tmp / f"{task}-first-load") if p == "fasttune" else None
            r = to_result(p, task, measure(p, task, tmp / f"{task}-{p}"))
            if first:
                r.extra["first_load"] = first
        except Exception as e:  # noqa: BLE001 - recorded as the result; the caller decides what fails
            r = Result(f"e2e_trl_{task}", {"model": MODEL, **SIZES[task]}, "", p, env_info()["device"],
                       skipped=f"failed: {str(e)[-1500:]}")
        if p != "fasttune" and not r.skipped and "fasttune" in results and not results["fasttune"].skipped:
            diff = agreement(results["fasttune"], r, task)
            if diff is not None:
                r.extra.update(agrees_with="fasttune", max_rel_diff=diff, agrees=diff <= TOLERANCE)
                results["fasttune"].extra.setdefault("agrees", True)
        results[p] = r
        emit(r)
    return results


def collect(folder: Path, path: Path) -> int:
    """Results of runs made one by one (`run PROVIDER TASK DIR/TASK-PROVIDER`), saved with a plot."""
    import harness
    import report

    results = []
    for task in TASKS:
        rs = {}
        for p in ["fasttune", "trl", "trl_liger"]:
            f = folder / f"{task}-{p}" / "result.json"
            if f.is_file():
                rs[p] = to_result(p, task, json.loads(f.read_text()))
        if "fasttune" in rs and "trl" in rs and (diff := agreement(rs["fasttune"], rs["trl"], task)) is not None:
            rs["trl"].extra.update(agrees_with="fasttune", max_rel_diff=diff, agrees=diff <= TOLERANCE)
            rs["fasttune"].extra.setdefault("agrees", True)
        results += rs.values()
    harness.save(results, path)
    report.plot(report.load(path), path.with_suffix(".png"))
    print(report.tables(report.load(path)))
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    one = sub.add_parser("run")
    one.add_argument("provider", choices=["fasttune", "fasttune_first_load", "trl", "trl_liger"])
    one.add_argument("task", choices=TASKS)
    one.add_argument("workdir", type=Path)
    every = sub.add_parser("all")
    every.add_argument("--out", type=Path, required=True)
    every.add_argument("--tasks", default=",".join(TASKS))
    every.add_argument("--providers", default="fasttune,trl,trl_liger")
    col = sub.add_parser("collect", help="turn the result.json of runs made apart (DIR/TASK-PROVIDER) into a results file")
    col.add_argument("dir", type=Path)
    col.add_argument("--save", type=Path, required=True)
    args = ap.parse_args(argv)
    if args.cmd == "run":
        run_one(args.provider, args.task, args.workdir)
        return 0
    if args.cmd == "collect":
        return collect(args.dir, args.save)
    from dataclasses import asdict

    from harness import env_info

    def emit(res):
        with open(args.out, "a") as f:
            f.write(json.dumps({"env": env_info(), **asdict(res)}) + "\n")
        print(f"{res.kernel} {res.provider}: " + (f"skipped: {res.skipped[:300]}" if res.skipped else
              f"{res.median_s:.2f} s/step, {res.extra['trained_tokens_per_s']:.0f} trained tok/s, "
              f"peak {res.peak_bytes / 2**20:.0f} MiB, first loss {res.extra['first_loss']:.5f}"), flush=True)

    import tempfile

    try:
        model_folder(), adapter_folder()
    except Exception as e:  # noqa: BLE001 - an offline machine without the cached model: say so, measure nothing
        print(f"trl_compare: the real model is not available here ({str(e)[:300]}); nothing measured", flush=True)
        return 0
    bad = 0
    with tempfile.TemporaryDirectory() as tmp:
        for task in args.tasks.split(","):
            rs = compare(task, args.providers.split(","), emit, Path(tmp))
            bad += any(r.extra.get("agrees") is False for r in rs.values())
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
