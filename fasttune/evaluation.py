"""`fasttune eval CONFIG.toml [--adapter RUN_OR_CHECKPOINT | --adapter base]`: measure a model on
held-out data, before and after training.

On `data.eval` (or `data.train`, saying so), with the config's model and the adapter given (the
last checkpoint of `run.output_dir` by default; `base` for the model before training):
- SFT: loss per trained token (what training logs as eval_loss), perplexity and token accuracy
  (the argmax equals the label) over trained tokens;
- DPO: the DPO loss, reward accuracy and margin, chosen and rejected log-probs and rewards, against
  the same reference as training (the base with the adapter off);
- GRPO: each reward function's mean over `num_generations` samples per prompt, and their weighted total.
"""

import math
from dataclasses import replace
from pathlib import Path

import torch

from . import checkpoint
from .config import ConfigError
from .models import device, load_tokenizer
from .tasks import for_config


def eval_target(cfg, adapter, log=print):
    """What `fasttune eval --adapter` names: (checkpoint folder, or None for the base; a description)."""
    if adapter == "base":
        return None, "the base model (--adapter base)"
    if adapter is None:
        ck = checkpoint.pick(cfg.run.output_dir, warn=log)
        if ck is None:
            raise ConfigError(f"no checkpoint in run.output_dir = {cfg.run.output_dir!r} to evaluate; train first, "
                              "or pass --adapter RUN_OR_CHECKPOINT, or --adapter base for the model before training")
        return ck, f"{ck} (the run's last checkpoint)"
    run_cfg, ck = checkpoint.run_of(adapter)
    if ck is None:
        raise ConfigError(f"--adapter {adapter}: not a fasttune run or checkpoint folder (no config.toml with "
                          "checkpoints/, no trainer_state.pt); use --adapter base for the base model")
    if run_cfg.model.finetune != cfg.model.finetune:
        raise ConfigError(f"--adapter {adapter}: a {run_cfg.model.finetune} fine-tune, but this config has "
                          f"model.finetune = {cfg.model.finetune!r}; evaluate it with its own run's config.toml")
    if cfg.model.finetune == "full" and run_cfg.model.path != cfg.model.path:
        raise ConfigError(f"--adapter {adapter}: fine-tuned from {run_cfg.model.path}, not model.path = "
                          f"{cfg.model.path!r}")
    return ck, str(ck)


def evaluate(cfg, adapter=None, log=print) -> dict:
    """The metrics of `cfg`'s task on its eval data (or train data) for the model with `adapter`."""
    dev = device()
    split = "eval" if cfg.data.eval else "train"
    if split == "train":
        log(f"data.eval is not set: evaluating on data.train ({cfg.data.train})")
    ck, what = eval_target(cfg, adapter, log)
    tok = load_tokenizer(cfg.model)
    model = for_config(cfg).load("inference_model")(cfg, ck, dev, base=ck is None)
    log(f"evaluating {what} on {getattr(cfg.data, split)}")
    with torch.no_grad():
        out = for_config(cfg).load("metrics")(cfg, tok, model, dev, split, log)
    return {"split": split, "model": what, **out}


def sft_metrics(cfg, tok, model, dev, split, log):
    from .batches import epoch_plan, make_batch
    from .data import load_sft
    from .masks import IGNORE
    from .models import final_hidden
    from .sft import lm_loss

    examples, report = load_sft(getattr(cfg.data, split), tok, cfg.data)
    log(report.summary())
    plan = epoch_plan([len(e.input_ids) for e in examples], packing=cfg.data.packing,
                      micro_batch_size=cfg.train.micro_batch_size, seed=0, epoch=0)
    batches = [make_batch([examples[i] for i in g], cfg.data.packing, tok.pad_token_id) for g in plan]
    n = sum(b.trained for b in batches)
    if n == 0:
        raise ConfigError(f"data.{split} has no trained tokens to evaluate")
    loss, correct = 0.0, 0
    for b in batches:
        loss += float(lm_loss(model, b, n, dev))
        kwargs = b.model_kwargs(dev)
        labels = kwargs.pop("shift_labels").reshape(-1)
        hidden, head = final_hidden(model, **kwargs)
        hidden = hidden.reshape(-1, head.weight.shape[1])
        rows = (labels != IGNORE).nonzero().squeeze(1)
        for s in range(0, len(rows), 1024):  # the trained rows' logits, a chunk at a time (argmax: softcap is monotone)
            r = rows[s : s + 1024]
            logits = torch.nn.functional.linear(hidden[r.to(dev)], head.weight, head.bias)
            correct += int((logits.argmax(-1).cpu() == labels[r]).sum())
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 80.0)), "eval_token_accuracy": correct / n,
            "eval_trained_tokens": n, "eval_examples": len(examples)}


def dpo_metrics(cfg, tok, model, dev, split, log):
    from .dpo import DPOTask

    cfg = replace(cfg, dpo=replace(cfg.dpo, reference="live"))
    task = DPOTask(cfg, tok, log)
    if cfg.model.adapter and hasattr(model, "load_adapter"):
        task.setup(model, dev, Path(cfg.run.output_dir))
    pairs = task.eval_pairs if split == "eval" else task.pairs
    n = len(pairs)
    sums = {}
    for s in range(0, n, cfg.train.micro_batch_size):
        group = list(range(s, min(s + cfg.train.micro_batch_size, n)))
        loss, stats = task.loss(model, task.batch(pairs, group), n, dev, split)
        sums["loss"] = sums.get("loss", 0.0) + float(loss)
        for k, v in stats.items():  # micro-batch means, weighted by its pairs
            sums[k] = sums.get(k, 0.0) + float(v) * len(group) / n
    return {"eval_loss": sums.pop("loss"), **{f"eval_{k}": v for k, v in sums.items()}, "eval_pairs": n}


def grpo_metrics(cfg, tok, model, dev, split, log):
    from .grpo import GRPOTask, score

    task = GRPOTask(cfg, tok, log)
    task.setup(model, dev, None)
    prompts = task.load_prompts(cfg.data.eval) if cfg.data.eval else task.prompts
    torch.manual_seed(cfg.train.seed)
    return {**score(task, model, prompts), "eval_prompts": len(prompts),
            "eval_samples": len(prompts) * cfg.grpo.num_generations}


def table(metrics: dict) -> str:
    """The metrics as a two-column table."""
    rows = [(k, f"{v:.4f}" if isinstance(v, float) else str(v)) for k, v in metrics.items()]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
