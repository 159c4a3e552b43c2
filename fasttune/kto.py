"""KTO on the shared training loop, with `fasttune.kernels.kto_loss`: no full logits.

- Data: unpaired completions labelled desirable or not (fasttune/unpaired.py).
- Batches: a micro-batch of B completions is one padded forward with gradients; its B mismatched
  KL sequences (prompt i + completion i-1, as TRL's KTOTrainer builds them) are run without.
- Reference: the base model with the adapter switched off (or, from `model.adapter`, that
  adapter loaded a second time and frozen), as DPO does.
- Reference point z0: the KL sequences' mean log-ratio (policy - reference) in the micro-batch,
  clamped at 0 and detached.
- Loss: normalized by the completions of the whole accumulated batch.
"""

import contextlib

import torch

from fasttune.kernels import linear_logprobs
from fasttune.kernels.kto import kto_kl, kto_loss

from .batches import UnpairedBatch, padded_batch
from .config import ConfigError
from .models import final_hidden
from .unpaired import load_unpaired, mismatched


class KTOTask:
    name = "kto"
    panels = (("KTO rewards", ["rewards_chosen", "rewards_rejected"]), ("KTO reward margin", ["reward_margin"]))
    timings = ()
    run = None

    def __init__(self, cfg, tok, log, dist=None):
        self.cfg, self.tok, self.k = cfg, tok, cfg.kto
        if not cfg.data.train:
            raise ConfigError("data.train is empty: set it to a JSON or JSONL file of prompt/completion/label records")
        if cfg.model.finetune == "full":
            raise ConfigError('KTO\'s reference is the base with the adapter switched off: model.finetune = "full" '
                              'has none; use model.finetune = "lora"')
        if self.k.beta <= 0:
            raise ConfigError(f"kto.beta must be > 0, got {self.k.beta}")
        if self.k.loss_type == "kto" and cfg.train.micro_batch_size < 2:
            raise ConfigError("kto.loss_type = \"kto\" estimates the KL term from the other completions of the "
                              "micro-batch: train.micro_batch_size must be >= 2")
        self.items, report = load_unpaired(cfg.data.train, tok, cfg.data, self.k)
        log(report.summary())
        self.eval_items = load_unpaired(cfg.data.eval, tok, cfg.data, self.k)[0] if cfg.data.eval else None
        from .batches import Stream, shuffled_groups

        plan = shuffled_groups(len(self.items), cfg.train.micro_batch_size, cfg.train.seed)
        self.stream = Stream(plan, lambda g: self.batch(self.items, g))

    def batch(self, items, group):
        chosen = [items[i] for i in group]
        b = padded_batch([it.example for it in chosen], self.tok.pad_token_id)
        kl = padded_batch(mismatched(chosen, self.k.max_len), self.tok.pad_token_id) if self.k.loss_type == "kto" else None
        return UnpairedBatch(**vars(b), desirable=torch.tensor([it.desirable for it in chosen]), kl=kl)

    def count(self, batch):
        return len(batch.desirable)

    @contextlib.contextmanager
    def reference(self, model):
        """Run the model as the reference inside this block."""
        if not hasattr(model, "disable_adapter"):
            yield  # evaluating a base model: it is its own reference
        elif self.cfg.model.adapter:
            model.set_adapter("reference")
            try:
                yield
            finally:
                model.set_adapter("default")
        else:
            with model.disable_adapter():
                yield

    def setup(self, model, dev, run_dir=None, dist=None):
        if self.cfg.model.adapter and hasattr(model, "load_adapter"):
            model.load_adapter(self.cfg.model.adapter, adapter_name="reference", is_trainable=False)
            model.set_adapter("default")

    def _hidden(self, model, batch, dev):
        return final_hidden(model, input_ids=batch.input_ids.to(dev), attention_mask=batch.attention_mask.to(dev))

    def sequence_logps(self, model, batch, dev):
        """Summed label log-probs of each sequence [B]."""
        hidden, head = self._hidden(model, batch, dev)
        return linear_logprobs(hidden, head.weight, batch.shift_labels, bias=head.bias, softcap=head.softcap).sum(-1)

    def loss(self, model, batch, n_items, dev, split="train"):
        kl = None
        with torch.no_grad():
            policy_kl = self.sequence_logps(model, batch.kl, dev) if batch.kl is not None else None
            with self.reference(model):
                ref = self.sequence_logps(model, batch, dev)
                if batch.kl is not None:
                    kl = kto_kl(policy_kl, self.sequence_logps(model, batch.kl, dev))
        hidden, head = self._hidden(model, batch, dev)
        k = self.k
        loss, s = kto_loss(hidden, head.weight, batch.shift_labels.view(hidden.shape[:2]), batch.desirable,
                           ref_logps=ref, kl=kl, beta=k.beta, loss_type=k.loss_type,
                           desirable_weight=k.desirable_weight, undesirable_weight=k.undesirable_weight,
                           num_items=n_items, bias=head.bias, softcap=head.softcap)
        stats = {"rewards_chosen": s.rewards_chosen, "rewards_rejected": s.rewards_rejected,
                 "reward_accuracy": s.reward_accuracy, "reward_margin": s.rewards_chosen - s.rewards_rejected,
                 "kl": s.kl, "logps": s.logps.detach().mean()}
        return loss, stats

    def evaluate(self, model, dev, autocast):
        if not self.eval_items:
            return None
        return {f"eval_{k}" if k != "loss" else "eval_loss": v for k, v in self.metrics(model, self.eval_items, dev, autocast).items()}

    def metrics(self, model, items, dev, autocast=contextlib.nullcontext):
        """The loss and the statistics over `items`, in micro-batches in order (micro-batch means
        weighted by their completions)."""
        model.eval()
        n, sums = len(items), {}
        with torch.no_grad(), autocast():
            for s in range(0, n, self.cfg.train.micro_batch_size):
                group = list(range(s, min(s + self.cfg.train.micro_batch_size, n)))
                loss, stats = self.loss(model, self.batch(items, group), n, dev, "eval")
                sums["loss"] = sums.get("loss", 0.0) + float(loss)
                for key, v in stats.items():
                    sums[key] = sums.get(key, 0.0) + float(v) * len(group) / n
        model.train()
        return sums


def train_kto(cfg, log=print) -> dict:
    from .train import train

    return train(cfg, KTOTask, log)


def metrics(cfg, tok, model, dev, split, log):
    """`fasttune eval`'s held-out metrics."""
    task = KTOTask(cfg, tok, log)
    if cfg.model.adapter:
        task.setup(model, dev)
    items = task.eval_items if split == "eval" else task.items
    sums = task.metrics(model, items, dev)
    return {"eval_loss": sums.pop("loss"), **{f"eval_{k}": v for k, v in sums.items()}, "eval_completions": len(items)}


def check(cfg, tok):
    """`fasttune check`: the labelled completions of data.train and data.eval."""
    from .unpaired import load_unpaired

    for name in ("train", "eval"):
        if getattr(cfg.data, name):
            items, report = load_unpaired(getattr(cfg.data, name), tok, cfg.data, cfg.kto)
            print(f"[{name}] " + report.summary())
    print("ok: the config and the data are valid")
