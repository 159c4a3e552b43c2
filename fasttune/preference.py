"""Preference data for DPO: pairs of a prompt, a chosen and a rejected response.

Formats (JSON or JSONL, detected per file unless `data.format` says):
- prompt_chosen_rejected: {"prompt", "chosen", "rejected"}, each a string or a list of messages
  (a string prompt is one user message; a string response is one assistant message);
- sharegpt: {"conversations": [...]} whose assistant candidates carry "label": "chosen" or
  "rejected". Every user turn followed by one chosen and one rejected candidate gives a pair whose
  prompt is the conversation so far, with the earlier turns' chosen replies; unlabeled assistant
  turns are plain history;
- openai: {"input": {"messages": [...]}, "preferred_output": [...], "non_preferred_output": [...]}.

Each side is tokenized as prompt + response with the chat-template masks (fasttune/masks.py); only
the response's tokens are trained.
"""

from dataclasses import dataclass, field

from .data import Example, left_out
from .formats import SHAREGPT_ROLES, as_messages
from .masks import IGNORE, TemplateError, tokenize_conversation
from .sources import DataError, read_data


@dataclass
class Pair:
    prompt: list
    chosen: list
    rejected: list
    where: str


@dataclass
class PairExample:
    chosen: Example
    rejected: Example
    where: str
    margin: float | None = None  # the record's optional "margin" column (reward models)


@dataclass
class PairReport:
    path: str
    format: str
    pairs: int = 0
    truncated: int = 0
    dropped: int = 0
    fully_masked: list = field(default_factory=list)
    lengths: list = field(default_factory=list)
    skipped: list = field(default_factory=list)  # why pairs the chat template cannot mask were skipped

    def summary(self) -> str:
        L = sorted(self.lengths) or [0]
        lines = [f"{self.path}: {self.pairs} pairs ({self.format}); tokens per side: min {L[0]}, "
                 f"median {L[len(L) // 2]}, max {L[-1]}"]
        return "\n".join(lines + left_out(self, "dpo.max_len / max_prompt_len", "pairs ", "pairs have a side with"))


def detect(record) -> str | None:
    if "chosen" in record and "rejected" in record:
        return "prompt_chosen_rejected"
    if "preferred_output" in record and "non_preferred_output" in record:
        return "openai"
    conv = record.get("conversations")
    if isinstance(conv, list) and any(isinstance(t, dict) and "label" in t for t in conv):
        return "sharegpt"
    return None


def record_pairs(record, fmt, where, roles) -> list[Pair]:
    if fmt == "prompt_chosen_rejected":
        return [Pair(as_messages(record["prompt"], "user", where, "prompt", roles) if "prompt" in record else [],
                     as_messages(record["chosen"], "assistant", where, "chosen", roles),
                     as_messages(record["rejected"], "assistant", where, "rejected", roles), where)]
    if fmt == "openai":
        inp = record.get("input")
        msgs = inp.get("messages") if isinstance(inp, dict) else None
        if msgs is None:
            raise DataError(f"{where}: 'input' must be an object with 'messages'")
        return [Pair(as_messages(msgs, "user", where, "input.messages", roles),
                     as_messages(record["preferred_output"], "assistant", where, "preferred_output", roles),
                     as_messages(record["non_preferred_output"], "assistant", where, "non_preferred_output", roles), where)]
    pairs, history, chosen, rejected = [], [], None, None

    def close(turn):
        nonlocal chosen, rejected
        if chosen is None and rejected is None:
            return
        if chosen is None or rejected is None:
            raise DataError(f"{where}: the turn before conversations[{turn}] has a "
                            f"{'chosen' if chosen else 'rejected'} candidate but no "
                            f"{'rejected' if chosen else 'chosen'} one")
        pairs.append(Pair(list(history), [chosen], [rejected], f"{where} (turn {len(pairs) + 1})"))
        history.append(chosen)
        chosen = rejected = None

    for i, turn in enumerate(record["conversations"]):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise DataError(f"{where}: conversations[{i}] needs 'from' and 'value'")
        role = roles.get(turn["from"], SHAREGPT_ROLES.get(turn["from"], turn["from"]))
        msg = {"role": role, "content": turn["value"]}
        label = turn.get("label")
        if label is None:
            close(i)
            history.append(msg)
        elif label == "chosen":
            if chosen is not None:
                raise DataError(f"{where}: conversations[{i}] is a second chosen candidate in the same turn")
            chosen = msg
        elif label == "rejected":
            if rejected is not None:
                raise DataError(f"{where}: conversations[{i}] is a second rejected candidate in the same turn")
            rejected = msg
        else:
            raise DataError(f"{where}: conversations[{i}].label must be 'chosen' or 'rejected', got {label!r}")
    close(len(record["conversations"]))
    return pairs


