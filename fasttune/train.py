"""The training loop shared by `fasttune sft`, `dpo` and `grpo`, and the SFT task.

A task (SFTTask here, DPOTask in dpo.py, GRPOTask in grpo.py) supplies a Stream of micro-batches,
what a micro-batch counts (trained tokens, pairs, completions) and its loss. One optimizer step:
take `grad_accum` micro-batches, add up their counts on the host, run each with that total as the
normalizer so the summed gradient is the mean over the whole accumulated batch, clip, step,
schedule. Every `save_every` steps or `save_every_minutes` (and at the end) a checkpoint; every
step a line of metrics.jsonl and the progress bar. A NaN or infinite loss stops the run before the
optimizer touches the weights, so the last checkpoint stays good. SIGTERM or Ctrl-C stops it after
the step it is in, with a checkpoint (fasttune/stopping.py); every rank agrees on that, and on a
timed save, through the step's one host all-reduce.
"""

import json
import math
import random
import resource
import time
from pathlib import Path

import torch

from . import checkpoint, distributed, stopping
from .batches import epoch_plan, make_batch
from .config import ConfigError, resolved_toml
from .data import load_sft, packing_efficiency
from .models import compute_dtype, load_model, load_tokenizer
from .tasks import for_config


class TrainingError(RuntimeError):
    """The run cannot go on; the message says why and what was kept."""


def make_optimizer(params, t):
    if t.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay)
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
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def shuffled_groups(n, size, seed):
    """A Stream plan: each epoch, the indices 0..n-1 shuffled by (seed, epoch), in groups of `size`."""

    def plan(epoch):
        order = list(range(n))
        random.Random(f"{seed}-{epoch}").shuffle(order)
        return [order[i : i + size] for i in range(0, n, size)]

    return plan


class Stream:
    """Endless micro-batches over the epochs, with a position that checkpoints can restore.

    `plan(epoch)` gives the groups of item indices of one epoch; `build(group)` the batch."""

    def __init__(self, plan, build, position=None):
        self._plan_fn, self.build = plan, build
        self.position = dict(position or {"epoch": 0, "index": 0})
        self._plan_epoch, self._plan = None, None

    def plan(self, epoch):
        if self._plan_epoch != epoch:
            self._plan, self._plan_epoch = self._plan_fn(epoch), epoch
        return self._plan

    def _advance(self):
        if self.position["index"] >= len(self.plan(self.position["epoch"])):
            self.position = {"epoch": self.position["epoch"] + 1, "index": 0}
        group = self.plan(self.position["epoch"])[self.position["index"]]
        self.position["index"] += 1
        return group

    def next(self):
        return self.build(self._advance())

    def step(self, accum, rank=0, world=1):
        """This rank's micro-batches of the next optimizer step: the step takes `accum × world`
        micro-batches of the plan, and rank r builds the r-th run of `accum` of them. Every rank
        keeps the same position."""
        groups = [self._advance() for _ in range(accum * world)]
        return [self.build(g) for g in groups[rank * accum : (rank + 1) * accum]]


def lm_loss(model, batch, n_items, dev, options=None):
    """The batch's loss summed over trained tokens / n_items: from the fused head `apply()` installed,
    or, for a model it could not patch, from the model's logits. `options`: the SFT loss family
    (token_scaling, class_weights) for the fused cross-entropy."""
    from fasttune.kernels import cross_entropy
    from fasttune.kernels.hf import fused_loss

    options = options or {}
    kw = batch.model_kwargs(dev)
    if options and not fused_loss(model):  # the model's own head: our loss on its logits
        kw.pop("shift_labels")
        out = model(**kw)
    else:
        out = model(**kw, num_items_in_batch=n_items, **options)
        if out.loss is not None:
            return out.loss
    return cross_entropy(out.logits.flatten(0, -2), batch.shift_labels.reshape(-1), reduction="mean",
                         num_items=n_items, **options)


def evaluate(model, examples, cfg, pad_id, dev, autocast) -> float:
    """Mean loss per trained token over `examples`."""
    lengths = [len(e.input_ids) for e in examples]
    plan = epoch_plan(lengths, packing=cfg.data.packing, micro_batch_size=cfg.train.micro_batch_size, seed=0, epoch=0)
    batches = [make_batch([examples[i] for i in g], cfg.data.packing, pad_id) for g in plan]
    n = sum(b.trained for b in batches)
    model.eval()
    total = 0.0
    with torch.no_grad(), autocast():
        for b in batches:
            total += float(lm_loss(model, b, n, dev))
    model.train()
    return total


