"""GRPO on the shared training loop: sample a group of completions per prompt from the live policy,
score them with reward functions, turn the rewards into advantages within each group, and optimize
`fasttune.kernels.grpo_loss`.

- Generation: all completions of a micro-batch at once, stopping at the end-of-turn token, from a
  merged dense copy of the policy refreshed after each optimizer step, or from the live (4-bit)
  model; transformers' generate with a dynamic or static KV cache, or its continuous batching
  (fasttune/rollout.py; `grpo.rollout_weights`, `grpo.generation`).
- Rewards: weighted sum of the reward functions (fasttune/rewards.py); advantages from them by
  `grpo.advantage` (fasttune/advantages.py: grpo, rloo, reinforce++, reinforce++_baseline) - a group
  whose rewards are all equal gets advantage 0. Every reward function is tried on a few samples first.
- num_iterations > 1: the same samples serve that many optimizer steps, their log-probs at
  sampling time (`old_logps`) anchoring the clipped ratio.
- beta > 0: the reference is the base with the adapter off; its log-probs are taken once per sample.
  The KL goes into the loss, or for reinforce++ into the per-token reward (then the sampling
  policy's log-probs are taken too).
"""

import random
import time
from dataclasses import dataclass

import torch

from fasttune.kernels import grpo_loss, linear_logprobs
from fasttune.kernels.grpo import PER_TOKEN_COUNT

from .advantages import PER_TOKEN, compute_advantages
from .config import ConfigError
from .data import listed
from .masks import TemplateError, chat_text, stop_token_ids
from .prompts import left_pad, read_prompts
from .sources import DataError
from .models import final_hidden
from .prefix_sharing import available, check_received, given_groups, shared_layout
from .rewards import call_reward, load_reward


