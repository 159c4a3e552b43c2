"""Checkpoints: written to a temporary folder, then renamed, so a checkpoint folder is always complete.

    output_dir/checkpoints/step-000050/
        adapter_model.safetensors, adapter_config.json   (PEFT; a full fine-tune saves the model)
        trainer_state.pt   optimizer, scheduler, RNG states, data position, the run's fingerprint

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


def fingerprint(cfg) -> dict:
    """The settings that define what a run trains; learning-rate or logging changes are allowed."""
    from dataclasses import asdict

    d = asdict(cfg)
    fp = {
        "model": {k: d["model"][k] for k in ("path", "adapter", "finetune", "load_in_4bit", "bnb_4bit_quant_type")},
        "lora": d.get("lora"),
        "data": {**d["data"], "train_sha": _file_hash(cfg.data.train), "eval": None},
        "batching": {k: d["train"][k] for k in ("micro_batch_size", "grad_accum", "seed")},
    }
    for extra in ("dpo", "grpo"):
        if extra in d:
            fp[extra] = d[extra]
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


def save(run_dir, step, model, optimizer, scheduler, position, fp, keep):
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".tmp-step-{step:06d}-{os.getpid()}"
    model.save_pretrained(tmp)
    state = {
        "step": step, "position": position, "fingerprint": fp,
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
    }
    torch.save(state, tmp / STATE)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
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


def load(path, model, optimizer, scheduler, fp) -> dict:
    """Restore a checkpoint into the model (adapter or full weights), optimizer and scheduler."""
    from safetensors.torch import load_file

    state = torch.load(Path(path) / STATE, weights_only=False)
    changed = _diff(state["fingerprint"], fp)
    if changed:
        raise ResumeError(f"cannot resume from {path}: the config changed what the run trains ("
                          + "; ".join(changed) + "). Restore those settings, use a new run.output_dir, or set "
                          "run.resume = \"never\" to start over")
    adapter = Path(path) / "adapter_model.safetensors"
    if adapter.is_file():
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(adapter))
    else:
        weights = {}
        for f in sorted(Path(path).glob("*.safetensors")):
            weights.update(load_file(f))
        model.load_state_dict(weights, strict=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    if state["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state
