"""DPO on the shared training loop, with `fasttune.kernels.dpo_loss`: no full logits, neither the
policy's nor the reference's.

- Batches: a micro-batch of B pairs is one padded forward of 2B sequences, the B chosen first.
- Reference: by default the base model with the adapter switched off (no second copy of the
  weights). Starting from an SFT adapter (`model.adapter`), the reference is that adapter, frozen
  (loaded a second time as "reference"), and the policy a trainable copy. `dpo.reference =
  "precompute"` computes every reference log-prob once before training, with `linear_logprobs`
  under no_grad, and caches them in the run folder keyed by a hash of the data and the model.
- Loss: normalized by the pairs of the whole accumulated batch (`num_pairs`); with `sft_weight`,
  plus the mean NLL per token of the chosen responses (RPO).
- Reference-free losses (`loss_type` orpo, simpo, cpo: `fasttune.kernels.preference_loss`): no
  reference at all, so no reference forward, no precompute, no adapter switching. Their NLL term is
  each micro-batch's mean over its chosen tokens, weighted by its share of the pairs (as TRL's
  trainers with gradient accumulation).
"""

import contextlib
import hashlib
import json
from dataclasses import replace
from pathlib import Path

import torch

from fasttune.kernels import dpo_loss, linear_logprobs, preference_loss
from fasttune.kernels.preference import LOSS_TYPES as REFERENCE_FREE

from .batches import pair_batch
from .checkpoint import file_hash
from .config import ConfigError
from .models import final_hidden
from .prefix_sharing import available, padded_hidden
from .preference import load_pairs


