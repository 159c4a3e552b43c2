"""Using a trained model: load a run, a checkpoint or a model folder, and generate from it.

- `load(target, base=False)`: a run folder (its last checkpoint), a checkpoint folder, a merged
  folder (`fasttune merge`) or any model folder or hub id. A run's model is loaded as it was trained:
  its base (4-bit for QLoRA) with the checkpoint's adapter; `base=True` gives the base alone.
- `generate(...)`: batched sampling (left-padded, KV cache) of `num_samples` completions per prompt,
  each prompt rendered with the chat template and its generation prompt, as in training. An adapter
  run samples from a merged dense copy (fasttune/rollout.py) when it fits, as GRPO's rollouts do.
- `chat(...)`: a multi-turn conversation on the terminal, tokens streamed as they come.

A run or checkpoint folder is found by `checkpoint.run_of`; prompt files are read by fasttune/prompts.py.
"""

import json
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from . import builtin, checkpoint
from .config import ConfigError
from .masks import stop_token_ids
from .prompts import left_pad, prompt_ids


@dataclass
class Loaded:
    model: object
    tok: object
    what: str  # one line: what was loaded
    cfg: object = None  # the run's config, when it came from a run


def check_adapter(cfg, ck):
    """A LoRA checkpoint must have been trained on `cfg.model.path`: one clear line if not."""
    ac = Path(ck) / "adapter_config.json"
    if not ac.is_file():
        raise ConfigError(f"{ck}: no adapter in it (no adapter_config.json); it holds a full fine-tune or nothing")
    trained_on = json.loads(ac.read_text()).get("base_model_name_or_path")
    here = builtin.resolve(cfg.model.path)
    if trained_on and Path(str(trained_on)).resolve() != Path(str(here)).resolve() and trained_on != cfg.model.path:
        raise ConfigError(f"{ck}: its adapter was trained on {trained_on}, not on model.path = {cfg.model.path!r} "
                          f"({here}); evaluate it with that run's config, or set model.path to its base")


def model_for(cfg, ck, dev, *, base=False):
    """The model of `cfg` for inference: the base (4-bit as trained) with the checkpoint `ck` (an adapter,
    or a full fine-tune's weights), or the base alone."""
    from .models import load_model

    lora = ck is not None and not base and cfg.model.finetune == "lora"
    if ck is not None and not base and cfg.model.finetune == "full":
        cfg = replace(cfg, model=replace(cfg.model, path=str(ck)))
    elif lora:
        check_adapter(cfg, ck)
        cfg = replace(cfg, model=replace(cfg.model, adapter=str(ck)))
    cfg = replace(cfg, train=replace(cfg.train, gradient_checkpointing=False))
    try:
        model = load_model(cfg, dev, trainable=False, lora=lora, quiet=True)
    except RuntimeError as e:  # shapes that do not fit: an adapter from another architecture
        raise ConfigError(f"{ck}: cannot be loaded onto {cfg.model.path}: {str(e).splitlines()[0][:300]}") from None
    return model.eval()


def load(target: str, dev, *, base=False) -> Loaded:
    from .config import SFTConfig
    from .models import load_tokenizer

    cfg, ck = checkpoint.run_of(target)
    if cfg is not None:
        quant = ", 4-bit" if cfg.model.finetune == "lora" and cfg.model.load_in_4bit else ""
        what = (f"{cfg.model.path}{quant}, base only (--base)" if base else
                f"{cfg.model.path}{quant} + {'adapter' if cfg.model.finetune == 'lora' else 'weights'} {ck}")
        return Loaded(model_for(cfg, ck, dev, base=base), load_tokenizer(cfg.model), what, cfg)
    path = Path(target)
    if not (target.startswith("builtin:") or target.lower().endswith(".gguf") or (path / "config.json").is_file()
            or ("/" in target and not path.exists())):
        raise ConfigError(f"{target}: not a fasttune run, checkpoint or model folder (no config.toml with "
                          "checkpoints/, no trainer_state.pt, no config.json)")
    if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        raise ConfigError(f"{target}: a bare adapter folder; name the run folder it came from, or merge it first")
    cfg = SFTConfig()
    cfg = replace(cfg, model=replace(cfg.model, path=target, finetune="full", load_in_4bit=False))
    from .models import load_model

    model = load_model(cfg, dev, trainable=False, lora=False, quiet=True).eval()
    return Loaded(model, load_tokenizer(cfg.model), f"{target} (a plain model{', --base has no effect' if base else ''})", cfg)


