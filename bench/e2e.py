"""End-to-end QLoRA training steps: what a user picks a trainer by.

One model (bench/e2e_models.py: NF4 base + LoRA r=16 on every linear layer, random weights, built
once) and one sequence of seeded batches serve every provider, so their first losses must agree:

  e2e_sft    one packed row of `seq` tokens of SFT-like samples (log-normal lengths, median 300,
             prompt tokens untrained) per step.
     fasttune   its trainer's pieces: `fasttune.kernels.apply` (varlen attention on the packed row,
                fused loss from the last hidden states, labels on the host), `packed_batch`, as
                SFTTask.loss calls the model;
     hf_plain   what users write today: transformers + PEFT + bitsandbytes, the same samples as a
                right-padded batch, SDPA, full logits, the loss through the model's `labels`;
     liger      hf_plain after Liger-Kernel's `apply_liger_kernel_to_llama/qwen2` (CUDA only).
  e2e_dpo    B pairs (shared prompt, chosen and rejected responses), one padded forward of 2B rows
             for the reference (adapter off, no grad) and one for the policy.
     fasttune   `linear_logprobs` for the reference and `dpo_loss` on the hidden states, as fasttune/dpo.py;
     hf_plain   full logits, fp32 log-softmax, gather, sigmoid loss (TRL's way).
  e2e_grpo   P prompts × G completions: generation (transformers' `generate` on the live 4-bit policy,
             a fixed number of new tokens), reference log-probs (adapter off) and the training
             forward + backward, each timed apart.
     fasttune   `linear_logprobs` and `grpo_loss`, as fasttune/grpo.py; hf_plain: full logits.

Every step is forward + backward + AdamW on the LoRA weights, under bf16 autocast on CUDA (fp32 on
the CPU), with gradient checkpointing on for every provider (recorded in the shape as `ckpt`). Each
provider starts from the same LoRA weights, runs `WARMUP` untimed steps (their losses are the
agreement check), then `TIMED` steps, each timed between device synchronisations; peak memory is
measured over the timed steps. The model stays; the optimizer and everything else a provider made
is freed (gc, empty_cache) before the next. A shape the device cannot hold is skipped with its
reason (estimated from the config against free memory, and any out-of-memory error is caught).

    python bench/e2e.py --out results.jsonl --model llama-3.2-1b --cases sft:4096,dpo,grpo

appends one JSON line per provider as soon as it is measured (a timeout loses nothing measured).
"""

import argparse
import contextlib
import gc
import json
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cases import sample_lengths  # noqa: E402
from common import Unavailable, device, in_use, peak, reset_peak, sync  # noqa: E402
from e2e_models import CONFIGS, build_qlora, step_bytes, weight_bytes  # noqa: E402
from harness import Result, env_info  # noqa: E402

IGNORE = -100
SEED = 0
WARMUP, TIMED = 2, 3
LR = 1e-4
TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 2e-2}  # relative, on the losses and log-probs compared
SFT_PROVIDERS = ["fasttune", "hf_plain", "liger"]
RL_PROVIDERS = ["fasttune", "hf_plain"]
DPO_SHAPE = {"pairs": 4, "prompt": 512, "response": 512}  # caps of the log-normal lengths
GRPO_SHAPE = {"prompts": 2, "generations": 8, "prompt": 256, "completion": 128}
TINY = {"seq": 1024, "pairs": 2, "prompt": 48, "response": 48, "prompts": 2, "generations": 2, "completion": 8}


def compute_dtype(dev):
    return torch.bfloat16 if dev.type == "cuda" else torch.float32


def autocast(dev):
    return torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda")


# ---- data: seeded random tokens with SFT-like lengths ---------------------------------------------


@dataclass
class Sample:
    input_ids: list
    labels: list  # IGNORE where untrained, not shifted (as fasttune.data.Example)


