"""What each benchmark runs: `make_case(kernel, provider, shape, dtype)` returns a callable that
does one forward + backward on inputs it built, and waits for the device.

Providers:
  fasttune       fasttune.kernels
  naive          the plain PyTorch a user would write (full logits, upcast to fp32 as HF models do)
  torch_chunked  torch's own F.linear_cross_entropy with LinearCrossEntropyOptions()
  torch_compile  torch.compile of the naive function
  liger          Liger-Kernel's fused linear cross-entropy (CUDA only)
  cce            cut-cross-entropy (CUDA only)
  matmul_floor   only the three matmuls of the head (logits, dh, dW): the time floor, not a loss
"""

import torch
import torch.nn.functional as F

from common import DTYPES, Unavailable, cuda_only, device, sync


def _flce_inputs(shape, dtype):
    g = torch.Generator().manual_seed(0)
    N, H, V = shape["N"], shape["H"], shape["V"]
    h = torch.randn(N, H, generator=g).to(device=device(), dtype=dtype).requires_grad_()
    w = (torch.randn(V, H, generator=g) / H**0.5).to(device=device(), dtype=dtype).requires_grad_()
    y = torch.randint(0, V, (N,), generator=g).to(device())
    return h, w, y


def _flce_loss(provider):
    """The loss function of one provider: (h, w, y) -> scalar."""
    if provider == "fasttune":
        from fasttune.kernels import fused_linear_cross_entropy

        return fused_linear_cross_entropy
    if provider == "naive":
        return lambda h, w, y: F.cross_entropy(F.linear(h, w).float(), y)
    if provider == "torch_chunked":
        if not hasattr(F, "linear_cross_entropy") or not hasattr(torch.nn, "LinearCrossEntropyOptions"):
            raise Unavailable(f"torch {torch.__version__} has no F.linear_cross_entropy with options")
        opts = torch.nn.LinearCrossEntropyOptions()
        return lambda h, w, y: F.linear_cross_entropy(h, w, y, options=opts)
    if provider == "torch_compile":
        return torch.compile(lambda h, w, y: F.cross_entropy(F.linear(h, w).float(), y))
    if provider == "liger":
        cuda_only("Liger-Kernel")
        try:
            from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
        except ImportError as e:
            raise Unavailable(f"liger-kernel not installed ({e})") from None
        return lambda h, w, y: liger_fused_linear_cross_entropy(h, w, y)
    if provider == "cce":
        cuda_only("cut-cross-entropy")
        try:
            from cut_cross_entropy import linear_cross_entropy
        except ImportError as e:
            raise Unavailable(f"cut-cross-entropy not installed ({e})") from None
        return lambda h, w, y: linear_cross_entropy(h, w, y)
    raise Unavailable(f"no provider {provider!r} for fused_linear_cross_entropy")


def _flce_case(provider, shape, dtype):
    h, w, y = _flce_inputs(shape, DTYPES[dtype])
    if provider == "matmul_floor":
        cuda_only("the matmul floor")  # on the CPU the naive path is the floor's fair stand-in
        g = torch.randn(h.shape[0], w.shape[0], device=h.device, dtype=h.dtype)

        def run():
            with torch.no_grad():
                torch.mm(h, w.t())
                torch.mm(g, w)
                torch.mm(g.t(), h)
            sync()

        return run
    loss_fn = _flce_loss(provider)

    def run():
        loss = loss_fn(h, w, y)
        loss.backward()
        h.grad = w.grad = None
        sync()

    return run


# ---- DPO and GRPO: the policy's log-probs through a frozen head (LoRA), hidden states trained ----


def _head_inputs(B, T, shape, dtype, g):
    H, V = shape["H"], shape["V"]
    h = torch.randn(B, T, H, generator=g).to(device=device(), dtype=dtype).requires_grad_()
    w = (torch.randn(V, H, generator=g) / H**0.5).to(device=device(), dtype=dtype)  # frozen, as with LoRA
    return h, w


