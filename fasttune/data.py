"""SFT data: read Alpaca, ShareGPT or OpenAI-messages records, render them with the chat template,
and build the loss mask by construction.

Formats (JSON list or JSONL, detected per file unless `data.format` says):
- alpaca:   {"instruction", "input"?, "output", "system"?, "history"?: [[user, assistant], ...]}
- sharegpt: {"conversations": [{"from": "system"|"human"|"gpt"|other, "value": ...}, ...]}
- messages: {"messages": [{"role": ..., "content": ...}, ...]} (OpenAI; also "conversations" with role/content)

Masks by construction: the conversation is rendered one message at a time, each message's text
being what the chat template adds for it (the template must render a conversation as the
concatenation of its turns, which ChatML-style and Llama-3-style templates do). A trained turn
trains its content and its end-of-turn token, not its role header (the text that
`add_generation_prompt` adds). No response is ever located by matching strings.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

IGNORE = -100
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


class DataError(ValueError):
    """A problem with the data, naming the file, the line or record, and what to do."""


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def read_records(path) -> list[tuple[str, dict]]:
    """[(where, record)] from a JSON list or a JSONL file; `where` is "file:line" for errors."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise DataError(f"{path}: the file is empty")
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        out = []
        for i, rec in enumerate(data):
            if not isinstance(rec, dict):
                raise DataError(f"{path}: record {i} is a {type(rec).__name__}, expected an object")
            out.append((f"{path}: record {i}", rec))
        return out
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: not valid JSON ({e.msg} at column {e.colno}); each line must be one "
                            "JSON object") from None
        if not isinstance(rec, dict):
            raise DataError(f"{path}:{n}: expected a JSON object, got {type(rec).__name__}")
        out.append((f"{path}:{n}", rec))
    return out


def detect_format(record: dict) -> str | None:
    if isinstance(record.get("messages"), list):
        return "messages"
    conv = record.get("conversations")
    if isinstance(conv, list) and conv and isinstance(conv[0], dict):
        return "sharegpt" if "from" in conv[0] else "messages" if "role" in conv[0] else None
    if "instruction" in record and "output" in record:
        return "alpaca"
    return None


def to_messages(record: dict, fmt: str, where: str, roles: dict) -> list[dict]:
    """The record as [{"role", "content"}], roles mapped through `roles` (custom names kept)."""

    def text(value, what):
        if not isinstance(value, str):
            raise DataError(f"{where}: {what} must be a string, got {type(value).__name__}")
        return value

    if fmt == "alpaca":
        msgs = []
        if record.get("system"):
            msgs.append({"role": "system", "content": text(record["system"], "system")})
        for turn in record.get("history") or []:
            if not (isinstance(turn, (list, tuple)) and len(turn) == 2):
                raise DataError(f"{where}: each history entry must be [user, assistant]")
            msgs += [{"role": "user", "content": text(turn[0], "history")},
                     {"role": "assistant", "content": text(turn[1], "history")}]
        prompt = text(record["instruction"], "instruction")
        if record.get("input"):
            prompt += "\n\n" + text(record["input"], "input")
        msgs += [{"role": "user", "content": prompt}, {"role": "assistant", "content": text(record["output"], "output")}]
    elif fmt == "sharegpt":
        msgs = []
        for i, turn in enumerate(record["conversations"]):
            if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
                raise DataError(f"{where}: conversations[{i}] needs 'from' and 'value'")
            who = turn["from"]
            msgs.append({"role": roles.get(who, SHAREGPT_ROLES.get(who, who)), "content": text(turn["value"], f"conversations[{i}].value")})
    else:
        turns = record.get("messages", record.get("conversations"))
        msgs = []
        for i, turn in enumerate(turns):
            if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
                raise DataError(f"{where}: messages[{i}] needs 'role' and 'content'")
            msgs.append({"role": roles.get(turn["role"], turn["role"]), "content": text(turn["content"], f"messages[{i}].content")})
    if not msgs:
        raise DataError(f"{where}: the conversation is empty")
    return msgs


# --------------------------------------------------------------------------------------------
# Tokenizing with masks
# --------------------------------------------------------------------------------------------