def _length(g, cap):
    """Log-normal, median 300 (as cases.sample_lengths' "sft" mix), capped."""
    return min(cap, max(2, int(torch.exp(torch.randn(1, generator=g) * 0.9 + 5.7))))


def _tokens(n, vocab, g):
    return torch.randint(1, vocab, (n,), generator=g).tolist()  # id 0 is the pad token


def sft_samples(step, seq, vocab) -> list[Sample]:
    """The samples of step `step`: they fill exactly one row of `seq` tokens; 20-60% of each is prompt."""
    g = torch.Generator().manual_seed(SEED * 1000 + step)
    out = []
    for L in sample_lengths("sft", seq, g):
        ids = _tokens(L, vocab, g)
        prompt = int(L * (0.2 + 0.4 * float(torch.rand(1, generator=g))))
        out.append(Sample(ids, [IGNORE] * prompt + ids[prompt:]))
    return out


def dpo_pairs(step, shape, vocab) -> list[tuple[Sample, Sample]]:
    g = torch.Generator().manual_seed(SEED * 1000 + step)
    pairs = []
    for _ in range(shape["pairs"]):
        prompt = _tokens(_length(g, shape["prompt"]), vocab, g)
        chosen, rejected = (_tokens(_length(g, shape["response"]), vocab, g) for _ in range(2))
        pairs.append(tuple(Sample(prompt + r, [IGNORE] * len(prompt) + r) for r in (chosen, rejected)))
    return pairs