def _naive_logps(h, w, labels, temperature=1.0):
    """What TRL does: full logits in fp32, log_softmax, gather."""
    logits = (h @ w.t()).float() / temperature
    logp = torch.log_softmax(logits, -1)
    return logp.gather(-1, labels.clamp_min(0).unsqueeze(-1)).squeeze(-1) * (labels != -100)


def _dpo_case(provider, shape, dtype):
    """B pairs of T tokens, the first half of each sequence prompt; reference log-probs given."""
    g = torch.Generator().manual_seed(0)
    B, T, V = shape["B"], shape["T"], shape["V"]
    h, w = _head_inputs(2 * B, T, shape, DTYPES[dtype], g)
    labels = torch.randint(0, V, (2 * B, T), generator=g)
    labels[:, : T // 2] = -100
    ref = (torch.randn(2 * B, generator=g) - 2 * T).to(device())
    if provider == "fasttune":
        from fasttune.kernels import dpo_loss

        def loss_fn():
            return dpo_loss(h, w, labels, ref_logps=ref, beta=0.1)[0]  # labels stay on the host
    elif provider == "naive":
        labels_d = labels.to(device())

        def loss_fn():
            seq = _naive_logps(h, w, labels_d).sum(-1)
            r = seq - ref
            return -F.logsigmoid(0.1 * ((r[:B]) - r[B:])).mean()
    elif provider == "liger":
        cuda_only("Liger-Kernel")
        try:
            from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss
        except ImportError as e:
            raise Unavailable(f"liger-kernel not installed ({e})") from None
        liger = LigerFusedLinearDPOLoss(beta=0.1, use_ref_model=False)  # reference-free: same work
        labels_d = labels.to(device())

        def loss_fn():
            out = liger(w, h.reshape(-1, h.shape[-1]).view(2 * B, T, -1), labels_d)
            return out[0] if isinstance(out, tuple) else out
    else:
        raise Unavailable(f"no provider {provider!r} for dpo_loss")
    return _loss_runner(loss_fn, h)


def _kto_case(provider, shape, dtype):
    """B unpaired completions of T tokens (the first half prompt), half desirable; reference
    log-probs and the KL reference point given (TRL computes them under no_grad as well)."""
    g = torch.Generator().manual_seed(0)
    B, T, V = shape["B"], shape["T"], shape["V"]
    h, w = _head_inputs(B, T, shape, DTYPES[dtype], g)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[:, : T // 2] = -100
    desirable = torch.arange(B) % 2 == 0
    ref = (torch.randn(B, generator=g) - T).to(device())
    kl = torch.tensor(0.5, device=device())
    if provider == "fasttune":
        from fasttune.kernels import kto_loss

        def loss_fn():
            return kto_loss(h, w, labels, desirable, ref_logps=ref, kl=kl, beta=0.1)[0]
    elif provider == "naive":
        labels_d, d = labels.to(device()), desirable.to(device())

        def loss_fn():  # TRL's KTOTrainer on full logits
            r = _naive_logps(h, w, labels_d).sum(-1) - ref
            return torch.where(d, 1 - torch.sigmoid(0.1 * (r - kl)), 1 - torch.sigmoid(0.1 * (kl - r))).mean()
    elif provider == "liger":
        cuda_only("Liger-Kernel")
        try:
            from liger_kernel.chunked_loss import LigerFusedLinearKTOLoss
        except ImportError as e:
            raise Unavailable(f"liger-kernel not installed ({e})") from None
        liger = LigerFusedLinearKTOLoss(beta=0.1, use_ref_model=False)  # reference-free: same head work
        labels_d, d = labels.to(device()), desirable.to(device())

        import inspect

        params = list(inspect.signature(liger.forward).parameters)  # the argument order changed across versions
        first = (h, w) if params[0] == "_input" else (w, h)
        extra = {"kl": kl} if "kl" in params else {}

        def loss_fn():
            out = liger(*first, labels_d, preference_labels=d, **extra)
            return out[0] if isinstance(out, tuple) else out
    else:
        raise Unavailable(f"no provider {provider!r} for kto_loss")
    return _loss_runner(loss_fn, h)


def _grpo_case(provider, shape, dtype):
    """G completions of T tokens, old and reference log-probs given, beta = 0.04, dapo."""
    g = torch.Generator().manual_seed(0)
    G, T, V = shape["G"], shape["T"], shape["V"]
    h, w = _head_inputs(G, T, shape, DTYPES[dtype], g)
    ids = torch.randint(0, V, (G, T), generator=g)
    mask = torch.ones(G, T, dtype=torch.bool)
    mask[G // 2 :, T * 3 // 4 :] = False  # some completions end early
    adv = torch.randn(G, generator=g).to(device())
    old = (torch.randn(G, T, generator=g) * 0.05 - 10.0).to(device())
    ref = (torch.randn(G, T, generator=g) * 0.05 - 10.0).to(device())
    if provider == "fasttune":
        from fasttune.kernels import grpo_loss

        def loss_fn():
            return grpo_loss(h, w, ids, mask, adv, old_logps=old, ref_logps=ref, beta=0.04)[0]
    elif provider == "naive":
        ids_d, m = ids.to(device()), mask.to(device())

        def loss_fn():
            logp = _naive_logps(h, w, torch.where(m, ids_d, -100))
            ratio = torch.exp(logp - old)
            a = adv.unsqueeze(1)
            per_tok = -torch.min(ratio * a, torch.clamp(ratio, 0.8, 1.2) * a)
            d = ref - logp
            per_tok = per_tok + 0.04 * (torch.exp(d) - d - 1)
            return (per_tok * m).sum() / m.sum()
    elif provider == "liger":
        cuda_only("Liger-Kernel")
        try:
            from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
        except ImportError as e:
            raise Unavailable(f"liger-kernel not installed ({e})") from None
        liger = LigerFusedLinearGRPOLoss(beta=0.04)
        ids_d, m = ids.to(device()), mask.to(device()).long()

        def loss_fn():
            out = liger(h, w, ids_d, m, adv, ref_per_token_logps=ref, old_per_token_logps=old)
            return out[0] if isinstance(out, tuple) else out
    else:
        raise Unavailable(f"no provider {provider!r} for grpo_loss")
    return _loss_runner(loss_fn, h)


def _loss_runner(loss_fn, h):
    def run():
        loss_fn().backward()
        h.grad = None
        sync()

    return run


# ---- varlen attention ------------------------------------------------------------------------


def sample_lengths(mix, total, g):
    """Sample lengths filling `total` tokens: fixed 1024, uniform in [64, 4096], or SFT-like
    (log-normal, median 300, capped at 4096). The last sample is cut to fit."""
    lens = []
    while sum(lens) < total:
        if mix == "fixed":
            L = 1024
        elif mix == "uniform":
            L = int(torch.randint(64, 4097, (1,), generator=g))
        else:
            L = min(4096, max(1, int(torch.exp(torch.randn(1, generator=g) * 0.9 + 5.7))))  # e^5.7 ≈ 300
        lens.append(min(L, total - sum(lens)))
    return lens


def attention_flops(lens, Hq, D):
    """Causal forward 4·L²·Hq·D/2 per sample, backward 2.5 × that."""
    return sum(3.5 * 4 * L * L * Hq * D / 2 for L in lens)


def _attention_case(provider, shape, dtype):
    g = torch.Generator().manual_seed(0)
    T, Hq, Hkv, D = shape["T"], shape["Hq"], shape["Hkv"], shape["D"]
    lens = sample_lengths(shape["mix"], T, g)
    dt = DTYPES[dtype]
    q, k, v = (torch.randn(T, h, D, generator=g).to(device=device(), dtype=dt).requires_grad_() for h in (Hq, Hkv, Hkv))
    cu_list = [0]
    for L in lens:
        cu_list.append(cu_list[-1] + L)
    cu = torch.tensor(cu_list, dtype=torch.int32, device=device())
    if provider == "fasttune":
        from fasttune.kernels import varlen_attention

        def fwd():
            return varlen_attention(q, k, v, cu, max(lens))
    elif provider == "per_sample":  # the plain loop: one SDPA call per sample
        group = Hq // Hkv

        def fwd():
            outs = []
            for s, e in zip(cu_list[:-1], cu_list[1:]):
                qi, ki, vi = (x[s:e].transpose(0, 1) for x in (q, k, v))
                ki, vi = ki.repeat_interleave(group, 0), vi.repeat_interleave(group, 0)
                outs.append(F.scaled_dot_product_attention(qi, ki, vi, is_causal=True).transpose(0, 1))
            return torch.cat(outs)
    elif provider == "sdpa_padded":  # pad every sample to the longest, mask padding and the future
        B, Lmax = len(lens), max(lens)
        pos = torch.arange(Lmax, device=device())
        valid = pos[None, :] < torch.tensor(lens, device=device())[:, None]
        mask = (pos[None, :, None] >= pos[None, None, :]) & valid[:, None, :]  # [B, Lmax, Lmax]
        idx = torch.cat([torch.arange(s, s + L) for s, L in zip(cu_list, lens)]).to(device())
        where = valid.reshape(-1).nonzero().squeeze(1)

        def fwd():
            def pad(x):
                out = x.new_zeros(B * Lmax, x.shape[1], D)
                out[where] = x[idx]
                return out.view(B, Lmax, x.shape[1], D).transpose(1, 2)
            o = F.scaled_dot_product_attention(pad(q), pad(k), pad(v), attn_mask=mask[:, None], enable_gqa=True)
            return o.transpose(1, 2).reshape(B * Lmax, Hq, D)[where]
    elif provider == "varlen_attn":
        cuda_only("torch.nn.attention.varlen.varlen_attn")
        from torch.nn.attention.varlen import varlen_attn

        def fwd():
            return varlen_attn(q, k, v, cu, cu, max(lens), max(lens), window_size=(-1, 0), enable_gqa=True)
    elif provider == "flex":
        cuda_only("FlexAttention (compiled)")
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        doc = torch.repeat_interleave(torch.arange(len(lens), device=device()), torch.tensor(lens, device=device()))

        def document_causal(b, h, qi, ki):
            return (doc[qi] == doc[ki]) & (qi >= ki)

        block_mask = create_block_mask(document_causal, 1, 1, T, T, device=device())
        flex = torch.compile(flex_attention)

        def fwd():
            o = flex(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                     block_mask=block_mask, enable_gqa=True)
            return o[0].transpose(0, 1)
    else:
        raise Unavailable(f"no provider {provider!r} for varlen_attention")
    do = torch.randn(T, Hq, D, generator=g).to(device=device(), dtype=dt)

    def run():
        torch.autograd.backward(fwd(), do)
        q.grad = k.grad = v.grad = None
        sync()

    return run


# ---- the trainer: `make demo`'s run -------------------------------------------------------------

LAST_RUN = {}


def _example_run(command, example, data, steps, *sets, nproc=0):
    """A callable running `fasttune COMMAND examples/EXAMPLE` for `steps` steps in a fresh process and
    folder; LAST_RUN["rows"] gets its metrics.jsonl, whose own numbers (tokens/s, peak memory, the
    step's split) the benchmarks report."""
    import json
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]

    def run():
        out = Path(tempfile.mkdtemp(prefix=f"fasttune-bench-{command}-"))
        overrides = [f'run.output_dir="{out}"', f"train.max_steps={steps}", f'data.train="{root}/examples/data/{data}"',
                     f"run.save_every={steps}", *sets]
        cmd = [sys.executable, "-m", "fasttune.cli", command, str(root / "examples" / example)]
        cmd += ["--nproc", str(nproc)] if nproc else []
        for o in overrides:
            cmd += ["--set", o]
        subprocess.run(cmd, check=True, capture_output=True)
        LAST_RUN["rows"] = [json.loads(line) for line in open(out / "metrics.jsonl")]

    return run


def _sft_demo_case(provider, shape, dtype):
    """`fasttune sft examples/sft.toml` (make demo's run) for `steps` steps."""
    if provider != "fasttune":
        raise Unavailable(f"no provider {provider!r} for the SFT demo (the HF + PEFT comparison is bench/e2e.py)")
    return _example_run("sft", "sft.toml", "sft_alpaca.jsonl", shape["steps"], 'data.eval=""')


def _sft_ranks_case(provider, shape, dtype):
    """The SFT demo under torchrun on `ranks` CPU processes (gloo), with the same global batch of 2
    rows: a smoke figure for the launcher and DDP, not a speed claim (the ranks share 2 cores)."""
    if provider != "fasttune":
        raise Unavailable(f"no provider {provider!r} for the torchrun smoke run")
    r = shape["ranks"]
    if torch.cuda.is_available() and r > torch.cuda.device_count():
        raise Unavailable(f"{r} ranks need {r} GPUs; this machine has {torch.cuda.device_count()}")
    return _example_run("sft", "sft.toml", "sft_alpaca.jsonl", shape["steps"], 'data.eval=""',
                        f"train.grad_accum={2 // r}", nproc=r)


def _dpo_step_case(provider, shape, dtype):
    """One DPO forward + backward of examples/dpo.toml's micro-batch (8 pairs) on the built-in tiny
    Llama with LoRA: fasttune's task, or the plain way (full logits for policy and reference)."""
    import json as _json
    from pathlib import Path

    import torch.nn.functional as F

    from fasttune.config import DPOConfig, load_config
    from fasttune.dpo import DPOTask
    from fasttune.models import load_model, load_tokenizer

    if provider not in ("fasttune", "naive"):
        raise Unavailable(f"no provider {provider!r} for the DPO step")
    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "examples/dpo.toml", [f"data.train={_json.dumps(str(root / 'examples/data/dpo_pairs.jsonl'))}",
                                                   'data.eval=""', f"model.load_in_4bit={str(shape['4bit']).lower()}"],
                      schema=DPOConfig)
    tok = load_tokenizer(cfg.model)
    task = DPOTask(cfg, tok, lambda *_: None)
    model = load_model(cfg, device())
    batch = task.batch(task.pairs, list(range(shape["pairs"])))
    B, dev = shape["pairs"], device()
    LAST_RUN["dpo_tokens"] = batch.tokens

    if provider == "fasttune":
        def step():
            task.loss(model, batch, B, dev)[0].backward()
    else:
        y = batch.shift_labels.to(dev)
        mask = y != -100

        def seq_logps():
            logits = model(input_ids=batch.input_ids.to(dev), attention_mask=batch.attention_mask.to(dev)).logits.float()
            return (logits.log_softmax(-1).gather(-1, y.clamp_min(0)[..., None])[..., 0] * mask).sum(-1)

        def step():
            with torch.no_grad(), model.disable_adapter():
                ref = seq_logps()
            pi = seq_logps()
            lg = (pi[:B] - ref[:B]) - (pi[B:] - ref[B:])
            (-F.logsigmoid(0.1 * lg).mean()).backward()

    def run():
        step()
        model.zero_grad(set_to_none=True)
        sync()

    return run


def _grpo_demo_case(provider, shape, dtype):
    """`fasttune grpo examples/grpo.toml` for `steps` steps."""
    if provider != "fasttune":
        raise Unavailable(f"no provider {provider!r} for the GRPO example")
    return _example_run("grpo", "grpo.toml", "grpo_arithmetic.jsonl", shape["steps"])


def _alloc_case(provider, shape, dtype):
    """The harness's own check: allocate and touch exactly `mib` MiB, then free it."""
    nbytes = shape["mib"] * 2**20

    def run():
        buf = torch.ones(nbytes, dtype=torch.uint8, device=device())
        sync()
        del buf

    return run


CASES = {"alloc": _alloc_case, "fused_linear_cross_entropy": _flce_case, "dpo_loss": _dpo_case, "grpo_loss": _grpo_case, "kto_loss": _kto_case,
         "varlen_attention": _attention_case, "sft_demo": _sft_demo_case, "sft_ranks": _sft_ranks_case, "dpo_step": _dpo_step_case,
         "grpo_demo": _grpo_demo_case}
PEERS = {"torch_chunked", "torch_compile", "liger", "cce", "varlen_attn", "flex"}


def make_case(kernel, provider, shape, dtype):
    if kernel not in CASES:
        raise KeyError(f"unknown benchmark kernel {kernel!r}; known: {sorted(CASES)}")
    return CASES[kernel](provider, shape, dtype)
