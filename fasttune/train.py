"""The training loop shared by every command (`fasttune sft`, `dpo`, `grpo`, `kto`, `reward`, `ppo`).

A task (SFTTask in sft.py, DPOTask in dpo.py, GRPOTask in grpo.py, ...) supplies a Stream of micro-batches,
what a micro-batch counts (trained tokens, pairs, completions) and its loss. One optimizer step:
take `grad_accum` micro-batches, add up their counts on the host, run each with that total as the
normalizer so the summed gradient is the mean over the whole accumulated batch, clip, step,
schedule. Every `save_every` steps or `save_every_minutes` (and at the end) a checkpoint; every
step a line of metrics.jsonl and the progress bar. A NaN or infinite loss stops the run before the
optimizer touches the weights, so the last checkpoint stays good. SIGTERM or Ctrl-C stops it after
the step it is in, with a checkpoint (fasttune/stopping.py); every rank agrees on that, and on a
timed save, through the step's one host all-reduce. What the run writes for people (metrics.jsonl,
the progress bar, loss.png) is fasttune/runlog.py.
"""

import math
import random
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from . import checkpoint, distributed, stopping
from .models import compute_dtype, load_tokenizer
from .runlog import RunLog
from .tasks import for_config


class TrainingError(RuntimeError):
    """The run cannot go on; the message says why and what was kept."""


def make_optimizer(params, t):
    if t.optimizer == "adamw":
        # fused: one kernel over every tensor. Without it torch's AdamW on the CPU loops over the tensors in
        # Python, about ten small ops each: for SmolLM2's 420 LoRA tensors 12 ms a step on a quiet core and
        # 200 ms when another process keeps the cores busy, against 4-8 ms fused (on CUDA, HF's default).
        fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
        opt = torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay, fused=fused or None)
        if fused:
            # The fused kernel updates the weights in place without bumping their version counters (torch
            # 2.13), by which the rollout twin (fasttune/rollout.py) sees that the adapter changed: bump them.
            opt.register_step_post_hook(lambda o, args, kwargs: torch.autograd.graph.increment_version(
                [p for g in o.param_groups for p in g["params"]]))
        return opt
    import bitsandbytes as bnb

    cls = bnb.optim.AdamW8bit if t.optimizer == "adamw_8bit" else bnb.optim.PagedAdamW8bit
    return cls(params, lr=t.learning_rate, weight_decay=t.weight_decay)


def make_scheduler(opt, t, total):
    warm = min(t.warmup_steps, max(total - 1, 0))

    def factor(step):
        if step < warm:
            return (step + 1) / (warm + 1)
        progress = (step - warm) / max(1, total - warm)
        if t.lr_scheduler == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        if t.lr_scheduler == "linear":
            return max(0.0, 1 - progress)
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def peak_memory_mb(dev) -> float:
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    try:  # this process's own peak RSS; ru_maxrss would carry a forking parent's peak across exec
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def train(cfg, task_cls, log=print) -> dict:
    """The shared loop: `task_cls(cfg, tokenizer, log, dist)`, a `fasttune.tasks.Task`, supplies the
    batches, their count and the loss. Under torchrun each process runs this, its share of every step
    (fasttune/distributed.py)."""
    dist = distributed.start()
    try:
        with stopping.StopSignals(main=dist.main, forwarded=dist.launched) as stop:
            return _train(cfg, task_cls, log if dist.main else (lambda *a, **k: None), dist, stop)
    finally:
        dist.close()


@dataclass
class _Run:
    """What the loop works with, from setup to the summary."""

    cfg: Any
    dist: Any
    run_dir: Path
    task: Any  # a fasttune.tasks.Task
    model: torch.nn.Module
    runner: Any  # the wrapped model (DDP, FSDP2 or none): every use of the weights goes through runner(fn, *args)
    params: list
    opt: Any
    sched: Any
    total: int  # optimizer steps of the run
    fp: dict  # checkpoint.fingerprint
    step: int  # optimizer steps done (a resumed run starts at its checkpoint's)
    ck: Path | None  # the checkpoint resumed from
    autocast: Callable

    def save(self, out):
        """(step, folder) of the checkpoint written now."""
        try:
            return self.step, checkpoint.save(self.run_dir, self.step, self.model, self.opt, self.sched,
                                              self.task.stream.position, self.fp, self.cfg.run.keep, self.dist)
        except checkpoint.CheckpointError:
            out.end_line()
            raise


