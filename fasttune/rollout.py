"""Rollouts: the weights generation runs on, and the engine that runs it.

- Weights (`grpo.rollout_weights`). "live" samples from the training model itself: for QLoRA every
  token goes through 4-bit matmuls plus the unmerged LoRA branch. "merged" samples from a dense twin:
  the same architecture in the compute dtype, whose adapted linear layers hold
      W = W_base + scale · B @ A,
  W_base being the frozen base: for QLoRA dequantized again from the 4 bits at each refresh (a few
  ms a layer; keeping a dense W_base beside W would double the twin's memory). Before each rollout the
  twin is refreshed, in place, and only where the adapter changed since the last refresh (the
  optimizer's in-place update bumps a tensor's version counter; so does loading a checkpoint): one
  dequantization (or copy) and one add-matmul per layer, never a reload. Everything else (embeddings, norms, the head,
  rotary buffers) is shared with the training model, not copied. "auto" takes "merged" when the
  twin's new memory (logged) fits in half of the free memory, leaving the rest to training, else "live".
- An out-of-memory while building, refreshing or sampling from the twin drops it, says so once, and
  samples the same batch from the live model: no step is lost.
- Where a twin cannot work the live model is used, with one line saying why: full fine-tuning (the
  model is already dense), FSDP2 (the weights are sharded; every rank must decode in step), LoRA
  variants the plain formula does not cover (DoRA, LoRA bias, fan-in-fan-out layers).
- Engines (`grpo.generation`): a small interface, `generate(model, ids, mask, sampling) -> completions`,
  with transformers as its one implementation, run three ways: "dynamic" (`generate` with a growing
  KV cache; a prompt that several rows repeat, as a GRPO group does, is run once and its KV cache
  copied to those rows: on SmolLM2, 4 rows of a 46-token prompt, the prefill goes from 0.28 to
  0.17 s of a 1.65 s rollout; the saving grows with the group and the prompt), "static" (a
  preallocated KV cache, so the forward is compiled on CUDA; prompts are left-padded to a multiple
  of 64 tokens so that shapes repeat), "continuous" (transformers' continuous batching,
  `generate_batch`, paged KV cache). A vLLM engine would be a second class with
  the same `generate`, plus a `load_weights(twin)` after each refresh (vLLM's `load_weights` takes
  the named tensors the twin holds); it is not written, because vLLM cannot be installed where we run.
"""

import copy
import gc
import math
from dataclasses import dataclass

import torch
from torch import nn

from . import lora_layers

WEIGHTS = ("auto", "merged", "live")
ENGINES = ("auto", "dynamic", "static", "continuous")
# "auto" engine by device and batch size, from measurements: the CPU's in `make bench`
# (bench/test_bench_rollout.py), CUDA's in bench/gpu_check.sh's rollout stage, which prints the line to put here.
LARGE_BATCH = 64  # sequences (prompts × generations) from which a batch counts as large
AUTO_ENGINE = {("cpu", "small"): "dynamic", ("cpu", "large"): "dynamic",
               ("cuda", "small"): "dynamic", ("cuda", "large"): "dynamic"}  # CUDA: not measured yet
STATIC_BUCKET = 64  # static cache: prompts left-padded to a multiple of this


class Unsupported(Exception):
    """A twin cannot be built for this model; the message says why."""


def is_oom(e: BaseException) -> bool:
    """A real allocation failure: CUDA's OutOfMemoryError, or the CPU allocator's RuntimeError."""
    if isinstance(e, torch.OutOfMemoryError):
        return True
    text = str(e)
    return isinstance(e, MemoryError) or (isinstance(e, RuntimeError) and (
        "can't allocate memory" in text or "not enough memory" in text))


