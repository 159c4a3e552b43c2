"""Checkpoints: written to a temporary folder, then renamed, so a checkpoint folder is always complete.

    output_dir/checkpoints/step-000050/
        adapter_model.safetensors, adapter_config.json   (PEFT; a full fine-tune saves the model)
        trainer_state.pt   optimizer (keyed by parameter name), scheduler, each rank's RNG state,
                           data position, the run's fingerprint

Under several processes rank 0 writes, after FSDP2's shards are gathered: a checkpoint is whole
and loads on any world size.
A kill at any moment leaves the last complete checkpoint intact (and, at worst, a `.tmp-*` folder
that the next save removes). `fingerprint` records what a run trains (model, adapter settings,
data files and their contents, batching, seed); resuming with a different one is refused.
"""

import hashlib
import json
import os
import random
import shutil
from pathlib import Path

import torch

from .tasks import for_config

STATE = "trainer_state.pt"


class ResumeError(RuntimeError):
    """Resuming is not possible as asked."""


def _file_hash(path) -> str:
    if not path:
        return ""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def fingerprint(cfg, world: int = 1) -> dict:
    """The settings that define what a run trains; learning-rate or logging changes are allowed. The
    batching is the global one: a resume on another world size with the same micro-batches per step
    (train.grad_accum × processes) continues exactly."""
    from dataclasses import asdict

    d = asdict(cfg)
    fp = {
        "model": {k: d["model"][k] for k in ("path", "adapter", "finetune", "load_in_4bit", "bnb_4bit_quant_type")},
        "lora": d.get("lora"),
        "data": {**d["data"], "train_sha": _file_hash(cfg.data.train), "eval": None},
        "batching": {"micro_batch_size": cfg.train.micro_batch_size, "seed": cfg.train.seed,
                     "micro-batches per step (train.grad_accum × processes)": cfg.train.grad_accum * world},
    }
    section = for_config(cfg).section  # the command's own section ([dpo], [grpo])
    if section:
        fp[section] = d[section]
    return json.loads(json.dumps(fp, default=str))


def _diff(a, b, prefix=""):
    out = []
    for k in sorted(set(a) | set(b)):
        x, y = a.get(k), b.get(k)
        if isinstance(x, dict) and isinstance(y, dict):
            out += _diff(x, y, f"{prefix}{k}.")
        elif x != y:
            out.append(f"{prefix}{k}: {x!r} -> {y!r}")
    return out


def checkpoints(run_dir) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if (p / STATE).is_file())


def _rng_state():
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _by_name(model, optimizer, sd):
    """An optimizer state dict keyed by parameter name instead of position, so that it loads on any
    world size and under FSDP2 (whose full optimizer state is keyed so)."""
    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    return {"state": {order[i]: v for i, v in sd["state"].items()},
            "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in sd["param_groups"]]}


def _by_position(model, optimizer, sd):
    names = {id(p): n for n, p in model.named_parameters()}
    index = {names[id(p)]: i for i, p in enumerate(p for g in optimizer.param_groups for p in g["params"])}
    return {"state": {index[n]: v for n, v in sd["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in sd["param_groups"]]}


def save(run_dir, step, model, optimizer, scheduler, position, fp, keep, dist=None):
    """Every rank calls this (under FSDP2 the full state is gathered); rank 0 writes."""
    from .distributed import Dist

    dist = dist or Dist()
    model_sd, optim_sd = dist.full_state(model, optimizer)
    if dist.mode != "fsdp":
        optim_sd = _by_name(model, optimizer, optim_sd)
    rngs = dist.gather_objects(_rng_state())
    final = Path(run_dir) / "checkpoints" / f"step-{step:06d}"
    if dist.main:
        root = final.parent
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = root / f".tmp-step-{step:06d}-{os.getpid()}"
        model.save_pretrained(tmp, **({"state_dict": model_sd} if model_sd is not None else {}))
        state = {"step": step, "position": position, "fingerprint": fp, "optimizer": optim_sd,
                 "scheduler": scheduler.state_dict(), "rng": rngs}
        torch.save(state, tmp / STATE)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()  # nobody goes on (or reads it) before it is complete
    return final


def find(run_dir, resume: str) -> Path | None:
    """The checkpoint to resume from: "auto" -> the last complete one (or None), "never" -> None, else a path."""
    if resume == "never":
        return None
    if resume == "auto":
        found = checkpoints(run_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / STATE).is_file():
        raise ResumeError(f"run.resume = {resume!r} is not a complete checkpoint folder (no {STATE} in it)")
    return path


def load(path, model, optimizer, scheduler, fp, dist=None) -> dict:
    """Restore a checkpoint into the model (adapter or full weights), optimizer and scheduler; every
    rank reads it. RNG states come back per rank when the world size is the one that saved them."""
    from safetensors.torch import load_file

    from .distributed import Dist

    dist = dist or Dist()
    state = torch.load(Path(path) / STATE, weights_only=False)
    changed = _diff(state["fingerprint"], fp)
    if changed:
        raise ResumeError(f"cannot resume from {path}: the config changed what the run trains ("
                          + "; ".join(changed) + "). Restore those settings, use a new run.output_dir, or set "
                          "run.resume = \"never\" to start over")
    adapter = Path(path) / "adapter_model.safetensors"
    weights = None
    if adapter.is_file():
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(adapter))
        for name in getattr(model, "peft_config", {}):  # other adapters (PPO's critic): PEFT saves them in a folder each
            if name != "default" and (Path(path) / name / "adapter_model.safetensors").is_file():
                set_peft_model_state_dict(model, load_file(Path(path) / name / "adapter_model.safetensors"), adapter_name=name)
    else:
        weights = {}
        for f in sorted(Path(path).glob("*.safetensors")):
            weights.update(load_file(f))
    if dist.mode == "fsdp":
        dist.load_full_state(model, optimizer, weights, state["optimizer"])
    else:
        if weights is not None:
            model.load_state_dict(weights, strict=False)
        optimizer.load_state_dict(_by_position(model, optimizer, state["optimizer"]))
    scheduler.load_state_dict(state["scheduler"])
    rngs = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]
    if len(rngs) == dist.world:
        rng = rngs[dist.rank]
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
    return state