def _setup(cfg, task_cls, log, dist) -> _Run:
    """The task, the model, the optimizer and the schedule, restored from the checkpoint to resume from."""
    t = cfg.train
    dist.mode = distributed.mode_for(cfg, dist.launched)  # refuses what cannot be distributed, before any work
    torch.manual_seed(t.seed)
    random.seed(t.seed)
    dev = dist.device
    run_dir = Path(cfg.run.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ck = checkpoint.find(run_dir, cfg.run.resume, warn=log)  # verified before anything is loaded

    tok = load_tokenizer(cfg.model)
    task = task_cls(cfg, tok, log, dist)  # every rank reads and plans the same data
    model = for_config(cfg).load("model")(cfg, dev)  # the task's own loader (a reward model adds its head)
    task.setup(model, dev, run_dir, dist)
    params = [p for p in model.parameters() if p.requires_grad]
    log(f"model {cfg.model.path}: {sum(p.numel() for p in params):,} trainable parameters "
        f"({cfg.model.finetune}{', 4-bit base' if cfg.model.finetune == 'lora' and cfg.model.load_in_4bit else ''}), "
        f"on {dev.type}" + (f", {dist.world} process{'es' if dist.world > 1 else ''} ({dist.mode})" if dist.launched else ""))
    runner = dist.wrap(model)  # every use of the weights goes through runner(fn, *args)
    task.run = runner
    torch.manual_seed(t.seed + dist.rank)  # each rank its own sampling and dropout
    params = [p for p in runner.parameters() if p.requires_grad]
    opt = make_optimizer(params, t)
    per_epoch = len(task.stream.plan(0))
    total = t.max_steps or max(1, math.ceil(t.epochs * per_epoch / (t.grad_accum * dist.world)))
    sched = make_scheduler(opt, t, total)
    fp = checkpoint.fingerprint(cfg, dist.world)

    step = 0
    if ck is not None:
        state = checkpoint.load(ck, model, opt, sched, fp, dist)
        step, task.stream.position = state["step"], dict(state["position"])
        log(f"resuming from {ck} at step {step}")

    dtype = compute_dtype(cfg.model.compute_dtype, dev)
    use_autocast = dev.type == "cuda" and dtype != torch.float32

    def autocast():
        return torch.autocast(dev.type, dtype=dtype, enabled=use_autocast)

    return _Run(cfg, dist, run_dir, task, model, runner, params, opt, sched, total, fp, step, ck, autocast)


def _step(r: _Run, stop, out, last_save) -> dict:
    """One optimizer step: the accumulated micro-batches' forward and backward, the step's one host
    sync, then clip, optimizer and schedule. Returns what the step measured, summed over ranks."""
    t, dist, task, dev = r.cfg.train, r.dist, r.task, r.dist.device
    t0 = time.perf_counter()
    batches = task.stream.step(t.grad_accum, dist.rank, dist.world)
    # the normalizer of the whole global batch, summed over ranks on the host (gloo): no device sync
    counted = float(dist.sum(torch.tensor(sum(task.count(b) for b in batches), dtype=torch.float64)))
    n_items = int(counted) if counted.is_integer() else counted  # a float: summed class weights (SFT)
    loss_sum = torch.zeros((), device=dev)
    extra = {}
    for i, b in enumerate(batches):
        with dist.no_sync(r.runner, last=i == len(batches) - 1):
            with r.autocast():
                loss, stats = r.runner(task.loss, b, n_items, dev)
            # DDP and FSDP2 average gradients over ranks; the loss is a share of the global sum
            (loss * dist.world).backward()
        loss_sum += loss.detach()
        for k, v in stats.items():  # per-micro-batch means, weighted by the micro-batch's count
            v = torch.as_tensor(v, dtype=torch.float32, device=dev)
            extra[k] = extra.get(k, 0.0) + v * (task.count(b) / n_items)
    tokens, trained = sum(b.tokens for b in batches), sum(b.trained for b in batches)
    # the one host sync of the step: the loss, the statistics and the counts of every rank together,
    # with each rank's "a stop signal came" and "a timed save is due" (so all ranks decide alike)
    minutes = r.cfg.run.save_every_minutes
    due = minutes > 0 and time.monotonic() - last_save >= 60 * minutes
    summed = dist.sum(torch.stack([loss_sum.float(), *extra.values(), *torch.tensor(
        [tokens, trained, stop.requested, due], dtype=torch.float32, device=dev)]))
    loss, *values, tokens, trained, halting, due = summed.tolist()
    if not math.isfinite(loss):  # a NaN on any rank is in the sum: every rank stops here
        last = checkpoint.checkpoints(r.run_dir)
        out.end_line()
        raise TrainingError(f"the loss is {loss} at step {r.step + 1}; stopped before the optimizer step. "
                            f"Last good checkpoint: {last[-1] if last else 'none'}. Try a lower "
                            "train.learning_rate or check the data")
    norm = torch.nn.utils.clip_grad_norm_(r.params, t.max_grad_norm if t.max_grad_norm > 0 else float("inf"))
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: a DTensor
    lr = r.sched.get_last_lr()[0]
    r.opt.step()
    r.sched.step()
    r.opt.zero_grad(set_to_none=True)
    r.step += 1
    return {"loss": loss, "extra": dict(zip(extra, values)), "tokens": tokens, "trained": trained, "lr": lr,
            "norm": float(norm), "halted": halting > 0, "due": due > 0, "elapsed": time.perf_counter() - t0}


def _row(r: _Run, s: dict, start) -> dict:
    """The step's line of metrics.jsonl, with the eval metrics on an eval step."""
    task, extra = r.task, s["extra"]
    row = {"step": r.step, "loss": round(s["loss"], 6), "lr": s["lr"], "grad_norm": round(s["norm"], 6),
           "tokens_per_s": round(s["tokens"] / s["elapsed"], 1), "trained_tokens": int(s["trained"]),
           "peak_memory_mb": round(r.dist.max(peak_memory_mb(r.dist.device)), 1),
           "elapsed_s": round(time.perf_counter() - start, 2),
           "epoch": task.stream.position["epoch"], **{k: round(v, 6) for k, v in extra.items()}}
    if task.timings:  # time spent inside the step but not training (GRPO's sampling): report it apart
        # extra holds the mean per micro-batch over all ranks; a rank runs grad_accum of them
        for k in task.timings:
            row[k] = round(extra.get(k, 0.0) * r.cfg.train.grad_accum, 4)
        row["training_s"] = round(s["elapsed"] - sum(row[k] for k in task.timings), 4)
    if (r.cfg.run.eval_every and r.step % r.cfg.run.eval_every == 0) or r.step == r.total:
        ev = r.runner(task.evaluate, r.dist.device, r.autocast)  # eval loss, or (GRPO) a dict of eval_* metrics
        if ev is not None:
            row.update({k: round(v, 6) for k, v in (ev if isinstance(ev, dict) else {"eval_loss": ev}).items()})
    return row


def _train(cfg, task_cls, log, dist, stop) -> dict:
    r = _setup(cfg, task_cls, log, dist)
    out = RunLog(r.run_dir, cfg, r.step, r.total, r.task.name, r.ck is not None, dist.main, r.task.panels)
    if dist.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    r.model.train()
    start, tokens_seen, last_row = time.perf_counter(), 0, None
    saved, last_save, halted = (r.step, r.ck), time.monotonic(), False  # (step, folder) of the last checkpoint
    while r.step < r.total:
        if dist.world == 1 and stop.requested:  # one process: no need to begin another step
            halted = True
            break
        s = _step(r, stop, out, last_save)
        halted = s["halted"]
        tokens_seen += int(s["tokens"])
        row = _row(r, s, start)
        evaluated = any(k.startswith("eval_") for k in row)
        if r.step % cfg.run.log_every == 0 or r.step == r.total or evaluated:
            out.write(row)
        shown = {k: f"{s['extra'][k]:.3f}" for k in list(s["extra"])[:2]}
        out.show(loss=f"{s['loss']:.4f}", lr=f"{s['lr']:.2e}", tok_s=f"{row['tokens_per_s']:.0f}",
                 mem=f"{row['peak_memory_mb']:.0f}MB", **shown)
        last_row = row
        if r.step % cfg.run.save_every == 0 or r.step == r.total or s["due"] or halted:
            saved = r.save(out)
            last_save = time.monotonic()
        if halted:
            break
    if halted and saved[0] != r.step:  # one process stopped between steps: the last one is not saved yet
        saved = r.save(out)
    first = out.close()
    if halted and r.step < r.total:
        where = f"checkpoint {saved[1]}" if saved[1] else "nothing to save yet"
        raise stopping.Stopped(f"stopped by {stop.name} at step {r.step} of {r.total}: {where}; "
                               "run the same command to resume", stop.code)
    return _summary(r, log, first, last_row, tokens_seen, start)


def _summary(r: _Run, log, first, last_row, tokens_seen, start) -> dict:
    """The run's summary, returned and said in one line."""
    summary = {"steps": r.step, "first_loss": first and first["loss"], "last_loss": last_row and last_row["loss"],
               "eval_loss": last_row and last_row.get("eval_loss"), "tokens": tokens_seen,
               "seconds": round(time.perf_counter() - start, 1),
               "peak_memory_mb": round(r.dist.max(peak_memory_mb(r.dist.device)), 1),
               "output_dir": str(r.run_dir), "last": last_row}
    log(f"done: {summary['steps']} steps, loss {summary['first_loss']} -> {summary['last_loss']}"
        + (f", eval loss {summary['eval_loss']}" if summary["eval_loss"] is not None else "")
        + f"; {summary['tokens']:,} tokens in {summary['seconds']}s; peak memory {summary['peak_memory_mb']:.0f} MB; "
        f"adapter and checkpoints in {r.run_dir}")
    return summary
