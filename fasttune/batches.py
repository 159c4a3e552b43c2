"""Micro-batches: which examples go together, the tensors the model is called with, and the stream of
them that the training loop draws from.

Packing is best-fit decreasing (`packing_rows`) into rows of `train.micro_batch_size` tokens.
Packed: the examples of a row are concatenated; position ids restart at each sample, cu_seqlens
mark the samples for the varlen attention, and the labels are shifted within each sample (its
last token predicts nothing, so no token learns to predict the next sample). Padded: each
sequence is padded to the longest in the micro-batch, with an attention mask.
Labels stay on the host, so the fused loss skips untrained tokens without a device sync.

A `Stream` is every task's endless supply of micro-batches: a plan of index groups per epoch
(`epoch_plan` for SFT, `shuffled_groups` for pairs and completions) and a function that builds a
group's batch, with a position (epoch, index) that checkpoints save and restore.
"""

import random
from dataclasses import dataclass

import torch

from .masks import IGNORE
from .sources import DataError


@dataclass
class Batch:
    input_ids: torch.Tensor
    shift_labels: torch.Tensor  # host tensor, already shifted
    position_ids: torch.Tensor | None
    attention_mask: torch.Tensor | None
    cu_seqlens: torch.Tensor | None
    max_len: int
    trained: int  # tokens with a label
    tokens: int  # the examples' tokens (a shared prefix counts once per example)
    segment_ids: torch.Tensor | None = None  # prefix sharing (fasttune/prefix_sharing.py)

    def model_kwargs(self, dev):
        kw = {"input_ids": self.input_ids.to(dev), "shift_labels": self.shift_labels}
        if self.cu_seqlens is not None:
            cu = self.cu_seqlens.to(dev)
            kw.update(position_ids=self.position_ids.to(dev), cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                      max_length_q=self.max_len, max_length_k=self.max_len)
            if self.segment_ids is not None:
                kw["segment_ids"] = self.segment_ids.to(dev)
        else:
            kw["attention_mask"] = self.attention_mask.to(dev)
        return kw


@dataclass
class PairBatch(Batch):
    """B preference pairs (DPO, reward models) as one padded batch of 2B sequences, the B chosen first."""

    pair_ids: torch.Tensor | None = None  # [B] the pairs' indices in their list (DPO's reference cache)
    margin: torch.Tensor | None = None  # [B] the pairs' margins (reward models); None when no pair has one

    @property
    def pairs(self) -> int:
        return len(self.pair_ids)


def pair_batch(pairs, group, pad_id) -> PairBatch:
    """The pairs `group` (indices into `pairs`, each with .chosen, .rejected and .margin) as a PairBatch."""
    b = padded_batch([pairs[i].chosen for i in group] + [pairs[i].rejected for i in group], pad_id)
    margins = [pairs[i].margin for i in group]
    margin = None if all(m is None for m in margins) else torch.tensor([m or 0.0 for m in margins])
    return PairBatch(**vars(b), pair_ids=torch.tensor(group), margin=margin)


@dataclass
class UnpairedBatch(Batch):
    """KTO's B completions, each labelled desirable or not, with the mismatched sequences of its KL term."""

    desirable: torch.Tensor | None = None  # [B] bool
    kl: Batch | None = None  # prompt i with completion i - 1 (loss_type "kto"), else None


def _shifted(labels):
    return labels[1:] + [IGNORE]


def packed_batch(examples) -> Batch:
    ids, labels, pos, cu = [], [], [], [0]
    for ex in examples:
        ids += ex.input_ids
        labels += _shifted(ex.labels)
        pos += range(len(ex.input_ids))
        cu.append(cu[-1] + len(ex.input_ids))
    shift = torch.tensor(labels)[None]
    return Batch(torch.tensor(ids)[None], shift, torch.tensor(pos)[None], None,
                 torch.tensor(cu, dtype=torch.int32), max(len(e.input_ids) for e in examples),
                 int((shift != IGNORE).sum()), len(ids))


def shared_batch(examples) -> Batch:
    """A packed row in which examples with a common start (a system prompt) share it: each group of
    them is one sample, its prefix once, then each example's own tokens (prefix_sharing.py)."""
    from .prefix_sharing import prefix_groups, shareable, shared_layout

    seqs = [ex.input_ids for ex in examples]
    shifted = [_shifted(ex.labels) for ex in examples]
    groups = prefix_groups(seqs, [shareable(y) for y in shifted])
    if all(p == 0 for _, p in groups):
        return packed_batch(examples)
    lay = shared_layout(seqs, groups)
    labels = torch.full((lay.tokens,), IGNORE)
    for members, p in groups:
        for i in members:
            labels[lay.rows[i, p : len(seqs[i])]] = torch.tensor(shifted[i][p:])
    return Batch(lay.input_ids, labels[None], lay.position_ids, None, lay.cu_seqlens, lay.max_len,
                 int((labels != IGNORE).sum()), sum(map(len, seqs)), lay.segment_ids)


def padded_batch(examples, pad_id) -> Batch:
    S = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), S), pad_id)
    labels = torch.full((len(examples), S), IGNORE)
    mask = torch.zeros(len(examples), S, dtype=torch.long)
    for i, ex in enumerate(examples):
        L = len(ex.input_ids)
        ids[i, :L] = torch.tensor(ex.input_ids)
        labels[i, :L] = torch.tensor(_shifted(ex.labels))
        mask[i, :L] = 1
    return Batch(ids, labels, None, mask, None, S, int((labels != IGNORE).sum()), int(mask.sum()))


def epoch_plan(lengths, *, packing, micro_batch_size, seed, epoch) -> list[list[int]]:
    """Example indices of each micro-batch of one epoch, in a deterministic shuffled order."""
    rng = random.Random(f"{seed}-{epoch}")
    if packing:
        groups = packing_rows(lengths, micro_batch_size)
    else:
        order = list(range(len(lengths)))
        rng.shuffle(order)
        groups = [order[i : i + micro_batch_size] for i in range(0, len(order), micro_batch_size)]
    rng.shuffle(groups)
    return groups


def packing_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: indices of the examples in each row, rows at most `capacity` tokens."""
    import bisect

    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    free: list[tuple[int, int]] = []  # (free tokens, row), sorted
    rows: list[list[int]] = []
    for i in order:
        L = lengths[i]
        if L > capacity:
            raise DataError(f"an example of {L} tokens does not fit a row of {capacity}; make "
                            "train.micro_batch_size >= data.max_seq_len")
        k = bisect.bisect_left(free, (L, -1))  # the tightest row that still fits
        if k < len(free):
            space, r = free.pop(k)
            rows[r].append(i)
            bisect.insort(free, (space - L, r))
        else:
            rows.append([i])
            bisect.insort(free, (capacity - L, len(rows) - 1))
    return rows


def packing_efficiency(lengths, rows, capacity) -> float:
    return sum(lengths) / (len(rows) * capacity) if rows else 0.0


def make_batch(examples, packing, pad_id, share=False) -> Batch:
    """Packed (with a shared prefix computed once if `share`) or padded."""
    if not packing:
        return padded_batch(examples, pad_id)
    return shared_batch(examples) if share else packed_batch(examples)


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