def _causal_lm(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _lora_layers(lm):
    """{module name: PEFT LoRA layer} of `lm`."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return {}
    return {n: m for n, m in lm.named_modules() if isinstance(m, LoraLayer)}


def _is_4bit(weight) -> bool:
    return getattr(weight, "quant_state", None) is not None


def _dense(weight, dtype):
    """A linear layer's weight as a dense tensor in `dtype` (bitsandbytes NF4/FP4 dequantized)."""
    if _is_4bit(weight):
        import bitsandbytes.functional as bf

        return bf.dequantize_4bit(weight.data, weight.quant_state).to(dtype)
    return weight.data if weight.dtype == dtype else weight.data.to(dtype)


def _check_lora(name, layer):
    if not isinstance(layer.base_layer, nn.Linear) or getattr(layer, "fan_in_fan_out", False):
        raise Unsupported(f"{name}: LoRA on a {type(layer.base_layer).__name__}, not a plain linear layer")
    for a in layer.active_adapters:
        if layer.use_dora.get(a) or getattr(layer, "lora_bias", {}).get(a):
            raise Unsupported(f"{name}: DoRA or LoRA bias, which the merged copy does not compute")


def copy_bytes(model, dtype, *, refreshable=True) -> int:
    """New bytes a twin of `model` takes: each 4-bit layer dequantized, each adapted layer's merged
    weight, and (refreshable, 16-bit base in another dtype) the converted base kept beside it. Shared
    tensors cost nothing."""
    lm = _causal_lm(model)
    lora = _lora_layers(lm)
    inside = {f"{n}.base_layer" for n in lora}
    size = torch.empty((), dtype=dtype).element_size()
    n = 0
    for name, m in lm.named_modules():
        if name in lora:
            w = m.base_layer.weight
            numel = m.base_layer.out_features * m.base_layer.in_features
            n += numel * (2 if refreshable and not _is_4bit(w) and w.dtype != dtype else 1)
        elif name not in inside and isinstance(m, nn.Linear) and _is_4bit(m.weight):
            n += m.out_features * m.in_features
    return n * size


def free_bytes(dev) -> int:
    """Memory `dev` can still give: CUDA's free memory plus what torch's cache holds unused; on the
    CPU, the kernel's MemAvailable."""
    if dev.type == "cuda":
        free, _ = torch.cuda.mem_get_info(dev)
        return free + torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev)
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