# ---- generation -----------------------------------------------------------------------------------

def _sampling(temperature, top_p):
    if temperature <= 0:
        return {"do_sample": False}
    return {"do_sample": True, "temperature": temperature, "top_p": top_p}


@torch.no_grad()
def generate(model, tok, prompts, *, max_new_tokens=256, temperature=0.7, top_p=1.0, num_samples=1, batch_size=16,
             dev=None, weights="auto") -> list[list[str]]:
    """Completions [prompt][sample] for `prompts` (lists of messages), batched with left padding;
    `weights`: "auto", "merged" or "live", as grpo.rollout_weights."""
    from .rollout import Sampling, for_inference

    dev = dev or next(model.parameters()).device
    stops = stop_token_ids(tok, model)
    rollouts = for_inference(model, weights)
    sampling = Sampling(max_new_tokens, temperature, top_p, stops, tok.pad_token_id, top_k=None)
    ids = [prompt_ids(tok, m) for m in prompts]
    jobs = [(i, k) for i in range(len(ids)) for k in range(num_samples)]
    out = [[None] * num_samples for _ in ids]
    for s in range(0, len(jobs), batch_size):
        chunk = jobs[s : s + batch_size]
        x, mask = left_pad([ids[i] for i, _ in chunk], tok.pad_token_id)
        y = rollouts.generate(model, x.to(dev), mask.to(dev), sampling)
        for r, (i, k) in enumerate(chunk):
            comp = y[r].tolist()
            end = next((j for j, t in enumerate(comp) if t in stops), len(comp))
            comp = comp[:end]
            out[i][k] = tok.decode(comp, skip_special_tokens=True)
    return out


def chat(model, tok, *, inp=sys.stdin, out=sys.stdout, max_new_tokens=512, temperature=0.7, top_p=1.0, weights="auto"):
    """A conversation: each line of `inp` is a user turn, the reply is streamed to `out`. Commands:
    /reset, /system TEXT, /exit. On a terminal, prompts are shown; piped, only the replies. When the
    conversation and a reply would outgrow the model's context, the oldest exchanges are dropped.
    An adapter run talks through a merged dense copy when it fits (`weights`, as in `generate`)."""
    from threading import Thread

    from transformers import TextIteratorStreamer

    from .rollout import for_inference

    model = for_inference(model, weights).policy_or_live(model)

    interactive = inp.isatty()
    stops = stop_token_ids(tok, model)
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    system, history = None, []
    if interactive:
        print("fasttune chat: /reset starts over, /system TEXT sets the system prompt, /exit ends", file=out)
    while True:
        if interactive:
            print("\n> ", end="", file=out, flush=True)
        line = inp.readline()
        if not line:
            return
        line = line.rstrip("\n")
        if not line.strip():
            continue
        if line.strip() == "/exit":
            return
        if line.strip() == "/reset":
            history = []
            continue
        if line.startswith("/system"):
            system, history = line[len("/system"):].strip() or None, []
            continue
        history.append({"role": "user", "content": line})
        while True:  # the oldest exchanges go first when the conversation outgrows the context
            msgs = ([{"role": "system", "content": system}] if system else []) + history
            ids = prompt_ids(tok, msgs)
            if not context or len(ids) + max_new_tokens <= context or len(history) == 1:
                break
            history = history[2:]
        x = torch.tensor([ids], device=next(model.parameters()).device)
        streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
        kwargs = dict(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens, streamer=streamer,
                      eos_token_id=stops, pad_token_id=tok.pad_token_id, **_sampling(temperature, top_p))
        failed = []

        def work():
            try:
                model.generate(**kwargs)
            except Exception as e:  # noqa: BLE001 - raised again below, in this thread
                failed.append(e)
                streamer.end()  # else the loop below waits for tokens forever

        worker = Thread(target=work)
        worker.start()
        reply = []
        for piece in streamer:
            reply.append(piece)
            print(piece, end="", file=out, flush=True)
        worker.join()
        if failed:
            raise failed[0]
        print(file=out, flush=True)
        history.append({"role": "assistant", "content": "".join(reply)})