def plot_losses(metrics_path, png_path, panels=()):
    """loss.png: train and eval loss, then the task's own curves, `Task.panels` (DPO: reward accuracy
    and margin; GRPO: the mean reward of each reward function, completion length)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in open(metrics_path)]
    fig, axes = plt.subplots(1, 1 + len(panels), figsize=(6 + 4.5 * len(panels), 3.5), dpi=100, squeeze=False)
    ax = axes[0][0]
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train")
    ev = [r for r in rows if "eval_loss" in r]
    if ev:
        ax.plot([r["step"] for r in ev], [r["eval_loss"] for r in ev], "o-", label="eval")
    ax.set_ylabel("loss")
    for ax, (title, keys) in zip(axes[0][1:], panels):
        keys = keys or ["reward"] + sorted(k for k in rows[0] if k.startswith("reward/"))
        for k in keys:
            ax.plot([r["step"] for r in rows if k in r], [r[k] for r in rows if k in r], label=k)
        ax.set_title(title, fontsize=10)
    for ax in axes[0]:
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)


def _progress(total, initial, desc):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True)


class SFTTask:
    """SFT on the shared loop: packed (or padded) rows, loss normalized by trained tokens."""

    name = "sft"
    panels, timings = (), ()
    run = None  # set by the loop; unused

    def __init__(self, cfg, tok, log, dist=None):
        self.cfg, self.tok = cfg, tok
        if not cfg.data.train:
            raise ConfigError("data.train is empty: set it to a JSON or JSONL file of examples")
        if cfg.data.packing and cfg.train.micro_batch_size < cfg.data.max_seq_len:
            raise ConfigError(f"with data.packing, train.micro_batch_size is tokens per row and must be >= "
                              f"data.max_seq_len ({cfg.train.micro_batch_size} < {cfg.data.max_seq_len})")
        self.loss_options = sft_loss_options(cfg.train, tok)  # checked before the data is read
        examples, report = load_sft(cfg.data.train, tok, cfg.data)
        log(report.summary())
        self.eval_examples = load_sft(cfg.data.eval, tok, cfg.data)[0] if cfg.data.eval else None
        lengths = [len(e.input_ids) for e in examples]
        d, t = cfg.data, cfg.train

        def plan(epoch):
            return epoch_plan(lengths, packing=d.packing, micro_batch_size=t.micro_batch_size, seed=t.seed, epoch=epoch)

        self.stream = Stream(plan, lambda g: make_batch([examples[i] for i in g], d.packing, tok.pad_token_id))
        if d.packing:
            rows = self.stream.plan(0)
            log(f"packing: {len(rows)} rows of {t.micro_batch_size} tokens per epoch, "
                f"{100 * packing_efficiency(lengths, rows, t.micro_batch_size):.1f}% filled")

    def setup(self, model, dev, run_dir, dist=None):
        pass  # nothing to prepare

    def count(self, batch):
        if "class_weights" in self.loss_options:  # the mean divides by the summed weights of the trained tokens
            y = batch.shift_labels
            return float(self.loss_options["class_weights"][y.clamp_min(0)][y != -100].sum())
        return batch.trained

    def loss(self, model, batch, n_items, dev):
        weights = self.loss_options.get("class_weights")
        V = model.get_output_embeddings().weight.shape[0]
        if weights is not None and weights.shape[0] < V:  # a head padded beyond the tokenizer: those classes weigh 1
            self.loss_options["class_weights"] = torch.cat([weights, torch.ones(V - weights.shape[0])])
        return lm_loss(model, batch, n_items, dev, self.loss_options), {}

    def evaluate(self, model, dev, autocast):
        return evaluate(model, self.eval_examples, self.cfg, self.tok.pad_token_id, dev, autocast) if self.eval_examples else None


def sft_loss_options(t, tok) -> dict:
    """train.loss and train.class_weights as fused_linear_cross_entropy's options."""
    options = {"token_scaling": True} if t.loss == "dft" else {}
    if t.class_weights:
        V = len(tok)
        weights = torch.ones(V)
        for token, w in t.class_weights.items():
            i = tok.convert_tokens_to_ids(token)
            if not isinstance(i, int) or not 0 <= i < V or tok.convert_ids_to_tokens(i) != token:
                raise ConfigError(f"train.class_weights: {token!r} is not a token of the tokenizer; keys are tokens "
                                  f"as the tokenizer spells them, e.g. {tok.eos_token or tok.convert_ids_to_tokens(V - 1)!r}")
            if not isinstance(w, (int, float)) or w < 0:
                raise ConfigError(f"train.class_weights[{token!r}] must be a number >= 0, got {w!r}")
            weights[i] = float(w)
        options["class_weights"] = weights
    return options