class MergedCopy:
    """A dense twin of a (Q)LoRA model for generation, refreshed in place from the live adapter.

    `refreshable=False` (inference: the adapter never changes) merges once and keeps no base."""

    def __init__(self, model, dtype, *, refreshable=True):
        import transformers

        lm = _causal_lm(model)
        lora = _lora_layers(lm)
        for name, layer in lora.items():
            _check_lora(name, layer)
        cfg = copy.deepcopy(lm.config)
        state = getattr(lm, "_fasttune_state", None)  # fasttune.kernels.apply's: the model's own attention
        attn = state["attn"] if state else cfg._attn_implementation
        cfg._attn_implementation = "sdpa" if attn in (None, "fasttune") else attn
        with torch.device("meta"):
            twin = transformers.AutoModelForCausalLM.from_config(cfg, dtype=dtype)
        self.dtype, self.layers, self.bytes = dtype, [], 0
        for name, tmod in twin.named_modules():
            if not tmod._parameters and not tmod._buffers:
                continue
            try:
                live = lm.get_submodule(name)
            except AttributeError:
                raise Unsupported(f"the model has no {name} where a plain {type(twin).__name__} has one") from None
            if name in lora:
                self._adapted(tmod, live, refreshable)
                continue
            for attr, p in tmod._parameters.items():
                src = live._parameters.get(attr)
                if src is None and p is not None:
                    raise Unsupported(f"the model's {name} has no {attr} where a plain {type(twin).__name__} has one")
                if src is None:
                    continue
                t = _dense(src, dtype) if attr == "weight" and _is_4bit(src) else src.data
                if t.is_floating_point() and t.dtype != dtype:
                    t = t.to(dtype)
                self.bytes += t.nbytes if t.data_ptr() != src.data_ptr() else 0
                tmod._parameters[attr] = nn.Parameter(t, requires_grad=False)
            for attr in tmod._buffers:
                tmod._buffers[attr] = live._buffers.get(attr)
        left = [n for n, t in [*twin.named_parameters(), *twin.named_buffers()] if t.is_meta]
        if left:
            raise Unsupported(f"the model's {left[0]} has no counterpart in a plain {type(twin).__name__}")
        twin.generation_config = copy.deepcopy(lm.generation_config)
        self.model = twin.eval()
        self.refresh(force=True)

    def _adapted(self, tmod, live, refreshable):
        base = live.base_layer
        dense = _dense(base.weight, self.dtype)  # dequantized (a new tensor) or the live weight itself
        fresh = dense.data_ptr() != base.weight.data.data_ptr()
        if not refreshable:  # merged into the dequantized tensor itself, or into a copy of the live weight
            merged, kept = (dense if fresh else dense.clone()), None
        elif _is_4bit(base.weight):  # the 4-bit weight is kept, dequantized again at each refresh
            merged, kept = dense, base.weight
        else:  # the live 16-bit weight, or a copy of it in the twin's dtype
            merged, kept = torch.empty_like(dense), dense
            self.bytes += dense.nbytes if fresh else 0
        self.bytes += merged.nbytes
        tmod._parameters["weight"] = nn.Parameter(merged, requires_grad=False)
        if base.bias is not None:
            tmod._parameters["bias"] = nn.Parameter(base.bias.data, requires_grad=False)
        self.layers.append({"merged": merged, "base": kept, "lora": live, "seen": None})

    @staticmethod
    def _versions(layer):
        return tuple((layer.lora_A[a].weight._version, layer.lora_B[a].weight._version, layer.scaling[a])
                     for a in layer.active_adapters if a in layer.lora_A)

    @torch.no_grad()
    def refresh(self, force=False) -> int:
        """W = W_base + scale · B @ A, in place, for each layer whose adapter changed; how many changed."""
        n = 0
        for e in self.layers:
            lora, seen = e["lora"], self._versions(e["lora"])
            if seen == e["seen"] and not force:
                continue
            if e["base"] is None and e["seen"] is not None:
                raise RuntimeError("a copy merged once for inference cannot follow a changing adapter")
            W, base = e["merged"], e["base"]
            if base is not None and not (_is_4bit(base) and lora_layers.dequantize_into(base, W)):
                W.copy_(_dense(base, W.dtype) if _is_4bit(base) else base)  # a CPU 4-bit base: written in place
            if not lora.disable_adapters:
                for a in lora.active_adapters:
                    if a in lora.lora_A:
                        B, A = lora.lora_B[a].weight, lora.lora_A[a].weight
                        W.addmm_(B.to(W.device, W.dtype), A.to(W.device, W.dtype), alpha=lora.scaling[a])
            e["seen"] = seen
            n += 1
        return n


# ---- engines ------------------------------------------------------------------------------------


@dataclass
class Sampling:
    max_new_tokens: int
    temperature: float
    top_p: float
    stops: list
    pad_id: int
    min_new_tokens: int = 0
    synced_gpus: bool = False
    top_k: int | None = 0  # 0: off, as TRL samples (the loss assumes the whole softmax); None: the model's own

    def kwargs(self):
        s = {"do_sample": False} if self.temperature <= 0 else {
            "do_sample": True, "temperature": self.temperature, "top_p": self.top_p,
            **({} if self.top_k is None else {"top_k": self.top_k})}
        return {**s, "max_new_tokens": self.max_new_tokens, "min_new_tokens": self.min_new_tokens,
                "eos_token_id": self.stops, "pad_token_id": self.pad_id}


def _pad_rows(rows, pad_id) -> torch.Tensor:
    C = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), C), pad_id, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
    return out


