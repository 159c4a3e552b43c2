"""Reward models on the shared training loop: `fasttune reward config.toml`.

- Model: the base (4-bit or not) with LoRA, plus a scalar head `score` = Linear(hidden, 1, no bias),
  trainable and saved with the adapter through PEFT's modules_to_save (task type SEQ_CLS): the
  checkpoint loads in transformers as AutoModelForSequenceClassification(num_labels=1,
  pad_token_id=...) + PeftModel.from_pretrained and gives the same scores.
- Score: the head on the final hidden state of each sequence's last token, found as transformers'
  sequence classifiers find it (the rightmost token that is not the pad token). No logits.
- Loss (TRL's RewardTrainer): Bradley-Terry, -log σ(r_chosen - r_rejected - margin), with an optional
  per-pair `margin` column, plus center_rewards_coefficient · mean((r_chosen + r_rejected)²);
  normalized by the pairs of the whole accumulated batch.
- Data: the preference pairs DPO reads (fasttune/preference.py); chosen and rejected in one padded
  forward of 2B sequences.
- `reward_model(path)` loads a trained run as a scorer for GRPO (`grpo.reward_models`).
"""

import contextlib
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from . import lora_layers
from .batches import padded_batch, pair_batch
from .config import ConfigError
from .masks import TemplateError, tokenize_conversation
from .preference import load_pairs


def attach_score(lm, std=None):
    """A fresh scalar head `score` on the causal LM `lm` (fp32), initialised as transformers does."""
    H = lm.config.hidden_size
    lm.score = torch.nn.Linear(H, 1, bias=False, device=lm.get_input_embeddings().weight.device)
    torch.nn.init.normal_(lm.score.weight, std=std or getattr(lm.config, "initializer_range", 0.02))
    return lm.score