class DPOTask:
    name = "dpo"
    panels = (("DPO reward accuracy", ["reward_accuracy"]), ("DPO reward margin", ["reward_margin"]))
    timings = ()
    run = None  # set by the loop; unused

    def __init__(self, cfg, tok, log, dist=None):
        self.cfg, self.tok, self.d = cfg, tok, cfg.dpo
        self.share = False  # prefix sharing: decided in setup, when the model is known
        if not cfg.data.train:
            raise ConfigError("data.train is empty: set it to a JSON or JSONL file of preference pairs")
        _check_reference_free(self.d)
        if cfg.model.finetune == "full" and self.d.reference == "live" and not self.reference_free:
            raise ConfigError('DPO with model.finetune = "full" has no adapter to switch off for the reference: '
                              'set dpo.reference = "precompute"')
        self.pairs, report = load_pairs(cfg.data.train, tok, cfg.data, self.d)
        log(report.summary())
        self.eval_pairs = load_pairs(cfg.data.eval, tok, cfg.data, self.d)[0] if cfg.data.eval else None
        from .batches import Stream, shuffled_groups

        plan = shuffled_groups(len(self.pairs), cfg.train.micro_batch_size, cfg.train.seed)
        self.stream = Stream(plan, lambda g: self.batch(self.pairs, g))
        self.ref = {}  # precomputed: split -> [n_pairs, 2] (chosen, rejected)

    def batch(self, pairs, group):
        return pair_batch(pairs, group, self.tok.pad_token_id)

    def count(self, batch):
        return len(batch.pair_ids)

    # ---- the reference ------------------------------------------------------------------------

    @contextlib.contextmanager
    def reference(self, model):
        """Run the model as the reference inside this block."""
        if self.cfg.model.finetune == "full" or not hasattr(model, "disable_adapter"):
            yield  # precompute (the model is still the initial one), or evaluating a base that is its own reference
        elif self.cfg.model.adapter:
            model.set_adapter("reference")
            try:
                yield
            finally:
                model.set_adapter("default")
        else:
            with model.disable_adapter():
                yield

    @property
    def reference_free(self):
        return self.d.loss_type in REFERENCE_FREE

    @property
    def averaged(self):
        """Sequence log-probs are averaged over tokens, not summed (dpo_loss's rule, as TRL's)."""
        return self.d.average_log_prob or self.d.loss_type == "ipo"

    def _hidden(self, model, batch, dev):
        if self.share:  # each pair's prompt once, for both responses
            B = batch.pairs
            return padded_hidden(model, batch.input_ids, batch.attention_mask, batch.shift_labels,
                                 [[i, B + i] for i in range(B)], dev)
        return final_hidden(model, input_ids=batch.input_ids.to(dev), attention_mask=batch.attention_mask.to(dev))

    def sequence_logps(self, model, batch, dev):
        """Per-sequence label log-probs [2B], summed (or averaged, as dpo_loss does)."""
        hidden, head = self._hidden(model, batch, dev)
        logp = linear_logprobs(hidden, head.weight, batch.shift_labels, bias=head.bias, softcap=head.softcap).sum(-1)
        if self.averaged:
            logp = logp / (batch.shift_labels != -100).sum(-1).clamp_min(1).to(logp.device)
        return logp

    def reference_logps(self, model, batch, dev, split="train"):
        if split in self.ref:
            r = self.ref[split][batch.pair_ids]
            return torch.cat([r[:, 0], r[:, 1]]).to(dev)
        with torch.no_grad(), self.reference(model):
            return self.sequence_logps(model, batch, dev)

    def setup(self, model, dev, run_dir, dist=None):
        self.share = self.cfg.data.prefix_sharing and available(model)
        if self.reference_free:
            return  # nothing to load or precompute
        if self.cfg.model.adapter and self.cfg.model.finetune == "lora":
            model.load_adapter(self.cfg.model.adapter, adapter_name="reference", is_trainable=False)
            model.set_adapter("default")
        if self.d.reference == "precompute":
            for split, pairs in (("train", self.pairs), ("eval", self.eval_pairs)):
                if pairs:
                    self.ref[split] = self._precompute(model, pairs, dev, Path(run_dir), split, dist)

    def _precompute(self, model, pairs, dev, run_dir, split, dist=None):
        """Each pair's reference log-probs, once: sharded over the ranks, summed back together, cached."""
        from .distributed import Dist

        dist = dist or Dist()
        c = self.cfg
        # what the reference log-probs depend on: the data, the reference model, and how they are summed
        key = json.dumps([file_hash(getattr(c.data, split)), c.model.path, c.model.adapter, c.model.load_in_4bit,
                          c.model.compute_dtype, c.data.format, c.data.roles, c.data.overlong, self.d.max_len,
                          self.d.max_prompt_len, self.averaged], default=str)
        path = run_dir / f"reference_logps-{split}-{hashlib.sha256(key.encode()).hexdigest()[:12]}.pt"
        if path.is_file():
            return torch.load(path)
        out = torch.zeros(len(pairs), 2, dtype=torch.float64)
        chunks = [list(range(s, min(s + 8, len(pairs)))) for s in range(0, len(pairs), 8)]
        model.eval()
        with torch.no_grad(), self.reference(model):
            for group in chunks[dist.rank :: dist.world]:  # this rank's share (before any sharding of the model)
                lp = self.sequence_logps(model, self.batch(pairs, group), dev).double().cpu()
                out[group, 0], out[group, 1] = lp[: len(group)], lp[len(group):]
        model.train()
        out = dist.sum(out).float()  # every pair was computed by exactly one rank
        if dist.main:
            tmp = path.with_suffix(".tmp")
            torch.save(out, tmp)
            tmp.replace(path)
        dist.barrier()
        return out

    # ---- the loss -----------------------------------------------------------------------------

    def loss(self, model, batch, n_pairs, dev, split="train"):
        if self.reference_free:
            return self.reference_free_loss(model, batch, n_pairs, dev)
        ref = self.reference_logps(model, batch, dev, split)
        hidden, head = self._hidden(model, batch, dev)
        d = self.d
        loss, s = dpo_loss(hidden, head.weight, batch.shift_labels.view(hidden.shape[:2]),
                           ref_logps=ref, beta=d.beta, loss_type=d.loss_type, label_smoothing=d.label_smoothing,
                           average_log_prob=d.average_log_prob, num_pairs=n_pairs, bias=head.bias,
                           softcap=head.softcap)
        if d.sft_weight:
            per_token = s.chosen_logps if self.averaged else s.chosen_logps / s.chosen_tokens.clamp_min(1)
            loss = loss + d.sft_weight * (-per_token).sum() / n_pairs
        stats = {"rewards_chosen": s.chosen_rewards.mean(), "rewards_rejected": s.rejected_rewards.mean(),
                 "reward_accuracy": s.reward_accuracy, "reward_margin": s.reward_margin,
                 "logps_chosen": s.chosen_logps.detach().mean(), "logps_rejected": s.rejected_logps.detach().mean()}
        return loss, stats

    def reference_free_loss(self, model, batch, n_pairs, dev):
        hidden, head = self._hidden(model, batch, dev)
        labels = batch.shift_labels.view(hidden.shape[:2])
        B = hidden.shape[0] // 2
        # NLL: this micro-batch's mean over chosen tokens, weighted by its share B / n_pairs of the pairs
        n_tok = float((labels[:B] != -100).sum()) * n_pairs / B  # host labels: no sync
        d = self.d
        loss, s = preference_loss(hidden, head.weight, labels, loss_type=d.loss_type, beta=d.beta,
                                  simpo_gamma=d.simpo_gamma, cpo_alpha=d.cpo_alpha, label_smoothing=d.label_smoothing,
                                  average_log_prob=d.average_log_prob, num_pairs=n_pairs, num_chosen_tokens=n_tok,
                                  bias=head.bias, softcap=head.softcap)
        stats = {"rewards_chosen": s.chosen_rewards.mean(), "rewards_rejected": s.rejected_rewards.mean(),
                 "reward_accuracy": s.reward_accuracy, "reward_margin": s.reward_margin,
                 "logps_chosen": s.chosen_logps.detach().mean(), "logps_rejected": s.rejected_logps.detach().mean(),
                 "nll_loss": s.nll * n_pairs / B}  # the micro-batch's own mean (the loop weights it by B / n_pairs)
        if s.log_odds_ratio is not None:
            stats |= {"log_odds_ratio": s.log_odds_ratio, "log_odds_chosen": s.log_odds_chosen}
        return loss, stats

    def evaluate(self, model, dev, autocast):
        if not self.eval_pairs:
            return None
        model.eval()
        total, n = 0.0, len(self.eval_pairs)
        with torch.no_grad(), autocast():
            for s in range(0, n, self.cfg.train.micro_batch_size):
                group = list(range(s, min(s + self.cfg.train.micro_batch_size, n)))
                total += float(self.loss(model, self.batch(self.eval_pairs, group), n, dev, "eval")[0])
        model.train()
        return total