class TransformersEngine:
    """transformers' own generation: `how` is "dynamic", "static" or "continuous"."""

    def __init__(self, how="dynamic", share_prompts=True):
        if how not in ENGINES[1:]:
            raise ValueError(f"unknown generation engine {how!r}; one of {', '.join(ENGINES[1:])}")
        self.how, self.share_prompts = how, share_prompts

    def generate(self, model, ids, mask, s: Sampling) -> torch.Tensor:
        """Completions [N, C] (on the host, padded with pad_id after the stop token) of the left-padded
        prompt rows `ids` / `mask` [N, P] (on the model's device)."""
        if self.how == "continuous":
            return self._continuous(model, ids, mask, s)
        cache = {}
        if self.how == "dynamic" and self.share_prompts and not s.synced_gpus:
            shared = shared_prompt_cache(model, ids, mask)
            cache = {} if shared is None else {"past_key_values": shared}
        if self.how == "static":  # a fixed cache length per bucket, so the compiled graph is reused
            P = ids.shape[1]
            extra = -P % STATIC_BUCKET
            ids = torch.nn.functional.pad(ids, (extra, 0), value=s.pad_id)
            mask = torch.nn.functional.pad(mask, (extra, 0), value=0)
            cache = {"cache_implementation": "static"}
        out = model.generate(input_ids=ids, attention_mask=mask, synced_gpus=s.synced_gpus, **cache, **s.kwargs())
        return out[:, ids.shape[1]:].cpu()

    def _continuous(self, model, ids, mask, s):
        import transformers
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        rows = [r[m.bool()].tolist() for r, m in zip(ids.cpu(), mask.cpu())]
        kw = s.kwargs()
        gen = transformers.GenerationConfig(**{k: v for k, v in kw.items() if k != "min_new_tokens"})
        page = 256
        blocks = sum(math.ceil((len(r) + s.max_new_tokens) / page) for r in rows) + 1
        cb = ContinuousBatchingConfig(page_size=page, num_blocks=blocks, max_batch_tokens=max(2048, max(map(len, rows))),
                                      seed=int(torch.randint(0, 2**31 - 1, ())), auto_switch_to_flash=False)
        out = model.generate_batch(rows, generation_config=gen, continuous_batching_config=cb,
                                   max_new_tokens=s.max_new_tokens, warmup=False)
        done = list(out.values())
        if len(done) != len(rows) or any(r.error for r in done):
            raise RuntimeError(f"continuous batching returned {len(done)} of {len(rows)} completions"
                               + next((f": {r.error}" for r in done if r.error), ""))
        return _pad_rows([r.generated_tokens for r in done], s.pad_id)


def shared_prompt_cache(model, ids, mask):
    """The KV cache of each row's prompt but its last token, each distinct prompt run once and its cache
    copied to the rows that repeat it (`generate` then runs only the last prompt token and the
    completion); None when no prompt repeats or the prompts are a single token. Positions are those
    `generate` gives left-padded rows (the mask's running count), so the cache is the one it would make,
    up to float rounding (a batch of other size)."""
    import inspect

    from transformers import DynamicCache

    if ids.shape[1] < 2:
        return None
    uniq, inverse = torch.unique(torch.cat([ids, mask.to(ids.dtype)], 1), dim=0, return_inverse=True)
    if len(uniq) == len(ids):
        return None
    rows = torch.arange(len(ids), device=ids.device)
    first = torch.full((len(uniq),), len(ids), device=ids.device).scatter_reduce(0, inverse, rows, "amin")
    u_ids, u_mask = ids[first, :-1], mask[first, :-1]
    pos = (u_mask.long().cumsum(-1) - 1).masked_fill(u_mask == 0, 1)
    lm = _causal_lm(model)
    cache = DynamicCache(config=lm.config)
    head = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(lm.forward).parameters else {}
    model(input_ids=u_ids, attention_mask=u_mask, position_ids=pos, past_key_values=cache, use_cache=True, **head)
    cache.batch_select_indices(inverse)
    return cache


def auto_engine(dev, rows: int) -> str:
    return AUTO_ENGINE[(dev.type if dev.type in ("cpu", "cuda") else "cuda", "large" if rows >= LARGE_BATCH else "small")]


# ---- the policy a task samples from ------------------------------------------------------------------