def load_reward_model(cfg, dev, ck=None, trainable=True):
    """The base of `cfg` with fasttune's kernels, a `score` head and LoRA (a new adapter, or the
    checkpoint `ck`'s)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    from .models import load_model

    lm = load_model(cfg, dev, lora=False, quiet=True)
    attach_score(lm)
    if ck is not None:
        model = PeftModel.from_pretrained(lm, str(ck), is_trainable=trainable)
    else:
        lora = cfg.lora
        model = get_peft_model(lm, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                              target_modules=lora.target_modules, use_rslora=lora.rslora,
                                              task_type="SEQ_CLS", modules_to_save=["score"]))
    lora_layers.apply(model)
    return model


def last_token(input_ids, pad_id):
    """Index of each row's last token, as transformers' *ForSequenceClassification find it."""
    non_pad = (input_ids != pad_id).to(torch.int32)
    return (torch.arange(input_ids.shape[-1], device=input_ids.device, dtype=torch.int32) * non_pad).argmax(-1)


def scores(model, input_ids, attention_mask, pad_id):
    """[B] scalar rewards: the score head on the final hidden state at each sequence's last token."""
    from fasttune.kernels.hf import head_of

    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = head_of(model).base(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    idx = last_token(input_ids, pad_id).to(hidden.device)
    last = hidden[torch.arange(len(idx), device=hidden.device), idx]  # [B, H]: the only rows the head sees
    return lm.score(last.to(torch.float32)).squeeze(-1)


def bradley_terry(r_chosen, r_rejected, margin=None, center=0.0, num_pairs=None):
    """TRL's reward loss, Σ over pairs / num_pairs (default: the pairs given)."""
    d = r_chosen - r_rejected
    losses = -F.logsigmoid(d if margin is None else d - margin.to(d))
    if center:
        losses = losses + center * (r_chosen + r_rejected) ** 2
    return losses.sum() / (len(d) if num_pairs is None else num_pairs)


class RewardTask:
    name = "reward"
    panels = (("reward model accuracy", ["accuracy"]), ("reward model margin", ["margin"]))
    timings = ()
    run = None

    def __init__(self, cfg, tok, log, dist=None):
        self.cfg, self.tok, self.r = cfg, tok, cfg.reward
        if not cfg.data.train:
            raise ConfigError("data.train is empty: set it to a JSON or JSONL file of preference pairs")
        if cfg.model.finetune != "lora" or cfg.model.adapter:
            raise ConfigError('a reward model is trained as LoRA + a score head from the base model: set '
                              'model.finetune = "lora" and leave model.adapter empty')
        self.pairs, report = load_pairs(cfg.data.train, tok, cfg.data, self.r)
        log(report.summary())
        self.eval_pairs = load_pairs(cfg.data.eval, tok, cfg.data, self.r)[0] if cfg.data.eval else None
        from .batches import Stream, shuffled_groups

        plan = shuffled_groups(len(self.pairs), cfg.train.micro_batch_size, cfg.train.seed)
        self.stream = Stream(plan, lambda g: self.batch(self.pairs, g))

    def setup(self, model, dev, run_dir=None, dist=None):
        """Nothing to prepare: the model comes with its head (TaskSpec.model)."""

    def batch(self, pairs, group):
        return pair_batch(pairs, group, self.tok.pad_token_id)

    def count(self, batch):
        return batch.pairs

    def loss(self, model, batch, n_pairs, dev, split="train"):
        r = scores(model, batch.input_ids.to(dev), batch.attention_mask.to(dev), self.tok.pad_token_id)
        B = batch.pairs
        rc, rr = r[:B], r[B:]
        loss = bradley_terry(rc, rr, batch.margin, self.r.center_rewards_coefficient, n_pairs)
        d = (rc - rr).detach()
        stats = {"accuracy": (d > 0).float().mean(), "margin": d.mean(), "rewards_chosen": rc.detach().mean(),
                 "rewards_rejected": rr.detach().mean()}
        return loss, stats

    def metrics(self, model, pairs, dev, autocast=contextlib.nullcontext):
        """Loss, accuracy and mean margin over `pairs`, in micro-batches (means weighted by pairs)."""
        model.eval()
        n, sums = len(pairs), {}
        with torch.no_grad(), autocast():
            for s in range(0, n, self.cfg.train.micro_batch_size):
                group = list(range(s, min(s + self.cfg.train.micro_batch_size, n)))
                loss, stats = self.loss(model, self.batch(pairs, group), n, dev)
                sums["loss"] = sums.get("loss", 0.0) + float(loss)
                for k, v in stats.items():
                    sums[k] = sums.get(k, 0.0) + float(v) * len(group) / n
        model.train()
        return sums

    def evaluate(self, model, dev, autocast):
        if not self.eval_pairs:
            return None
        return {("eval_" + k): v for k, v in self.metrics(model, self.eval_pairs, dev, autocast).items()}


def train_reward(cfg, log=print) -> dict:
    from .train import train

    return train(cfg, RewardTask, log)


# ---- a trained reward model as a GRPO reward ----------------------------------------------------


class RewardModel:
    """A trained `fasttune reward` run, scoring (prompt, completion) texts in micro-batches. The text
    is rendered with the reward model's own chat template and tokenizer, whatever the policy's."""

    def __init__(self, path, dev, key="grpo.reward_models", batch_size=8):
        from .checkpoint import run_of
        from .models import load_tokenizer

        try:
            cfg, ck = run_of(str(path))
        except ConfigError as e:
            raise ConfigError(f"{key}: {path!r} is not a reward model ({e})") from None
        if cfg is None or not hasattr(cfg, "reward"):
            raise ConfigError(f"{key}: {path!r} is not a reward model: expected the run folder (or a checkpoint) of "
                              "`fasttune reward`" + ("" if cfg is None else f", got a {type(cfg).__name__} run"))
        self.path, self.dev, self.batch_size = str(path), dev, batch_size
        cfg = replace(cfg, train=replace(cfg.train, gradient_checkpointing=False))
        self.tok = load_tokenizer(cfg.model)
        self.model = load_reward_model(cfg, dev, Path(ck), trainable=False).eval()

    def _ids(self, prompt, completion):
        msgs = prompt + [{"role": "assistant", "content": completion}]
        try:
            return tokenize_conversation(self.tok, msgs, train_from=len(prompt))[0]
        except TemplateError:  # the template cannot mask it: the rendering is all a reward model needs
            return self.tok(self.tok.apply_chat_template(msgs, tokenize=False), add_special_tokens=False)["input_ids"]

    @torch.no_grad()
    def __call__(self, prompts, completions, **_):
        """One reward per completion, called as GRPO calls reward functions: prompts as strings or
        messages, completions as strings or [{"role": "assistant", "content": ...}]."""
        from .data import Example

        prompts = [[{"role": "user", "content": p}] if isinstance(p, str) else list(p) for p in prompts]
        completions = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
        out = []
        for s in range(0, len(prompts), self.batch_size):
            ex = [Example(self._ids(p, c), [], "") for p, c in zip(prompts[s : s + self.batch_size],
                                                                 completions[s : s + self.batch_size])]
            b = padded_batch([Example(e.input_ids, [-100] * len(e.input_ids), "") for e in ex], self.tok.pad_token_id)
            out += scores(self.model, b.input_ids.to(self.dev), b.attention_mask.to(self.dev),
                          self.tok.pad_token_id).float().cpu().tolist()
        return out


def metrics(cfg, tok, model, dev, split, log):
    """`fasttune eval`'s held-out metrics."""
    task = RewardTask(cfg, tok, log)
    pairs = task.eval_pairs if split == "eval" else task.pairs
    sums = task.metrics(model, pairs, dev)
    return {"eval_loss": sums.pop("loss"), **{f"eval_{k}": v for k, v in sums.items()}, "eval_pairs": len(pairs)}


def model_for_eval(cfg, ck, dev, *, base=False):
    """`fasttune eval`'s model: the trained LoRA and score head of checkpoint `ck`."""
    if base or ck is None:
        raise ConfigError("--adapter base: a reward model's base has no trained score head to evaluate")
    return load_reward_model(cfg, dev, ck, trainable=False).eval()


def check(cfg, tok):
    """`fasttune check`: the pairs of data.train and data.eval."""
    from .checks import check_pairs

    check_pairs(cfg, tok, cfg.reward)