def _render(tokenizer, messages, add_generation_prompt=False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


SENTINEL = "\x00fasttune-turn\x00"


def _turn_frame(tokenizer, before, role, where) -> tuple[str, str]:
    """The text the template puts before and after a `role` message's content, following `before`."""
    base = _render(tokenizer, before) if before else ""
    probe = _render(tokenizer, [*before, {"role": role, "content": SENTINEL}])
    if not probe.startswith(base) or probe.count(SENTINEL) != 1:
        raise DataError(f"{where}: the chat template does not render turns one after another; set model.chat_template")
    seg = probe[len(base):]
    head, tail = seg.split(SENTINEL)
    return head, tail


def tokenize_conversation(tokenizer, messages, *, train_on="assistant", trainable_roles=(), where="",
                          train_from=0) -> tuple[list, list]:
    """input_ids and labels (IGNORE where not trained) of one conversation, built message by message.

    A trained message trains its content and its end-of-turn token (the tokenizer's eos), not its
    role header nor what follows the end-of-turn token. Messages before `train_from` are never
    trained (a preference pair's prompt).
    """
    trained_roles = {"assistant", *trainable_roles}
    last_trained = max((i for i, m in enumerate(messages) if m["role"] in trained_roles), default=-1)
    eos = tokenizer.eos_token_id
    ids, labels = [], []
    prefix = ""
    for i, msg in enumerate(messages):
        rendered = _render(tokenizer, messages[: i + 1])
        if not rendered.startswith(prefix):
            raise DataError(f"{where}: the chat template does not render this conversation turn by turn (message {i} "
                            "changes the text before it), so the masks cannot be built; set model.chat_template")
        segment = rendered[len(prefix):]
        prefix = rendered
        train = msg["role"] in trained_roles and i >= train_from and (train_on == "assistant" or i == last_trained)
        if train_on == "all" or not train:
            seg_ids = tokenizer(segment, add_special_tokens=False)["input_ids"]
            ids += seg_ids
            labels += seg_ids if train_on == "all" else [IGNORE] * len(seg_ids)
            continue
        head, tail = _turn_frame(tokenizer, messages[:i], msg["role"], where)
        if segment != head + msg["content"] + tail:
            raise DataError(f"{where}: the chat template changes the content of message {i} ({msg['role']}), so its "
                            "trained tokens cannot be located by construction; set model.chat_template")
        head_ids = tokenizer(head, add_special_tokens=False)["input_ids"] if head else []
        body_ids = tokenizer(segment[len(head):], add_special_tokens=False)["input_ids"]
        end = len(body_ids)
        if eos is not None and eos in body_ids:  # through the last end-of-turn token, not what follows
            end = len(body_ids) - body_ids[::-1].index(eos)
        ids += head_ids + body_ids
        labels += [IGNORE] * len(head_ids) + body_ids[:end] + [IGNORE] * (len(body_ids) - end)
    return ids, labels


# --------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------


@dataclass
class Example:
    input_ids: list
    labels: list  # IGNORE where not trained; not shifted
    where: str


@dataclass
class DataReport:
    path: str
    format: str
    examples: int = 0
    truncated: int = 0
    dropped: int = 0
    fully_masked: list = field(default_factory=list)  # where of examples with no trained token
    lengths: list = field(default_factory=list)
    trained_tokens: int = 0

    def summary(self) -> str:
        L = sorted(self.lengths) or [0]
        q = lambda p: L[min(len(L) - 1, int(p * len(L)))]  # noqa: E731
        lines = [f"{self.path}: {self.examples} examples ({self.format})",
                 f"  tokens per example: min {L[0]}, median {q(0.5)}, p95 {q(0.95)}, max {L[-1]}; "
                 f"{self.trained_tokens} trained tokens in all"]
        if self.truncated or self.dropped:
            lines.append(f"  over max_seq_len: {self.truncated} truncated, {self.dropped} dropped")
        if self.fully_masked:
            lines.append(f"  {len(self.fully_masked)} examples have no trained token and are skipped, "
                         f"e.g. {self.fully_masked[0]}")
        return "\n".join(lines)


def load_sft(path, tokenizer, data_cfg) -> tuple[list[Example], DataReport]:
    records = read_records(path)
    fmt = data_cfg.format
    if fmt == "auto":
        fmt = detect_format(records[0][1])
        if fmt is None:
            raise DataError(f"{records[0][0]}: cannot tell the format from keys {sorted(records[0][1])}; expected "
                            "alpaca (instruction/output), sharegpt (conversations with from/value) or messages "
                            "(messages with role/content); or set data.format")
    report = DataReport(str(path), fmt)
    out = []
    for where, rec in records:
        got = detect_format(rec)
        if got != fmt and not (fmt == "messages" and got == "messages"):
            raise DataError(f"{where}: this record is not in {fmt} format (keys: {sorted(rec)})")
        msgs = to_messages(rec, fmt, where, data_cfg.roles)
        ids, labels = tokenize_conversation(tokenizer, msgs, train_on=data_cfg.train_on,
                                            trainable_roles=data_cfg.trainable_roles, where=where)
        if len(ids) > data_cfg.max_seq_len:
            if data_cfg.overlong == "error":
                raise DataError(f"{where}: {len(ids)} tokens, more than data.max_seq_len = {data_cfg.max_seq_len}; "
                                "raise max_seq_len, or set data.overlong = \"truncate\" or \"drop\"")
            if data_cfg.overlong == "drop":
                report.dropped += 1
                continue
            ids, labels = ids[: data_cfg.max_seq_len], labels[: data_cfg.max_seq_len]
            report.truncated += 1
        trained = sum(label != IGNORE for label in labels[1:])  # the first token is never predicted
        if trained == 0:
            report.fully_masked.append(where)
            continue
        report.trained_tokens += trained
        report.lengths.append(len(ids))
        out.append(Example(ids, labels, where))
    report.examples = len(out)
    if not out:
        raise DataError(f"{path}: no example has a trained token ({len(report.fully_masked)} fully masked, "
                        f"{report.dropped} dropped as too long); check data.train_on and data.roles")
    return out, report


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