def fit_lengths(ids, labels, max_prompt_len, max_len):
    """Cut the prompt from the left to max_prompt_len, then the response to what max_len leaves."""
    first = next((i for i, lab in enumerate(labels) if lab != IGNORE), len(labels))
    keep = max(0, first - max_prompt_len)
    ids, labels = ids[keep:], labels[keep:]
    return ids[:max_len], labels[:max_len]


def load_pairs(path, tokenizer, data_cfg, dpo_cfg) -> tuple[list[PairExample], PairReport]:
    records = read_data(path, data_cfg)
    fmt = data_cfg.format if data_cfg.format != "auto" else detect(records[0][1])
    if fmt is None and "completion" in records[0][1] and "label" in records[0][1]:
        raise DataError(f"{path}: unpaired completions (prompt/completion/label) given to a command that trains on "
                        "pairs; train them with `fasttune kto`, or give prompt/chosen/rejected pairs")
    if fmt is None:
        raise DataError(f"{records[0][0]}: not a preference record (keys: {sorted(records[0][1])}); expected "
                        "prompt/chosen/rejected, ShareGPT conversations with labeled candidates, or "
                        "input/preferred_output/non_preferred_output; or set data.format")
    report = PairReport(str(path), fmt)
    out = []
    for where, rec in records:
        if detect(rec) != fmt:
            raise DataError(f"{where}: this record is not in {fmt} format (keys: {sorted(rec)})")
        margin = rec.get("margin")
        if margin is not None and (isinstance(margin, bool) or not isinstance(margin, (int, float))):
            raise DataError(f"{where}: 'margin' must be a number, got {margin!r}")
        for pair in record_pairs(rec, fmt, where, data_cfg.roles):
            try:
                sides = [tokenize_conversation(tokenizer, pair.prompt + response, train_from=len(pair.prompt),
                                               where=pair.where) for response in (pair.chosen, pair.rejected)]
            except TemplateError as e:
                report.skipped.append(str(e))
                continue
            first = min(next((i for i, lab in enumerate(lb) if lab != IGNORE), len(lb)) for _, lb in sides)
            over = any(len(ids) > dpo_cfg.max_len for ids, _ in sides) or first > dpo_cfg.max_prompt_len
            if over:
                if data_cfg.overlong == "error":
                    raise DataError(f"{pair.where}: over dpo.max_len = {dpo_cfg.max_len} or dpo.max_prompt_len = "
                                    f"{dpo_cfg.max_prompt_len}; raise them, or set data.overlong = \"truncate\" or \"drop\"")
                if data_cfg.overlong == "drop":
                    report.dropped += 1
                    continue
                sides = [fit_lengths(ids, lb, dpo_cfg.max_prompt_len, dpo_cfg.max_len) for ids, lb in sides]
                report.truncated += 1
            if any(all(lab == IGNORE for lab in lb[1:]) for _, lb in sides):
                report.fully_masked.append(pair.where)
                continue
            report.lengths += [len(ids) for ids, _ in sides]
            out.append(PairExample(Example(*sides[0], pair.where), Example(*sides[1], pair.where), pair.where,
                                   None if margin is None else float(margin)))
    report.pairs = len(out)
    if not out:
        raise DataError(f"{path}: no usable pair ({len(report.fully_masked)} with an empty side, {report.dropped} "
                        f"dropped as too long, {len(report.skipped)} skipped"
                        + (f": {report.skipped[0]}" if report.skipped else "") + ")")
    return out, report
