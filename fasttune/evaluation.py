"""`fasttune eval CONFIG.toml [--adapter RUN_OR_CHECKPOINT | --adapter base]`: measure a model on
held-out data, before and after training.

On `data.eval` (or `data.train`, saying so), with the config's model and the adapter given (the
last checkpoint of `run.output_dir` by default; `base` for the model before training):
- SFT: loss per trained token (what training logs as eval_loss), perplexity and token accuracy
  (the argmax equals the label) over trained tokens;
- DPO: the DPO loss, reward accuracy and margin, chosen and rejected log-probs and rewards, against
  the same reference as training (the base with the adapter off);
- GRPO: each reward function's mean over `num_generations` samples per prompt, and their weighted total;
- KTO, reward models, PPO: see their modules.
Each task's `metrics` function (in its own module, named by `TaskSpec.metrics`) measures; this
module picks the checkpoint, loads the model and prints the table.
"""

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


def table(metrics: dict) -> str:
    """The metrics as a two-column table."""
    rows = [(k, f"{v:.4f}" if isinstance(v, float) else str(v)) for k, v in metrics.items()]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