def train_sft(cfg, log=print) -> dict:
    """Train `cfg` (an SFTConfig); returns the summary."""
    return train(cfg, SFTTask, log)


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


class RunLog:
    """metrics.jsonl, the progress bar and loss.png: rank 0 writes them, the other ranks nothing."""

    def __init__(self, run_dir, cfg, step, total, name, resumed, enabled, panels=()):
        self.path, self.enabled, self.panels = run_dir / "metrics.jsonl", enabled, panels
        if not enabled:
            return
        from .reporting import Reporters

        self.reporters = Reporters(cfg.run.report_to, run_dir, cfg, step, resumed)
        (run_dir / "config.toml").write_text(resolved_toml(cfg))
        kept = [line for line in open(self.path)] if self.path.exists() and resumed else []
        self.path.write_text("".join(line for line in kept if json.loads(line)["step"] <= step))
        self.file = open(self.path, "a")
        self.bar = _progress(total, step, name)

    def write(self, row):
        if self.enabled:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()
            self.reporters.log(row)

    def show(self, **shown):
        if self.enabled:
            self.bar.set_postfix(**shown)
            self.bar.update(1)

    def end_line(self):
        """Before an error is printed: the progress bar's line ends (the bar stays as it was)."""
        if self.enabled:
            self.bar.close()

    def close(self):
        if not self.enabled:
            return None
        self.bar.close()
        self.file.close()
        self.reporters.close()
        if not self.path.stat().st_size:
            return None
        plot_losses(self.path, self.path.parent / "loss.png", self.panels)
        return json.loads(open(self.path).readline())


