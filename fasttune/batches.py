"""Micro-batches: which examples go together, the tensors the model is called with, and the stream of
them that the training loop draws from.

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

from .data import IGNORE, packing_rows


@dataclass
class Batch:
    input_ids: torch.Tensor
    shift_labels: torch.Tensor  # host tensor, already shifted
    position_ids: torch.Tensor | None
    attention_mask: torch.Tensor | None
    cu_seqlens: torch.Tensor | None
    max_len: int
    trained: int  # tokens with a label
    tokens: int

    def model_kwargs(self, dev):
        kw = {"input_ids": self.input_ids.to(dev), "shift_labels": self.shift_labels}
        if self.cu_seqlens is not None:
            cu = self.cu_seqlens.to(dev)
            kw.update(position_ids=self.position_ids.to(dev), cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                      max_length_q=self.max_len, max_length_k=self.max_len)
        else:
            kw["attention_mask"] = self.attention_mask.to(dev)
        return kw


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


def make_batch(examples, packing, pad_id) -> Batch:
    return packed_batch(examples) if packing else padded_batch(examples, pad_id)


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
