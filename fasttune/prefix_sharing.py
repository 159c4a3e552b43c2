"""Prefix sharing: sequences that start with the same tokens (a DPO pair's prompt, a GRPO group's
prompt, the system prompt of SFT examples) run that prefix through the model once.

A group of sequences with a common prefix of p tokens becomes one packed sample: the prefix, then
each sequence's remaining tokens. The attention (`segment_ids`: 0 for the prefix, j for the j-th
sequence's tokens) lets a token see the prefix and its own sequence only, and its position ids
continue the prefix's, so every token computes exactly what it computes in its own sequence, and
the prefix's gradient is the sum over the sequences that share it. The prefix ends before the first
position whose prediction is trained (`shareable`): the last shared position predicts the next token
of every sequence at once, so it may predict nothing that counts.
"""

from dataclasses import dataclass

import torch

from .masks import IGNORE

MIN_SHARED = 8  # a shorter common prefix is not worth a segment


def shareable(shifted_labels) -> int:
    """How many leading positions of a sequence may be shared: those before its first trained
    position (position t is trained when its shifted label is not IGNORE)."""
    for t, y in enumerate(shifted_labels):
        if y != IGNORE:
            return t
    return len(shifted_labels)


def _common(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def prefix_groups(seqs, limits, min_shared=MIN_SHARED) -> list[tuple[list[int], int]]:
    """(sequence indices, shared length) for every sequence: sequences sorted by their tokens, and
    neighbours that share at least `min_shared` tokens (within every member's limit, and leaving each
    at least one token of its own) grouped. A sequence alone has shared length 0."""
    order = sorted(range(len(seqs)), key=lambda i: seqs[i])
    groups, cur, p = [], [], 0
    for i in order:
        if cur:
            q = min(p, _common(seqs[cur[0]], seqs[i]), limits[i], len(seqs[i]) - 1)
            if q >= min_shared:
                cur.append(i)
                p = q
                continue
            groups.append((cur, p if len(cur) > 1 else 0))
        cur, p = [i], min(limits[i], len(seqs[i]) - 1)
    if cur:
        groups.append((cur, p if len(cur) > 1 else 0))
    return groups


def given_groups(seqs, limits, groups, min_shared=1) -> list[tuple[list[int], int]]:
    """`groups` (lists of sequence indices that may share, such as a DPO pair or a GRPO group) with
    their shared lengths; a group whose members share fewer than `min_shared` tokens is split up."""
    out = []
    for members in groups:
        p = min(min(limits[i], len(seqs[i]) - 1) for i in members)
        for i in members[1:]:
            p = min(p, _common(seqs[members[0]], seqs[i]))
        if len(members) > 1 and p >= min_shared:
            out.append((list(members), p))
        else:
            out += [([i], 0) for i in members]
    return out


@dataclass
class SharedLayout:
    """One packed row of groups. `rows[i, t]` is the row of sequence i's token t (0 past its end)."""

    input_ids: torch.Tensor  # [1, T]
    position_ids: torch.Tensor  # [1, T]
    segment_ids: torch.Tensor  # [1, T]
    cu_seqlens: torch.Tensor  # [samples + 1] int32
    max_len: int
    rows: torch.Tensor  # [n, S] long
    lengths: list[int]

    def model_kwargs(self, dev) -> dict:
        cu = self.cu_seqlens.to(dev)
        return {"input_ids": self.input_ids.to(dev), "position_ids": self.position_ids.to(dev),
                "segment_ids": self.segment_ids.to(dev), "cu_seq_lens_q": cu, "cu_seq_lens_k": cu,
                "max_length_q": self.max_len, "max_length_k": self.max_len}

    def gather(self, packed: torch.Tensor, pad=0) -> torch.Tensor:
        """A per-token tensor [1, T, ...] of the packed row as [n, S, ...] in the sequences' own layout
        (right-padded with `pad`). Differentiable: the prefix rows' gradients sum over their copies."""
        out = packed[0][self.rows.to(packed.device)]
        valid = torch.arange(self.rows.shape[1])[None, :] < torch.tensor(self.lengths)[:, None]
        valid = valid.to(packed.device).view(*valid.shape, *([1] * (out.dim() - 2)))
        return torch.where(valid, out, torch.as_tensor(pad, dtype=out.dtype, device=out.device))

    @property
    def tokens(self) -> int:
        return self.input_ids.shape[1]


def shared_layout(seqs, groups) -> SharedLayout:
    """The packed row of `groups` ((indices, shared length) from prefix_groups) over token lists `seqs`."""
    ids, pos, seg, cu = [], [], [], [0]
    S = max(len(s) for s in seqs)
    rows = torch.zeros(len(seqs), S, dtype=torch.long)
    max_len = 0
    for members, p in groups:
        assert p > 0 or len(members) == 1, "sequences that share nothing are groups of one"
        start = len(ids)
        first = seqs[members[0]]
        ids += first[:p]
        pos += range(p)
        seg += [0] * p
        for j, i in enumerate(members, 1):
            s = seqs[i]
            rows[i, :p] = torch.arange(start, start + p)
            rows[i, p : len(s)] = torch.arange(len(ids), len(ids) + len(s) - p)
            ids += s[p:]
            pos += range(p, len(s))
            seg += [j if p else 0] * (len(s) - p)
        cu.append(len(ids))
        max_len = max(max_len, len(ids) - start)
    return SharedLayout(torch.tensor(ids)[None], torch.tensor(pos)[None], torch.tensor(seg)[None],
                        torch.tensor(cu, dtype=torch.int32), max_len, rows, [len(s) for s in seqs])


def available(model) -> bool:
    """Can `model` share prefixes: does it attend with fasttune's varlen attention, and without a
    sliding window (which counts positions in a row, where a shared layout puts other sequences)?"""
    from fasttune.kernels.hf import varlen_attention_applied

    if not varlen_attention_applied(model):
        return False
    cfg = model.config
    types = getattr(cfg, "layer_types", None) or []
    windowed = getattr(cfg, "sliding_window", None) is not None and getattr(cfg, "use_sliding_window", True)
    return not (windowed or "sliding_attention" in types)


def check_received():
    """After a forward with segment_ids: did they reach the attention? (A model whose layers do not
    hand their keyword arguments down would let the sequences of a group see each other.)"""
    from fasttune.kernels.hf import SEGMENTS_SEEN

    if not SEGMENTS_SEEN:
        raise RuntimeError("this model's attention did not receive segment_ids, so shared prompts cannot be kept "
                           "apart; set data.prefix_sharing = false")


def padded_hidden(model, input_ids, attention_mask, shift_labels, groups, dev):
    """final_hidden of a right-padded batch [n, S] whose rows `groups` (lists of row indices, such as
    a DPO pair) start alike, each group's common prefix run once: (hidden [n, S, H], head), the
    rows' hidden states where the padded batch has them (zeros on padding)."""
    from .models import final_hidden

    lengths = attention_mask.sum(1).tolist()
    seqs = [row[:n].tolist() for row, n in zip(input_ids, lengths)]
    limits = [shareable(y[:n].tolist()) for y, n in zip(shift_labels, lengths)]
    layout = shared_layout(seqs, given_groups(seqs, limits, groups))
    hidden, head = final_hidden(model, **layout.model_kwargs(dev))
    if layout.segment_ids.any():
        check_received()
    out = layout.gather(hidden)
    if out.shape[1] < input_ids.shape[1]:
        out = torch.nn.functional.pad(out, (0, 0, 0, input_ids.shape[1] - out.shape[1]))
    return out, head