def _train(cfg, task_cls, log, dist, stop) -> dict:
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
    stream = task.stream
    per_epoch = len(stream.plan(0))
    total = t.max_steps or max(1, math.ceil(t.epochs * per_epoch / (t.grad_accum * dist.world)))
    sched = make_scheduler(opt, t, total)
    fp = checkpoint.fingerprint(cfg, dist.world)

    step = 0
    if ck is not None:
        state = checkpoint.load(ck, model, opt, sched, fp, dist)
        step, stream.position = state["step"], dict(state["position"])
        log(f"resuming from {ck} at step {step}")
    out = RunLog(run_dir, cfg, step, total, task.name, ck is not None, dist.main, task.panels)

    dtype = compute_dtype(cfg.model.compute_dtype, dev)
    use_autocast = dev.type == "cuda" and dtype != torch.float32

    def autocast():
        return torch.autocast(dev.type, dtype=dtype, enabled=use_autocast)

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model.train()
    start, tokens_seen, last_row = time.perf_counter(), 0, None
    saved, last_save, halted = (step, ck), time.monotonic(), False  # (step, folder) of the last checkpoint

    def save():
        try:
            return step, checkpoint.save(run_dir, step, model, opt, sched, stream.position, fp, cfg.run.keep, dist)
        except checkpoint.CheckpointError:
            out.end_line()
            raise

    while step < total:
        if dist.world == 1 and stop.requested:  # one process: no need to begin another step
            halted = True
            break
        t0 = time.perf_counter()
        batches = stream.step(t.grad_accum, dist.rank, dist.world)
        # the normalizer of the whole global batch, summed over ranks on the host (gloo): no device sync
        counted = float(dist.sum(torch.tensor(sum(task.count(b) for b in batches), dtype=torch.float64)))
        n_items = int(counted) if counted.is_integer() else counted  # a float: summed class weights (SFT)
        loss_sum = torch.zeros((), device=dev)
        extra = {}
        for i, b in enumerate(batches):
            with dist.no_sync(runner, last=i == len(batches) - 1):
                with autocast():
                    loss, stats = runner(task.loss, b, n_items, dev)
                # DDP and FSDP2 average gradients over ranks; the loss is a share of the global sum
                (loss * dist.world).backward()
            loss_sum += loss.detach()
            for k, v in stats.items():  # per-micro-batch means, weighted by the micro-batch's count
                v = torch.as_tensor(v, dtype=torch.float32, device=dev)
                extra[k] = extra.get(k, 0.0) + v * (task.count(b) / n_items)
        tokens, trained = sum(b.tokens for b in batches), sum(b.trained for b in batches)
        # the one host sync of the step: the loss, the statistics and the counts of every rank together,
        # with each rank's "a stop signal came" and "a timed save is due" (so all ranks decide alike)
        due = cfg.run.save_every_minutes > 0 and time.monotonic() - last_save >= 60 * cfg.run.save_every_minutes
        summed = dist.sum(torch.stack([loss_sum.float(), *extra.values(), *torch.tensor(
            [tokens, trained, stop.requested, due], dtype=torch.float32, device=dev)]))
        loss, *values, tokens, trained, halting, due = summed.tolist()
        halted = halting > 0
        extra = dict(zip(extra, values))
        if not math.isfinite(loss):  # a NaN on any rank is in the sum: every rank stops here
            last = checkpoint.checkpoints(run_dir)
            out.end_line()
            raise TrainingError(f"the loss is {loss} at step {step + 1}; stopped before the optimizer step. "
                                f"Last good checkpoint: {last[-1] if last else 'none'}. Try a lower "
                                "train.learning_rate or check the data")
        norm = torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm if t.max_grad_norm > 0 else float("inf"))
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2: a DTensor
        lr = sched.get_last_lr()[0]
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        elapsed = time.perf_counter() - t0
        tokens_seen += int(tokens)
        row = {"step": step, "loss": round(loss, 6), "lr": lr, "grad_norm": round(float(norm), 6),
               "tokens_per_s": round(tokens / elapsed, 1), "trained_tokens": int(trained),
               "peak_memory_mb": round(dist.max(peak_memory_mb(dev)), 1),
               "elapsed_s": round(time.perf_counter() - start, 2),
               "epoch": stream.position["epoch"], **{k: round(v, 6) for k, v in extra.items()}}
        if task.timings:  # time spent inside the step but not training (GRPO's sampling): report it apart
            # extra holds the mean per micro-batch over all ranks; a rank runs grad_accum of them
            for k in task.timings:
                row[k] = round(extra.get(k, 0.0) * t.grad_accum, 4)
            row["training_s"] = round(elapsed - sum(row[k] for k in task.timings), 4)
        if (cfg.run.eval_every and step % cfg.run.eval_every == 0) or step == total:
            ev = runner(task.evaluate, dev, autocast)  # eval loss, or (GRPO) a dict of eval_* metrics
            if ev is not None:
                row.update({k: round(v, 6) for k, v in (ev if isinstance(ev, dict) else {"eval_loss": ev}).items()})
        evaluated = any(k.startswith("eval_") for k in row)
        if step % cfg.run.log_every == 0 or step == total or evaluated:
            out.write(row)
        shown = {k: f"{extra[k]:.3f}" for k in list(extra)[:2]}
        out.show(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{row['tokens_per_s']:.0f}",
                 mem=f"{row['peak_memory_mb']:.0f}MB", **shown)
        last_row = row
        if step % cfg.run.save_every == 0 or step == total or due > 0 or halted:
            saved = save()
            last_save = time.monotonic()
        if halted:
            break
    if halted and saved[0] != step:  # one process stopped between steps: the last one is not saved yet
        saved = save()
    first = out.close()
    if halted and step < total:
        where = f"checkpoint {saved[1]}" if saved[1] else "nothing to save yet"
        raise stopping.Stopped(f"stopped by {stop.name} at step {step} of {total}: {where}; "
                               "run the same command to resume", stop.code)
    summary = {"steps": step, "first_loss": first and first["loss"], "last_loss": last_row and last_row["loss"],
               "eval_loss": last_row and last_row.get("eval_loss"), "tokens": tokens_seen,
               "seconds": round(time.perf_counter() - start, 1), "peak_memory_mb": round(dist.max(peak_memory_mb(dev)), 1),
               "output_dir": str(run_dir), "last": last_row}
    log(f"done: {summary['steps']} steps, loss {summary['first_loss']} -> {summary['last_loss']}"
        + (f", eval loss {summary['eval_loss']}" if summary["eval_loss"] is not None else "")
        + f"; {summary['tokens']:,} tokens in {summary['seconds']}s; peak memory {summary['peak_memory_mb']:.0f} MB; "
        f"adapter and checkpoints in {run_dir}")
    return summary