def _sharded(module) -> bool:
    """Under FSDP2 every rank must run the same number of decoding steps (each gathers shards)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


@dataclass
class Rollout:
    """One micro-batch of samples: prompts × generations (n rows), with everything the loss needs.
    `GRPOTask.sample` fills the samples and rewards; `_rollout` then the log-probs and advantages
    (PPOTask's also the critic's values and returns)."""

    input_ids: torch.Tensor  # [n, P + C]: the prompts, left-padded, then the completions
    attention_mask: torch.Tensor  # [n, P + C]
    prompt_len: int  # P
    completion_ids: torch.Tensor  # [n, C]
    completion_mask: torch.Tensor  # [n, C] bool: the trained tokens, through the end-of-turn token
    rewards: torch.Tensor  # [n] the weighted total
    raw: torch.Tensor  # [n, rewards]: each reward's value, NaN where one does not apply
    truncated: torch.Tensor  # [n] bool: no end-of-turn token within max_completion_len
    lengths: torch.Tensor  # [n] completion tokens through the end of turn
    gen_time: float  # seconds sampling
    tokens: int  # prompt and completion tokens attended
    trained: int  # completion tokens in the loss
    advantages: torch.Tensor | None = None  # [n], or [n, C] for per-token estimators
    old_logps: torch.Tensor | None = None  # [n, C] at sampling time (num_iterations > 1, PPO)
    ref_logps: torch.Tensor | None = None  # [n, C] under the reference (beta > 0)
    ref_time: float = 0.0  # seconds on log-probs after sampling
    fresh: bool = True  # no step has used it yet: its timings are still to report
    returns: torch.Tensor | None = None  # PPO: [n, C] the critic's targets
    values: torch.Tensor | None = None  # PPO: [n, C] the critic's values at sampling time
    kl_sum: torch.Tensor | None = None  # PPO: [n] each sequence's KL to the reference


class GRPOTask:
    name = "grpo"
    panels = (("GRPO mean reward", None), ("completion length", ["completion_len"]))
    timings = ("generation_s", "reference_s")  # sampling and reference log-probs, inside each step
    run = None  # set by the loop: sampling goes through the wrapped (DDP, FSDP2) model

    def __init__(self, cfg, tok, log, dist=None):
        self.cfg, self.tok, self.g, self.log = cfg, tok, cfg.grpo, log
        self.share = False  # prefix sharing in the reference and training forwards: decided in setup
        world = dist.world if dist else 1
        g = cfg.grpo
        if not cfg.data.train:
            raise ConfigError("data.train is empty: set it to a JSON or JSONL file of prompts")
        if cfg.model.finetune == "full" and g.beta > 0:
            raise ConfigError("grpo.beta > 0 needs an adapter to switch off for the reference; use finetune = \"lora\"")
        self.funcs = [(spec, load_reward(spec)) for spec in g.reward_funcs]
        if g.reward_models:  # trained reward models score after the functions, on this process's device
            from .models import device
            from .reward import RewardModel

            self.funcs += [(f"model:{p}", RewardModel(p, dist.device if dist else device())) for p in g.reward_models]
        if not self.funcs:
            raise ConfigError("grpo.reward_funcs and grpo.reward_models are empty: name at least one reward")
        self.weights = list(g.reward_weights) or [1.0] * len(self.funcs)
        if len(self.weights) != len(self.funcs):
            raise ConfigError(f"grpo.reward_weights has {len(self.weights)} values for {len(self.funcs)} rewards "
                              "(grpo.reward_funcs, then grpo.reward_models)")
        self.prompts = self.load_prompts(cfg.data.train, log)
        log(f"{cfg.data.train}: {len(self.prompts)} prompts; {g.num_generations} completions each, "
            f"{g.prompts_per_step} prompts per micro-batch; rewards: " +
            ", ".join(f"{w} × {s}" for (s, _), w in zip(self.funcs, self.weights)))
        self._check_rewards()
        if g.loss_type == "cispo" and g.epsilon_high < 1:
            log(f"warning: grpo.epsilon_high = {g.epsilon_high} with loss_type = \"cispo\" caps every importance "
                "weight below 1 (for cispo it is the cap itself; 5.0 is the advised value)")
        t = cfg.train

        # one optimizer step takes grad_accum × world micro-batches; with num_iterations > 1 the
        # step's samples serve that many steps in a row (TRL's generation batch)
        per_step = t.grad_accum * world

        def plan(epoch):
            order = list(range(len(self.prompts)))
            random.Random(f"{t.seed}-{epoch}").shuffle(order)
            groups = [(epoch, k, order[i : i + g.prompts_per_step])
                      for k, i in enumerate(range(0, len(order), g.prompts_per_step))]
            blocks = [groups[i : i + per_step] for i in range(0, len(groups), per_step)]
            return [item for block in blocks for _ in range(g.num_iterations) for item in block]

        from .batches import Stream

        self.stream = Stream(plan, self._rollout_for)
        self._cache, self._cache_size = {}, t.grad_accum
        self.model = self.dev = self.run = self.eval_prompts = self.stops = self.rollouts = None  # set by setup()

    # ---- data and rewards -----------------------------------------------------------------------

    def load_prompts(self, path, log=None):
        """The prompts of `path`, rendered with the generation prompt. A prompt the chat template
        refuses is skipped and counted; one over max_prompt_len keeps its end and is counted."""
        out, skipped, cut = [], [], 0
        for p in read_prompts(path, self.cfg.data):
            where, rec, msgs = p.where, p.record, p.messages
            try:
                text = chat_text(self.tok, msgs, add_generation_prompt=True, where=where)
            except TemplateError as e:
                skipped.append(str(e))
                continue
            ids = self.tok(text, add_special_tokens=False)["input_ids"]
            cut += len(ids) > self.g.max_prompt_len
            columns = {k: v for k, v in rec.items() if k not in ("prompt", "messages")}
            conversational = not isinstance(rec.get("prompt"), str)  # messages, as TRL calls such prompts
            # reward functions get what TRL passes them: the messages, or the prompt string as written
            out.append({"ids": ids[-self.g.max_prompt_len:], "text": text, "messages": msgs,
                        "raw": msgs if conversational else rec["prompt"], "conversational": conversational,
                        "columns": columns, "where": where})
        if log and (skipped or cut):
            log(f"{path}: {cut} prompts over grpo.max_prompt_len = {self.g.max_prompt_len} keep their last tokens; "
                f"{len(skipped)} prompts skipped" + (":" + listed(skipped) if skipped else ""))
        if not out:
            raise DataError(f"{path}: no usable prompt" + (f" ({len(skipped)} skipped: {skipped[0]})" if skipped else ""))
        keys = set(out[0]["columns"])
        for p in out:
            if set(p["columns"]) != keys:
                raise DataError(f"{p['where']}: its columns {sorted(p['columns'])} differ from the first record's "
                                f"{sorted(keys)}; every record needs the same fields")
        return out

    def _check_rewards(self):
        """Call every reward function on a few prompts (with a placeholder completion) before training."""
        sample = self.prompts[:2]
        columns = {k: [p["columns"][k] for p in sample] for k in sample[0]["columns"]}
        self.rewards(sample, ["Answer: 0"] * len(sample), columns, [[0]] * len(sample))

    def rewards(self, prompts, completions, columns, completion_ids):
        """[n, len(funcs)] raw rewards and [n] weighted total. The functions are called as TRL's
        GRPOTrainer calls them: prompts and completions as message lists when the prompts are
        conversational (completions as [{"role": "assistant", "content": ...}]), else as written, the other
        columns and `completion_ids` as keyword arguments."""
        prompts_in = [p["raw"] for p in prompts]
        if prompts[0]["conversational"]:
            completions_in = [[{"role": "assistant", "content": c}] for c in completions]
        else:
            completions_in = completions
        columns = {**columns, "completion_ids": completion_ids}
        per = [call_reward(fn, spec, prompts_in, completions_in, columns) for spec, fn in self.funcs]
        raw = torch.tensor(per, dtype=torch.float32).T  # NaN where a function returned None (not applicable)
        return raw, raw.nan_to_num(0.0) @ torch.tensor(self.weights, dtype=torch.float32)  # TRL's nansum

    def advantages(self, total, mask=None, sample_logps=None, ref_logps=None):
        """Advantages from [P * G] rewards grouped by prompt: [P * G], or [P * G, C] for reinforce++
        (which needs the completion mask, and with beta > 0 the sampling and reference log-probs)."""
        g = self.g
        return compute_advantages(g.advantage, total, g.num_generations, g.scale_rewards, mask=mask,
                                  sample_logps=sample_logps, ref_logps=ref_logps, beta=g.beta)

    # ---- sampling -------------------------------------------------------------------------------

    def setup(self, model, dev, run_dir, dist=None):
        from .models import compute_dtype
        from .rollout import Rollouts

        self.model, self.dev = model, dev
        self.share = self.cfg.data.prefix_sharing and available(model)
        self.stops = stop_token_ids(self.tok, model)  # eos and the template's end of turn
        self.rollouts = Rollouts(model, compute_dtype(self.cfg.model.compute_dtype, dev), dev,
                                 weights=self.g.rollout_weights, engine=self.g.generation, log=self.log,
                                 sharded=dist is not None and dist.mode == "fsdp")

    def _rollout_for(self, item):
        epoch, k, group = item
        key = (epoch, k)
        if key not in self._cache:  # keep this rank's rollouts of the current step only
            self._cache = dict(list(self._cache.items())[-(self._cache_size - 1):]) if self._cache_size > 1 else {}
            self._cache[key] = self.rollout([self.prompts[i] for i in group])
        return self._cache[key]

    def rollout(self, prompts):
        """Sample, score and take reference log-probs for `prompts`: one forward of the runner
        (DDP, FSDP2) when training, so FSDP2's shards are gathered for it."""
        if self.run is None:
            return self._rollout(self.model, prompts)
        return self.run(self._rollout, prompts)

    @torch.no_grad()
    def _rollout(self, model, prompts):
        g = self.g
        batch = self.sample(model, prompts)
        t1 = time.perf_counter()
        kl_in_reward = g.advantage in PER_TOKEN and g.beta > 0
        sample_logps = self.logps(model, batch).cpu() if g.num_iterations > 1 or kl_in_reward else None
        if g.num_iterations > 1:
            batch.old_logps = sample_logps
        if g.beta > 0:
            with model.disable_adapter():
                batch.ref_logps = self.logps(model, batch).cpu()
        batch.ref_time = time.perf_counter() - t1
        batch.advantages = self.advantages(batch.rewards, batch.completion_mask, sample_logps, batch.ref_logps)
        return batch

    @torch.no_grad()
    def sample(self, model, prompts):
        """`num_generations` completions of each prompt, scored: a Rollout without advantages or log-probs."""
        tok, g, dev = self.tok, self.g, self.dev
        G = g.num_generations
        t0 = time.perf_counter()
        ids, mask = left_pad([p["ids"] for p in prompts], tok.pad_token_id, repeat=G)  # each prompt G times
        P = ids.shape[1]
        was_training = model.training
        model.eval()
        from .rollout import Sampling

        comp = self.rollouts.generate(model, ids.to(dev), mask.to(dev), Sampling(
            g.max_completion_len, g.temperature, g.top_p, self.stops, tok.pad_token_id, synced_gpus=_sharded(self.run)))
        if was_training:
            model.train()
        C = comp.shape[1]
        is_eos = torch.isin(comp, torch.tensor(self.stops))
        ended = is_eos.any(1)
        first_eos = torch.where(ended, is_eos.int().argmax(1), torch.full((len(comp),), C))
        cmask = torch.arange(C)[None, :] <= first_eos[:, None]  # through the end-of-turn token
        truncated = ~ended
        loss_mask = cmask & ~truncated[:, None] if g.mask_truncated_completions else cmask
        gen_time = time.perf_counter() - t0

        texts = [tok.decode(c[: int(first_eos[i])].tolist(), skip_special_tokens=True) for i, c in enumerate(comp)]
        columns = {k: [p["columns"][k] for p in prompts for _ in range(G)] for k in prompts[0]["columns"]}
        ids_out = [c[: int(first_eos[i])].tolist() for i, c in enumerate(comp)]
        raw, total = self.rewards([p for p in prompts for _ in range(G)], texts, columns, ids_out)

        full = torch.cat([ids, comp], 1)
        attn = torch.cat([mask, cmask.long()], 1)
        return Rollout(input_ids=full, attention_mask=attn, prompt_len=P, completion_ids=comp, completion_mask=loss_mask,
                       advantages=None, rewards=total, raw=raw, truncated=truncated, lengths=cmask.sum(1),
                       gen_time=gen_time, tokens=int(attn.sum()), trained=int(loss_mask.sum()),
                       old_logps=None, ref_logps=None, ref_time=0.0, fresh=True)

    def _hidden(self, model, batch):
        """The final hidden states [n, C, H] that predict the completion tokens, and the head."""
        if self.share:
            return self._shared_hidden(model, batch)
        attn = batch.attention_mask.to(self.dev)
        pos = (attn.cumsum(-1) - 1).clamp_min(0)  # left-padded prompts: positions as generate gives them
        hidden, head = final_hidden(model, input_ids=batch.input_ids.to(self.dev), attention_mask=attn, position_ids=pos)
        P, C = batch.prompt_len, batch.completion_ids.shape[1]
        return hidden[:, P - 1 : P - 1 + C], head

    def _shared_hidden(self, model, batch):
        """As _hidden, with each prompt run once for the completions of its group (prefix sharing):
        one packed row of prompt, completion 1, completion 2, ..., no padding."""
        P, C = batch.prompt_len, batch.completion_ids.shape[1]
        mask = batch.attention_mask.bool()
        prompts = [row[:P][m[:P]].tolist() for row, m in zip(batch.input_ids, mask)]
        lengths = batch.lengths.tolist()
        seqs = [p + c[:n] for p, c, n in zip(prompts, batch.completion_ids.tolist(), lengths)]
        groups, start = [], 0  # rows of the same prompt are neighbours (a group's G completions)
        for i in range(1, len(seqs) + 1):
            if i == len(seqs) or prompts[i] != prompts[start]:
                groups.append(list(range(start, i)))
                start = i
        layout = shared_layout(seqs, given_groups(seqs, [len(p) - 1 for p in prompts], groups))
        hidden, head = final_hidden(model, **layout.model_kwargs(self.dev))
        if layout.segment_ids.any():
            check_received()
        # the rows that predict completion token t of sequence i: its position len(prompt) - 1 + t
        t = torch.arange(C)[None, :]
        at = (torch.tensor([len(p) - 1 for p in prompts])[:, None] + t).clamp(max=layout.rows.shape[1] - 1)
        rows = layout.rows.gather(1, at).where(t < torch.tensor(lengths)[:, None], 0)
        return hidden[0][rows.to(hidden.device)], head

    def logps(self, model, batch):
        """The completion tokens' log-probs [n, C] under `model` (no grad)."""
        with torch.no_grad():
            h, head = self._hidden(model, batch)
            labels = torch.where(batch.completion_mask, batch.completion_ids, -100)
            return linear_logprobs(h, head.weight, labels, bias=head.bias, softcap=head.softcap,
                                   temperature=self.g.temperature)

    # ---- the loss -------------------------------------------------------------------------------

    def count(self, batch):
        return batch.trained if self.g.loss_type in PER_TOKEN_COUNT else len(batch.advantages)

    def loss(self, model, batch, n_items, dev):
        g = self.g
        h, head = self._hidden(model, batch)
        loss, s = grpo_loss(
            h, head.weight, batch.completion_ids, batch.completion_mask, batch.advantages,
            old_logps=batch.old_logps, ref_logps=batch.ref_logps, epsilon_low=g.epsilon_low,
            beta=0.0 if g.advantage in PER_TOKEN else g.beta,  # reinforce++ has the KL in its reward
            epsilon_high=g.epsilon_high, loss_type=g.loss_type, temperature=g.temperature, num_items=n_items,
            importance_sampling_level=g.importance_sampling_level,
            max_completion_len=g.max_completion_len, bias=head.bias, softcap=head.softcap,
        )
        G = g.num_generations
        r = batch.rewards.view(-1, G)
        stats = {
            "reward": batch.rewards.mean(), "reward_std": batch.rewards.std() if len(batch.rewards) > 1 else 0.0,
            "frac_equal_groups": (r.std(1, correction=0) < 1e-6).float().mean(),
            "advantage_abs": _mean_abs(batch.advantages, batch.completion_mask),
            "completion_len": batch.lengths.float().mean(), "completion_len_max": batch.lengths.max().float(),
            "clipped_completions": batch.truncated.float().mean(),
            "kl": s.kl, "entropy": s.entropy, "clip_ratio_low": s.clip_ratio_low, "clip_ratio_high": s.clip_ratio_high,
            "clip_ratio_region": s.clip_ratio_region,
            # sampling time counts on the step that sampled, not on the num_iterations - 1 that reuse it
            "generation_s": batch.gen_time if batch.fresh else 0.0, "reference_s": batch.ref_time if batch.fresh else 0.0,
        }
        batch.fresh = False
        for (spec, _), col in zip(self.funcs, batch.raw.T):
            stats[f"reward/{spec}"] = col.nanmean() if not col.isnan().all() else col.new_zeros(())  # None: not applicable
        return loss, stats

    def evaluate(self, model, dev, autocast):
        """On `data.eval`'s prompts: each reward function's mean over `num_generations` samples per
        prompt, the weighted total and the completion length (None without data.eval)."""
        if not self.cfg.data.eval:
            return None
        if self.eval_prompts is None:
            self.eval_prompts = self.load_prompts(self.cfg.data.eval)
        return score(self, model, self.eval_prompts)