def grpo_prompts(step, shape, vocab):
    """Left-padded prompts, each repeated `generations` times: (ids, attention_mask) [P·G, Pmax]."""
    g = torch.Generator().manual_seed(SEED * 1000 + step)
    prompts = [_tokens(int(torch.randint(shape["prompt"] // 2, shape["prompt"] + 1, (1,), generator=g)), vocab, g)
               for _ in range(shape["prompts"])]
    P, G = max(map(len, prompts)), shape["generations"]
    ids = torch.zeros(len(prompts) * G, P, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i * G : (i + 1) * G, P - len(p) :] = torch.tensor(p)
        mask[i * G : (i + 1) * G, P - len(p) :] = 1
    return ids, mask


def plain_padded(samples):
    """What a user's collator makes: right padding, attention mask, labels -100 on prompt and padding."""
    S = max(len(s.input_ids) for s in samples)
    ids = torch.zeros(len(samples), S, dtype=torch.long)
    labels = torch.full((len(samples), S), IGNORE)
    mask = torch.zeros(len(samples), S, dtype=torch.long)
    for i, s in enumerate(samples):
        ids[i, : len(s.input_ids)] = torch.tensor(s.input_ids)
        labels[i, : len(s.labels)] = torch.tensor(s.labels)
        mask[i, : len(s.input_ids)] = 1
    return ids, mask, labels


# ---- the model's parts, as fasttune/dpo.py and grpo.py reach them -----------------------------------


def _parts(model):
    lm = model.get_base_model()
    return lm.model, lm.lm_head


def _full_logps(model, ids, mask, labels):
    """TRL's way: the whole [B, T, V] logits, fp32 log-softmax, gather the (shifted) labels."""
    logits = model(input_ids=ids, attention_mask=mask).logits
    logp = logits.float().log_softmax(-1)
    return logp.gather(-1, labels.clamp_min(0)[..., None])[..., 0] * (labels != IGNORE)


# ---- providers: a context that sets the model up, and the step ----------------------------------


@contextlib.contextmanager
def provider_setup(model, provider):
    """fasttune: its kernels inside the block. liger: patched for good (it cannot be undone, so it runs last)."""
    if provider == "fasttune":
        import fasttune.kernels as K

        with K.applied(model):
            yield
    elif provider == "hf_plain":
        yield
    elif provider == "liger":
        if not torch.cuda.is_available():
            raise Unavailable("Liger-Kernel runs on CUDA only")
        try:
            import liger_kernel.transformers as lk
        except ImportError as e:
            raise Unavailable(f"liger-kernel not installed ({e})") from None
        base = model.get_base_model()
        patch = {"llama": lk.apply_liger_kernel_to_llama, "qwen2": lk.apply_liger_kernel_to_qwen2}[base.config.model_type]
        if not getattr(base, "_liger_applied", False):
            patch(model=base)  # RoPE, RMSNorm, SwiGLU, fused linear cross-entropy; the defaults users take
            base._liger_applied = True
        yield
    else:
        raise Unavailable(f"no provider {provider!r}")


def sft_step(provider, model, seq, vocab, dev):
    """step(i) -> (loss, stats) for step i's samples; counts (real and trained tokens) per step."""
    from fasttune.batches import packed_batch

    def step(i):
        samples = sft_samples(i, seq, vocab)
        if provider == "fasttune":
            b = packed_batch(samples)
            with autocast(dev):
                loss = model(**b.model_kwargs(dev), num_items_in_batch=b.trained).loss
            return loss, {"tokens": b.tokens, "trained": b.trained, "padded_tokens": b.tokens}
        ids, mask, labels = plain_padded(samples)
        with autocast(dev):
            loss = model(input_ids=ids.to(dev), attention_mask=mask.to(dev), labels=labels.to(dev)).loss
        return loss, {"tokens": int(mask.sum()), "trained": int((labels[:, 1:] != IGNORE).sum()),
                      "padded_tokens": ids.numel()}

    return step


def dpo_step(provider, model, shape, vocab, dev, beta=0.1):
    from fasttune.batches import padded_batch

    inner, head = _parts(model)

    def step(i):
        pairs = dpo_pairs(i, shape, vocab)
        B = len(pairs)
        b = padded_batch([c for c, _ in pairs] + [r for _, r in pairs], pad_id=0)
        ids, mask = b.input_ids.to(dev), b.attention_mask.to(dev)
        counts = {"tokens": b.tokens, "trained": b.trained, "padded_tokens": ids.numel()}
        with autocast(dev):
            if provider == "fasttune":
                from fasttune.kernels import dpo_loss, linear_logprobs

                def hidden():
                    return inner(input_ids=ids, attention_mask=mask).last_hidden_state.to(head.weight.dtype)

                with torch.no_grad(), model.disable_adapter():
                    ref = linear_logprobs(hidden(), head.weight, b.shift_labels, bias=head.bias).sum(-1)
                loss, s = dpo_loss(hidden(), head.weight, b.shift_labels, ref_logps=ref, beta=beta, num_pairs=B,
                                   bias=head.bias)
                pi = torch.cat([s.chosen_logps, s.rejected_logps]).detach()
            else:
                labels = b.shift_labels.to(dev)
                with torch.no_grad(), model.disable_adapter():
                    ref = _full_logps(model, ids, mask, labels).sum(-1)
                pi = _full_logps(model, ids, mask, labels).sum(-1)
                r = pi - ref
                loss = -F.logsigmoid(beta * (r[:B] - r[B:])).mean()
                pi = pi.detach()
        return loss, {**counts, "check": pi.float().mean()}  # the policy's mean sequence log-prob

    return step


def grpo_step(provider, model, shape, vocab, dev, beta=0.04):
    """Generation, reference and training apart; `check` is the mean reference log-prob per token."""
    from fasttune.kernels import grpo_loss, linear_logprobs

    inner, head = _parts(model)
    C = shape["completion"]

    def step(i):
        ids, mask = grpo_prompts(i, shape, vocab)
        ids, mask = ids.to(dev), mask.to(dev)
        P = ids.shape[1]
        t0 = time.perf_counter()
        model.eval()
        torch.manual_seed(SEED * 1000 + i)
        with torch.no_grad(), autocast(dev):
            out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_p=1.0,
                                 top_k=0, max_new_tokens=C, min_new_tokens=C, eos_token_id=vocab - 1, pad_token_id=0,
                                 use_cache=True)
        model.train()
        sync()
        t1 = time.perf_counter()
        comp = out[:, P:]
        full_mask = torch.cat([mask, torch.ones_like(comp)], 1)
        pos = (full_mask.cumsum(-1) - 1).clamp_min(0)
        labels = comp  # every completion token is trained (fixed length, no end-of-turn)
        adv = torch.randn(len(comp), generator=torch.Generator().manual_seed(i)).to(dev)

        def hidden():
            h = inner(input_ids=out, attention_mask=full_mask, position_ids=pos).last_hidden_state
            return h[:, P - 1 : P - 1 + C].to(head.weight.dtype)

        def plain_logps():  # TRL's way: logits of the completion only (logits_to_keep), fp32 log-softmax
            logits = model(input_ids=out, attention_mask=full_mask, position_ids=pos, logits_to_keep=C + 1).logits
            logp = logits[:, :-1].float().log_softmax(-1)
            return logp.gather(-1, labels[..., None])[..., 0]

        with autocast(dev):
            with torch.no_grad(), model.disable_adapter():
                ref = linear_logprobs(hidden(), head.weight, labels.cpu(), bias=head.bias) if provider == "fasttune" \
                    else plain_logps()
            sync()
            t2 = time.perf_counter()
            if provider == "fasttune":
                loss = grpo_loss(hidden(), head.weight, labels.cpu(), torch.ones(labels.shape, dtype=torch.bool),
                                 adv, ref_logps=ref.float(), beta=beta, bias=head.bias)[0]
            else:  # TRL's dapo with k3 KL, old = the policy's own detached log-probs (ratio 1)
                logp = plain_logps()
                ratio = torch.exp(logp - logp.detach())
                a = adv[:, None]
                per_tok = -torch.min(ratio * a, torch.clamp(ratio, 0.8, 1.2) * a)
                d = ref - logp
                loss = (per_tok + beta * (torch.exp(d) - d - 1)).mean()
        n = comp.numel()
        return loss, {"tokens": int(full_mask.sum()), "trained": n, "padded_tokens": out.numel(),
                      "check": ref.float().mean(), "generation_s": t1 - t0, "reference_s": t2 - t1, "_training_start": t2}

    return step


# ---- measuring one provider -------------------------------------------------------------------------


def _free():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def measure(model, step, lora_init, dev, warmup=WARMUP, timed=TIMED):
    """Run warm-up then timed steps from the LoRA weights `lora_init`; returns the numbers."""
    with torch.no_grad():
        for p, p0 in zip(lora_params(model), lora_init):
            p.copy_(p0)
    params = lora_params(model)
    opt = torch.optim.AdamW(params, lr=LR)
    losses, checks, rows = [], [], []
    try:
        for i in range(warmup + timed):
            if i == warmup:
                _free()
                base = in_use()
                reset_peak()
            sync()
            t0 = time.perf_counter()
            loss, stats = step(i)
            t_train = stats.pop("_training_start", None)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync()
            t1 = time.perf_counter()
            if t_train is not None:
                stats["training_s"] = t1 - t_train
            losses.append(loss.detach().float())
            if "check" in stats:
                checks.append(stats.pop("check"))
            if i >= warmup:
                rows.append({"step_s": t1 - t0, **stats})
        top = peak()
    finally:
        del opt
        for p in params:
            p.grad = None
    out = {"losses": [float(x) for x in losses], "checks": [float(x) for x in checks], "rows": rows,
           "peak_bytes": top, "step_peak_bytes": top - base}
    _free()
    return out


def lora_params(model):
    return [p for n, p in model.named_parameters() if p.requires_grad]


# ---- a case: every provider on one model and shape ------------------------------------------------


def _check_memory(need, dev):
    """Unavailable if `need` bytes (estimated from the config) exceed what the device has free."""
    if dev.type != "cuda":
        return
    free = torch.cuda.mem_get_info()[0]
    if need > 0.95 * free:
        raise Unavailable(f"needs about {need / 2**30:.1f} GiB (estimated from the config), {free / 2**30:.1f} GiB free")


def _tokens_in_memory(kind, provider, shape, vocab):
    """(tokens the model runs, tokens whose full logits are made) of the largest step, for the estimate."""
    if kind == "e2e_sft":
        padded = max(len(s) * max(len(x.input_ids) for x in s)
                     for s in (sft_samples(i, shape["seq"], vocab) for i in range(WARMUP + TIMED)))
        tokens = shape["seq"] if provider == "fasttune" else padded
    elif kind == "e2e_dpo":
        tokens = 2 * shape["pairs"] * (shape["prompt"] + shape["response"])
    else:
        tokens = shape["prompts"] * shape["generations"] * (shape["prompt"] + shape["completion"])
    return tokens, tokens if provider == "hf_plain" else 0


def run_case(kind, name, model, lora_init, providers, shape, emit, done=None, warmup=WARMUP, timed=TIMED,
             strict=True):
    """Measure `providers` on one case, each from the LoRA weights `lora_init`; `emit(result)` gets
    each result as soon as it is measured. `done`: this case's results so far (for the agreement check).
    A peer's error is recorded as its result; so is anyone's with strict=False (the GPU run: one
    provider's failure must not cost the others' numbers), else it is raised."""
    dev = next(p for p in model.parameters() if p.device.type != "meta").device
    vocab = CONFIGS[name]["vocab_size"]
    dtype = compute_dtype(dev)
    results = list(done or [])
    steps = {"e2e_sft": lambda p: sft_step(p, model, shape["seq"], vocab, dev),
             "e2e_dpo": lambda p: dpo_step(p, model, shape, vocab, dev),
             "e2e_grpo": lambda p: grpo_step(p, model, shape, vocab, dev)}
    for provider in providers:
        res = Result(kind, {"model": name, **shape, "ckpt": True}, "bf16" if dtype == torch.bfloat16 else "fp32",
                     provider, env_info()["device"])
        try:
            _check_memory(step_bytes(name, *_tokens_in_memory(kind, provider, shape, vocab), checkpointing=True), dev)
            with provider_setup(model, provider):
                m = measure(model, steps[kind](provider), lora_init, dev, warmup, timed)
        except Unavailable as e:
            res.skipped = str(e)
        except torch.cuda.OutOfMemoryError as e:
            res.skipped = f"out of memory: {str(e).splitlines()[0][:200]}"
        except Exception as e:  # noqa: BLE001 - see the docstring
            if strict and provider != "liger":
                raise
            traceback.print_exc()
            res.skipped = f"failed: {type(e).__name__}: {str(e)[:300]}"
        if res.skipped:
            _free()
        else:
            rows = m["rows"]
            res.median_s = statistics.median(r["step_s"] for r in rows)
            res.min_s = min(r["step_s"] for r in rows)
            res.rounds = len(rows)
            res.peak_bytes = m["peak_bytes"]
            res.tokens_per_s = statistics.mean(r["tokens"] for r in rows) / res.median_s
            res.extra = {"trained_tokens_per_s": statistics.mean(r["trained"] for r in rows) / res.median_s,
                         "tokens_per_step": statistics.mean(r["tokens"] for r in rows),
                         "padded_tokens_per_step": statistics.mean(r["padded_tokens"] for r in rows),
                         "step_peak_bytes": m["step_peak_bytes"], "warmup_losses": m["losses"][:warmup],
                         "warmup_checks": m["checks"][:warmup], "gradient_checkpointing": True,
                         "autocast": "bf16" if dev.type == "cuda" else None}
            if kind == "e2e_grpo":
                res.extra["split"] = {k: round(statistics.median(r[k] for r in rows), 4)
                                      for k in ("generation_s", "reference_s", "training_s")}
        results.append(res)
        agreement(results, dtype)
        emit(res)
    return results


def lora_snapshot(model):
    return [p.detach().clone() for p in lora_params(model)]


def agreement(results, dtype):
    """Mark each measured result with its largest relative difference to the first measured one
    (warm-up losses, and the DPO/GRPO log-prob checks) and whether that is within bf16/fp32 tolerance."""
    done = [r for r in results if not r.skipped]
    if len(done) < 2:
        return
    ref, r = done[0], done[-1]
    a = ref.extra["warmup_losses"] + ref.extra["warmup_checks"]
    b = r.extra["warmup_losses"] + r.extra["warmup_checks"]
    diff = max(abs(x - y) / max(abs(x), 1e-6) for x, y in zip(a, b))
    r.extra.update(agrees_with=ref.provider, max_rel_diff=diff, agrees=diff <= TOLERANCE[dtype])
    ref.extra.setdefault("agrees", True)


# ---- command line: the GPU check runs this ----------------------------------------------------------


def _cases(spec):
    """'sft:4096,sft:8192,dpo,grpo' -> [(kind, shape)]"""
    out = []
    for item in spec.split(","):
        kind, _, arg = item.partition(":")
        if kind == "sft":
            out.append(("e2e_sft", {"seq": int(arg or 4096)}))
        elif kind == "dpo":
            out.append(("e2e_dpo", dict(DPO_SHAPE)))
        elif kind == "grpo":
            out.append(("e2e_grpo", dict(GRPO_SHAPE)))
        else:
            raise SystemExit(f"--cases: unknown case {item!r}; use sft:SEQ, dpo or grpo")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="JSON lines file; one line appended per result")
    ap.add_argument("--model", required=True, choices=sorted(CONFIGS))
    ap.add_argument("--cases", default="sft:4096", help="comma-separated: sft:SEQ, dpo, grpo (default sft:4096)")
    args = ap.parse_args(argv)
    dev = device()
    cases = _cases(args.cases)
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def emit(res):
        with open(args.out, "a") as f:
            f.write(json.dumps({"env": env_info(), **asdict(res)}) + "\n")
        what = f"skipped: {res.skipped}" if res.skipped else (
            f"{res.median_s * 1e3:,.0f} ms/step, {res.tokens_per_s:,.0f} tok/s, peak {res.peak_bytes / 2**30:.2f} GiB"
            + (f", agrees with {res.extra['agrees_with']}: {res.extra['agrees']} (max rel diff "
               f"{res.extra['max_rel_diff']:.2e})" if "agrees_with" in res.extra else ""))
        print(f"{res.kernel} {json.dumps(res.shape)} {res.provider}: {what}", flush=True)

    t0 = time.perf_counter()
    try:
        _check_memory(weight_bytes(args.model), dev)
        model = build_qlora(args.model, dev, compute_dtype(dev), seed=SEED)
    except (Unavailable, torch.cuda.OutOfMemoryError) as e:
        for kind, shape in cases:
            emit(Result(kind, {"model": args.model, **shape, "ckpt": True}, "bf16", "all", env_info()["device"],
                        skipped=f"model does not fit: {e}"))
        return 0
    print(f"built {args.model} (NF4 + LoRA r=16) in {time.perf_counter() - t0:.1f} s", flush=True)
    init = lora_snapshot(model)
    # liger patches the model for good: every other provider of every case first
    plan = [(k, s, [p for p in (SFT_PROVIDERS if k == "e2e_sft" else RL_PROVIDERS) if p != "liger"]) for k, s in cases]
    plan += [(k, s, ["liger"]) for k, s in cases if k == "e2e_sft"]
    done: dict = {}
    for kind, shape, providers in plan:
        key = (kind, json.dumps(shape))
        done[key] = run_case(kind, args.model, model, init, providers, shape, emit, done.get(key), strict=False)
    results = [r for rs in done.values() for r in rs]
    bad = [r for r in results if r.extra.get("agrees") is False
           or ((r.skipped or "").startswith("failed") and r.provider != "liger")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
