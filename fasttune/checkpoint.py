"""Checkpoints: written to a temporary folder, then renamed, so a checkpoint folder is always complete.

    output_dir/checkpoints/step-000050/
        adapter_model.safetensors, adapter_config.json   (PEFT; a full fine-tune saves the model)
        trainer_state.pt   optimizer (keyed by parameter name), scheduler, each rank's RNG state,
                           data position, the run's fingerprint
        manifest.json      every other file's size and sha256, written last (before the rename)

Under several processes rank 0 writes, after FSDP2's shards are gathered: a checkpoint is whole
and loads on any world size.
A kill at any moment leaves the last complete checkpoint intact (and, at worst, a `.tmp-*` folder
that the next save removes). A write that fails (a full disk) removes its temporary folder and
stops the run with one line; `keep` deletes older checkpoints only after the new one is in place.
`verify` checks a checkpoint against its manifest before anything is loaded from it: `find`
(resume), `pick` (merge, generate, chat, eval) skip a damaged latest checkpoint for the one before,
with a warning. A checkpoint without a manifest (written before fasttune had them) is loaded with a
warning that it could not be checked. `fingerprint` records what a run trains (model, adapter
settings, data files and their contents, batching, seed); resuming with a different one is refused.
"""

import hashlib
import json
import os
import random
import shutil
import sys
from pathlib import Path

import torch

from .tasks import for_config

STATE = "trainer_state.pt"
MANIFEST = "manifest.json"


class ResumeError(RuntimeError):
    """Resuming is not possible as asked."""


class CheckpointError(ResumeError):
    """A checkpoint fails its check, or cannot be written."""


def file_hash(path) -> str:
    """The first 16 hex digits of a file's SHA-256 ("" for no file): what a run's fingerprint and DPO's
    reference cache key name a data file by."""
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
        "data": {**d["data"], "train_sha": file_hash(cfg.data.train), "eval": None},
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
    """The run's checkpoint folders, oldest first (not yet verified)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step-*") if p.is_dir())


def is_checkpoint(path) -> bool:
    """A folder that claims to be a checkpoint (whether or not it verifies)."""
    path = Path(path)
    return (path / STATE).is_file() or (path / MANIFEST).is_file()


# ---- the manifest ------------------------------------------------------------------------------

def _sha256(path, sync=False) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
        if sync:  # on disk before the rename makes the checkpoint visible
            os.fsync(f.fileno())
    return h.hexdigest()


def _write_manifest(folder: Path):
    files = {str(p.relative_to(folder)): {"bytes": p.stat().st_size, "sha256": _sha256(p, sync=True)}
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST}
    with open(folder / MANIFEST, "w") as f:
        json.dump({"fasttune_checkpoint": 1, "files": files, "files_sha256": _digest_of(files)}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def _digest_of(files: dict) -> str:
    """The manifest's checksum of its own file list, so a damaged manifest is told from a damaged file."""
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def problem(folder) -> str | None:
    """What is wrong with checkpoint `folder` against its manifest (a file missing, a size or a
    checksum that differs, a manifest that does not parse), or None when every file checks out.
    A folder without a manifest but with trainer_state.pt (an earlier fasttune's) gives None."""
    folder = Path(folder)
    mf = folder / MANIFEST
    if not mf.is_file():
        return None if (folder / STATE).is_file() else f"{folder}: not a complete checkpoint (no {MANIFEST}, no {STATE})"
    try:
        manifest = json.loads(mf.read_text())
        files = {str(k): (int(v["bytes"]), str(v["sha256"])) for k, v in manifest["files"].items()}
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as e:
        return f"{mf}: the manifest is damaged ({type(e).__name__}: {str(e)[:80] or 'empty'})"
    if "files_sha256" in manifest and manifest["files_sha256"] != _digest_of(manifest["files"]):
        return f"{mf}: the manifest is damaged (its file list does not match its own checksum)"
    if STATE not in files:
        return f"{mf}: the manifest does not list {STATE}"
    for name, (size, digest) in files.items():
        f = folder / name
        if not f.is_file():
            return f"{f}: missing (the manifest lists it)"
        if f.stat().st_size != size:
            return f"{f}: {f.stat().st_size} bytes, the manifest says {size} (truncated or damaged)"
        if _sha256(f) != digest:
            return f"{f}: its sha256 differs from the manifest's (the file is damaged)"
    return None


def verify(folder, warn=print):
    """Raise CheckpointError naming the file at fault unless `folder` checks out; an unverifiable
    checkpoint of an earlier fasttune (no manifest) passes with a warning."""
    bad = problem(folder)
    if bad:
        raise CheckpointError(bad)
    if not (Path(folder) / MANIFEST).is_file():
        warn(f"warning: {folder} has no {MANIFEST} (written by an earlier fasttune): loaded without a check")


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


def _tensor_bytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def _needed_bytes(model, model_sd, state) -> int:
    """About what a checkpoint takes on disk: its tensors (the adapter, or the whole model)."""
    if model_sd is not None:
        weights = _tensor_bytes(model_sd)
    elif hasattr(model, "peft_config"):
        weights = sum(_tensor_bytes(p) for p in model.parameters() if p.requires_grad)
    else:
        weights = _tensor_bytes(model.state_dict())
    return weights + _tensor_bytes(state)


def _write(tmp, model, model_sd, state):
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, **({"state_dict": model_sd} if model_sd is not None else {}))
    with open(tmp / STATE, "wb") as f:  # a Python file: a failed write keeps its OSError (errno) in the chain
        torch.save(state, f)
    _write_manifest(tmp)  # last: a folder with a manifest has every file it lists