def _mean_abs(adv, mask):
    """Mean |advantage| over completions ([N]) or over completion tokens ([N, C])."""
    if adv.dim() == 1:
        return adv.abs().mean()
    m = mask.float()
    return (adv.abs() * m).sum() / m.sum().clamp_min(1)


def score(task, model, prompts) -> dict:
    """Mean rewards of `num_generations` samples per prompt, as eval_* metrics."""
    raw, total, lengths = [], [], []
    for s in range(0, len(prompts), task.g.prompts_per_step):
        b = task.sample(model, prompts[s : s + task.g.prompts_per_step])
        raw.append(b.raw)
        total.append(b.rewards)
        lengths.append(b.lengths.float())
    raw = torch.cat(raw)
    out = {"eval_reward": float(torch.cat(total).mean())}
    out.update({f"eval_reward/{spec}": float(col.nanmean()) for (spec, _), col in zip(task.funcs, raw.T)})
    out["eval_completion_len"] = float(torch.cat(lengths).mean())
    return out


def train_grpo(cfg, log=print) -> dict:
    from .train import train

    return train(cfg, GRPOTask, log)


def check(cfg, tok):
    """`fasttune check`: the prompts, and every reward function tried on them."""
    task = GRPOTask(cfg, tok, print)  # reads the prompts and tries every reward function
    p = task.prompts[0]
    print(f"  first prompt ({p['where']}), as the model sees it:\n    " + p["text"].replace("\n", "\n    "))
    print("ok: the config, the prompts and the reward functions are valid")


def metrics(cfg, tok, model, dev, split, log):
    """`fasttune eval`: each reward function's mean over `num_generations` samples per prompt, and their
    weighted total."""
    task = GRPOTask(cfg, tok, log)
    task.setup(model, dev, None)
    prompts = task.load_prompts(cfg.data.eval) if cfg.data.eval else task.prompts
    torch.manual_seed(cfg.train.seed)
    return {**score(task, model, prompts), "eval_prompts": len(prompts),
            "eval_samples": len(prompts) * cfg.grpo.num_generations}