class Rollouts:
    """What a task samples with: the weights (merged twin or live model) and the engine.

    `generate(model, ids, mask, sampling)` refreshes the twin if the adapter moved, samples, and on an
    out-of-memory with the twin falls back to the live model for good (one line to `log`)."""

    def __init__(self, model, dtype, dev, *, weights="auto", engine="auto", log=print, sharded=False,
                 refreshable=True):
        self.dtype, self.dev, self.log, self.refreshable = dtype, dev, log, refreshable
        self.engine_name, self.twin, self.refreshes = engine, None, 0
        self.weights = self._choose(model, weights, sharded)

    def _choose(self, model, weights, sharded) -> str:
        why = None
        if sharded:
            why = "the weights are sharded (FSDP2) and every rank decodes in step"
        elif not _lora_layers(_causal_lm(model)):
            why = "no LoRA adapter: the model is already what generation needs"
        else:
            try:
                for name, layer in _lora_layers(_causal_lm(model)).items():
                    _check_lora(name, layer)
            except Unsupported as e:
                why = str(e)
        if why:
            if weights == "merged":
                self.log(f"rollouts: live weights, not merged: {why}")
            return "live"
        if weights == "live":
            return "live"
        need, free = copy_bytes(model, self.dtype, refreshable=self.refreshable), free_bytes(self.dev)
        fits = need <= free / 2
        self.log(f"rollouts: a merged {str(self.dtype).replace('torch.', '')} copy needs {need / 2**20:,.0f} MiB; "
                 f"{free / 2**20:,.0f} MiB free on {self.dev.type}"
                 + ("" if weights == "merged" else f": {'merged' if fits else 'live (it takes more than half)'}"))
        return "merged" if weights == "merged" or fits else "live"

    def engine(self, rows: int):
        how = auto_engine(self.dev, rows) if self.engine_name == "auto" else self.engine_name
        return TransformersEngine(how)

    def policy(self, model):
        """The module generation runs on: the twin (built or refreshed now) or `model`."""
        if self.weights != "merged":
            return model
        if self.twin is None:
            self.twin = MergedCopy(model, self.dtype, refreshable=self.refreshable)
        elif self.refreshable:
            self.refreshes += bool(self.twin.refresh())
        return self.twin.model

    def drop(self, why, oom=True):
        """Give up the twin for good: free it and sample from the live model from now on."""
        self.twin, self.weights = None, "live"
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if oom:
            self.log(f"warning: rollouts: out of memory with the merged copy ({why}); sampling from the live "
                     "model from now on (slower, same results)")
        else:
            self.log(f"rollouts: live weights, not merged: {why}")

    def policy_or_live(self, model):
        """policy(model), or `model` where the twin cannot be built (out of memory, unsupported)."""
        return self.generate(model, None, None, None, run=lambda m, *_: m)

    @torch.no_grad()
    def generate(self, model, ids, mask, s: Sampling, run=None) -> torch.Tensor:
        run = run or self.engine(len(ids)).generate
        if self.weights == "merged":
            oom = True
            try:
                return run(self.policy(model), ids, mask, s)
            except Unsupported as e:
                why, oom = str(e), False
            except Exception as e:  # noqa: BLE001 - only an out-of-memory is handled, the rest raised
                if not is_oom(e):
                    raise
                why = str(e).strip().splitlines()[0][:300]
            self.drop(why, oom)  # out of the except block: its traceback no longer holds the twin's tensors
        return run(model, ids, mask, s)


def for_inference(model, weights="auto", log=None) -> Rollouts:
    """Rollouts for `fasttune generate` and `chat`: the adapter never changes, so a merged copy keeps
    no base beside it (its memory is that of the dense model's adapted layers)."""
    import sys

    dev = next(p.device for p in model.parameters() if not p.is_meta)
    dtype = _causal_lm(model).get_input_embeddings().weight.dtype
    log = log or (lambda msg: print(f"fasttune: {msg}", file=sys.stderr, flush=True))
    return Rollouts(model, dtype, dev, weights=weights, engine="dynamic", log=log, refreshable=False)
