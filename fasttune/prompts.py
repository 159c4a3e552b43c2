"""Prompts for generation: one reader of prompt files, the ids a prompt is sampled from, left padding.

- `read_prompts(path, data_cfg=None)`: the records of a prompt file (any source fasttune/sources.py
  reads), each with "prompt" (a string, one user message, or a list of messages) or "messages".
  A record without one, a malformed message list or an empty prompt is a DataError naming the file
  and line. `fasttune generate` and GRPO/PPO's prompts read files through it.
- `prompt_ids(tok, messages)`: the token ids of a prompt as generation sees it, rendered with the
  chat template and its generation prompt.
- `left_pad(rows, pad_id, repeat)`: prompts of different lengths in one [N, P] batch, padded on the
  left so every prompt ends where generation begins.
"""

from dataclasses import dataclass

import torch

from .formats import as_messages
from .sources import DataError, read_data


@dataclass
class PromptRecord:
    where: str  # "file:line" for errors
    messages: list[dict]  # the prompt as chat messages, roles mapped through data.roles
    prompt: str | list  # the prompt as written: "prompt" (a string or messages), else "messages"
    record: dict  # the whole record (GRPO's reward functions get its other fields)


def prompt_messages(record, where, roles=None) -> list[dict]:
    """The messages of one prompt record; a DataError naming `where` if it has none or they are empty."""
    p = record.get("prompt", record.get("messages")) if isinstance(record, dict) else None
    if p is None:
        raise DataError(f"{where}: a prompt record needs \"prompt\" (a string or messages) or \"messages\"")
    msgs = as_messages(p, "user", where, "the prompt", roles or {})
    if not any(not isinstance(m["content"], str) or m["content"].strip() for m in msgs):
        raise DataError(f"{where}: the prompt is empty")
    return msgs


def read_prompts(path, data_cfg=None) -> list[PromptRecord]:
    """The prompts of `path`; `data_cfg` (a run's [data]) gives its roles, columns, split and subset."""
    roles = getattr(data_cfg, "roles", None) or {}
    out = []
    for where, rec in read_data(str(path), data_cfg):
        msgs = prompt_messages(rec, where, roles)
        out.append(PromptRecord(where, msgs, rec.get("prompt", rec.get("messages")), rec))
    if not out:
        raise DataError(f"{path}: no prompts in it")
    return out


def prompt_ids(tok, messages) -> list[int]:
    """The ids of `messages` rendered with the chat template and its generation prompt."""
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tok(text, add_special_tokens=False)["input_ids"]


def left_pad(rows, pad_id, repeat=1) -> tuple[torch.Tensor, torch.Tensor]:
    """ids and attention mask [len(rows) × repeat, P] of `rows` (lists of ids) padded on the left to the
    longest, P; each row `repeat` times in a row (GRPO's group of completions per prompt)."""
    P = max(len(r) for r in rows)
    ids = torch.full((len(rows) * repeat, P), pad_id)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i * repeat : (i + 1) * repeat, P - len(r) :] = torch.tensor(r)
        mask[i * repeat : (i + 1) * repeat, P - len(r) :] = 1
    return ids, mask