def _reason(e) -> str:
    """The OS's words for a failed write (`No space left on device`, `File too large`), found in the
    exception's chain (torch's writer wraps them), else the error's first line."""
    seen = e
    while seen is not None:
        if isinstance(seen, OSError) and seen.strerror:
            return seen.strerror
        seen = seen.__cause__ or seen.__context__
    return (str(e).splitlines() or [type(e).__name__])[0][:200]


def save(run_dir, step, model, optimizer, scheduler, position, fp, keep, dist=None):
    """Every rank calls this (under FSDP2 the full state is gathered); rank 0 writes. A failed write
    (a full disk) leaves the earlier checkpoints as they were and raises CheckpointError on every rank."""
    from .distributed import Dist

    dist = dist or Dist()
    model_sd, optim_sd = dist.full_state(model, optimizer)
    if dist.mode != "fsdp":
        optim_sd = _by_name(model, optimizer, optim_sd)
    rngs = dist.gather_objects(_rng_state())
    final = Path(run_dir) / "checkpoints" / f"step-{step:06d}"
    error = None
    if dist.main:
        root = final.parent
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = root / f".tmp-step-{step:06d}-{os.getpid()}"
        state = {"step": step, "position": position, "fingerprint": fp, "optimizer": optim_sd,
                 "scheduler": scheduler.state_dict(), "rng": rngs}
        try:
            _write(tmp, model, model_sd, state)
        except Exception as e:  # ENOSPC, EFBIG, EDQUOT, ... from Python, safetensors or torch's writer
            shutil.rmtree(tmp, ignore_errors=True)
            need, free = _needed_bytes(model, model_sd, state), shutil.disk_usage(root).free
            last = checkpoints(run_dir)
            reason = _reason(e)
            error = (f"cannot write checkpoint {final.name} in {root}: {reason}. It needs about {need:,} bytes "
                     f"({free:,} free there). The earlier checkpoints are intact (last: "
                     f"{last[-1].name if last else 'none'}); free some space and run the same command to resume")
        else:
            if final.exists():  # a step written again (run.resume = "never" in the same folder)
                os.replace(final, root / f".tmp-old-{final.name}-{os.getpid()}")
            os.replace(tmp, final)
            _fsync_dir(root)
            older = [p for p in checkpoints(run_dir) if p.name < final.name]
            for old in older[: max(0, len(older) - (keep - 1))]:  # only now that the new one is complete
                shutil.rmtree(old, ignore_errors=True)
            for stale in root.glob(".tmp-old-*"):
                shutil.rmtree(stale, ignore_errors=True)
    error = dist.gather_objects(error)[0]  # also the barrier: nobody goes on (or reads it) before it is complete
    if error:
        raise CheckpointError(error)
    return final


def find(run_dir, resume: str, warn=print) -> Path | None:
    """The checkpoint to resume from, verified: "auto" -> the last one that checks out (a damaged one
    is skipped with a warning; None when there is none at all), "never" -> None, else that folder."""
    if resume == "never":
        return None
    if resume != "auto":
        path = Path(resume)
        if not is_checkpoint(path):
            raise ResumeError(f"run.resume = {resume!r} is not a complete checkpoint folder (no {STATE} in it)")
        bad = problem(path)
        if bad:
            raise CheckpointError(f"run.resume = {resume!r} fails its check, nothing was loaded from it: {bad}")
        verify(path, warn)
        return path
    found = checkpoints(run_dir)
    for ck in reversed(found):
        bad = problem(ck)
        if bad is None:
            verify(ck, warn)
            return ck
        warn(f"warning: skipping checkpoint {ck.name}: {bad}")
    if found:
        raise CheckpointError(f"no checkpoint in {Path(run_dir) / 'checkpoints'} passes its check (see the warnings "
                              "above); restore one, or set run.resume = \"never\" or a new run.output_dir to start over")
    return None


def pick(target, warn=print) -> Path | None:
    """For merge, generate, chat and eval: a checkpoint folder, verified (one clear error naming the
    file if it fails), or a run folder's last checkpoint that checks out (as `find` with "auto")."""
    target = Path(target)
    if is_checkpoint(target):
        bad = problem(target)
        if bad:
            raise CheckpointError(f"{target} fails its check, nothing was loaded from it: {bad}")
        verify(target, warn)
        return target
    return find(target, "auto", warn)


def run_of(target, warn=None):
    """(run config, checkpoint folder) for a run folder (its last checkpoint that checks out) or a
    checkpoint folder (verified), as merge, generate, chat, eval and reward models name them;
    (None, None) for anything else. `warn`: where a skipped checkpoint is said (stderr by default)."""
    from .config import ConfigError, load_config

    path = Path(target)
    warn = warn or (lambda m: print(m, file=sys.stderr))
    if is_checkpoint(path):
        ck, run = pick(path, warn), path.parent.parent
    elif (path / "config.toml").is_file() and (path / "checkpoints").is_dir():
        run, ck = path, pick(path, warn)
        if ck is None:
            raise ConfigError(f"{path}: a run folder without a complete checkpoint (checkpoints/ has none); "
                              "train it first, or name a checkpoint folder")
    else:
        return None, None
    if not (run / "config.toml").is_file():
        raise ConfigError(f"{ck}: a checkpoint outside its run folder (no {run / 'config.toml'}); "
                          "keep checkpoints inside the run's output_dir")
    return load_config(run / "config.toml"), ck


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