def _check_reference_free(d):
    """Keys that mean nothing (or something else) for orpo, simpo and cpo: one clear line each."""
    if d.loss_type not in REFERENCE_FREE:
        return
    if d.reference != "live":
        raise ConfigError(f'dpo.loss_type = "{d.loss_type}" uses no reference model: remove dpo.reference = '
                          f'"{d.reference}"')
    if d.sft_weight:
        raise ConfigError(f'dpo.sft_weight is for DPO (RPO); with dpo.loss_type = "{d.loss_type}" the NLL term is '
                          + ("always on (ORPO)" if d.loss_type == "orpo" else "weighted by dpo.cpo_alpha")
                          + ": set dpo.sft_weight = 0")
    if d.loss_type == "orpo" and d.label_smoothing:
        raise ConfigError('dpo.label_smoothing is not part of ORPO: set it to 0, or use dpo.loss_type = "simpo" or "cpo"')


def train_dpo(cfg, log=print) -> dict:
    from .train import train

    return train(cfg, DPOTask, log)


def check(cfg, tok):
    """`fasttune check`: the pairs of data.train and data.eval, the first one marked."""
    from .checks import check_pairs

    check_pairs(cfg, tok, cfg.dpo)


def metrics(cfg, tok, model, dev, split, log):
    """`fasttune eval`: the DPO loss, reward accuracy and margin, log-probs and rewards, against the
    same reference as training."""
    cfg = replace(cfg, dpo=replace(cfg.dpo, reference="live"))
    task = DPOTask(cfg, tok, log)
    if cfg.model.adapter and hasattr(model, "load_adapter"):
        task.setup(model, dev, Path(cfg.run.output_dir))
    task.share = cfg.data.prefix_sharing and available(model)
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
