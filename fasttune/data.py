"""SFT data: read Alpaca, ShareGPT or OpenAI-messages records, render them with the chat template,
and build the loss mask on that rendering.

Formats (JSON list or JSONL, detected per file unless `data.format` says):
- alpaca:   {"instruction", "input"?, "output", "system"?, "history"?: [[user, assistant], ...]}
- sharegpt: {"conversations": [{"from": "system"|"human"|"gpt"|other, "value": ...}, ...]}
- messages: {"messages": [{"role": ..., "content": ..., "reasoning_content"?: ...}, ...]} (OpenAI; also
  "conversations" with role/content)

Masks from what inference sees: the whole conversation is rendered once with the chat template and
that text is tokenized (with character offsets); the ids are exactly what generation sees. Each
trained message's rendered span (its content as the template printed it, trimmed or not, its
reasoning, its end-of-turn token) is located by rendering once more with a sentinel in place of each
trained field and matching the two renderings piece by piece (`trained_spans`); tokens overlapping a
span are trained. Role headers, template boilerplate (an empty think block, a default system prompt,
a date line) and the other messages are never trained. No response is searched for as a string.
Templates that rewrite history (Qwen3 drops the think block of earlier turns) train every turn as it
stands in the full rendering; `data.multi_turn = "split"` instead makes one example per trained turn,
each ending with that turn, as generation renders it. A record whose masks cannot be built is skipped
and counted, with the reason.
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
            msg = {"role": roles.get(turn["role"], turn["role"]), "content": text(turn["content"], f"messages[{i}].content")}
            if turn.get("reasoning_content"):  # Qwen3 / DeepSeek-R1 style thinking, printed by the template
                msg["reasoning_content"] = text(turn["reasoning_content"], f"messages[{i}].reasoning_content")
            msgs.append(msg)
    if not msgs:
        raise DataError(f"{where}: the conversation is empty")
    return msgs


# --------------------------------------------------------------------------------------------
# Tokenizing with masks
# --------------------------------------------------------------------------------------------


class TemplateError(DataError):
    """A conversation the chat template renders in a way its masks cannot be built for; the record is
    skipped and counted, not the run stopped."""


def render(tokenizer, messages, add_generation_prompt=False, where="") -> str:
    """The chat template's text of `messages`; a template that refuses them raises TemplateError."""
    from jinja2 import TemplateError as JinjaError

    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except JinjaError as e:  # raise_exception(...) in the template: it refuses this conversation
        raise TemplateError(f"{where}: the chat template refuses this conversation: {e}") from None


def _sentinel(i, field):
    # Private-use characters: no whitespace for a template's `trim` to take, nothing a tokenizer merges.
    return f"\ue000{i}{field}\ue001"


def _printed_as(text):
    """What a template may print for a field: as it is, or trimmed (Llama 3, Gemma, Qwen3's strips)."""
    return dict.fromkeys([text, text.strip(), text.lstrip(), text.rstrip(), text.strip("\n"), text.lstrip("\n")])


def _fill(full, pieces, values, pos=0):
    """Positions [(start, end)] of each value in `full` = pieces[0] + v0 + pieces[1] + v1 + ...,
    each value printed as one of its _printed_as forms; None if no choice reproduces `full`."""
    if not full.startswith(pieces[0], pos):
        return None
    pos += len(pieces[0])
    if not values:
        return [] if pos == len(full) else None
    for form in _printed_as(values[0]):
        if full.startswith(form, pos):
            rest = _fill(full, pieces[1:], values[1:], pos + len(form))
            if rest is not None:
                return [(pos, pos + len(form)), *rest]
    return None


def _end_of_turn(tokenizer, text) -> int:
    """Length of the end-of-turn marker at the start of `text` (the template text after a message's
    content): through the first special token, if only whitespace comes before it; else 0."""
    specials = {tokenizer.eos_token, *getattr(tokenizer, "all_special_tokens", [])}
    specials |= {t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special}
    best = None
    for tok in filter(None, specials):
        i = text.find(tok)
        if i >= 0 and not text[:i].strip() and (best is None or i < best[0]):
            best = (i, i + len(tok))
    return best[1] if best else 0


def stop_token_ids(tokenizer, model=None) -> list[int]:
    """The ids that end a generated reply: the tokenizer's eos, the model's generation_config eos ids,
    and the token the chat template ends an assistant turn with (which training teaches; <|im_end|> on a
    Qwen base whose eos is <|endoftext|>, <end_of_turn> where Gemma's eos is <eos>)."""
    ids = [tokenizer.eos_token_id]
    extra = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += extra if isinstance(extra, list) else [extra]
    probe = _sentinel(0, "c")
    try:
        text = render(tokenizer, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": probe}])
    except (TemplateError, ValueError):
        text = ""
    if probe in text:
        after = text.split(probe, 1)[1]
        marker = after[: _end_of_turn(tokenizer, after)].strip()
        if marker:
            ids.append(tokenizer.convert_tokens_to_ids(marker))
    unk = getattr(tokenizer, "unk_token_id", None)
    return list(dict.fromkeys(i for i in ids if isinstance(i, int) and i != unk))


def trained_spans(tokenizer, messages, full, trained, where) -> list[tuple[int, int]]:
    """Character spans of `full` (the rendering of `messages`) that the messages `trained` occupy: each
    from its first printed field (`reasoning_content`, else the content) to the end of its content and
    its end-of-turn token. Found by rendering the conversation once more with a sentinel in place of
    each trained field and matching the two renderings piece by piece, so a template that trims
    content, drops reasoning from history or adds boilerplate (an empty think block) is followed
    exactly, and no response is searched for as a string."""
    probe, values = [dict(m) for m in messages], []
    for i in trained:
        for field in ("reasoning_content", "content"):
            if probe[i].get(field) or (field == "content" and field in probe[i]):
                values.append((i, field, probe[i][field]))
                probe[i][field] = _sentinel(i, field[0])
    marked = render(tokenizer, probe, where=where)
    for i, f, _ in values:
        if marked.count(_sentinel(i, f[0])) > 1:
            raise TemplateError(f"{where}: the chat template prints the {f} of message {i} more than once")
        if f == "content" and _sentinel(i, "c") not in marked:
            raise TemplateError(f"{where}: the chat template does not print the content of message {i}")
    # A field the template leaves out (Qwen3 drops earlier turns' reasoning) has nothing to train.
    order = sorted((v for v in values if _sentinel(v[0], v[1][0]) in marked),
                   key=lambda v: marked.find(_sentinel(v[0], v[1][0])))
    keys = [_sentinel(i, f[0]) for i, f, _ in order]
    pieces, rest = [], marked
    for k in keys:
        head, rest = rest.split(k)
        pieces.append(head)
    pieces.append(rest)
    pos = _fill(full, pieces, [v for _, _, v in order])
    if pos is None:
        raise TemplateError(f"{where}: the chat template prints a trained message differently once its content "
                            "changes (inline <think> blocks? pass them as reasoning_content), so its tokens cannot "
                            "be located")
    spans = {}
    for (i, _, _), (a, b) in zip(order, pos):
        s, e = spans.get(i, (a, b))
        spans[i] = (min(s, a), max(e, b))
    out = []
    for i, (a, b) in sorted(spans.items()):
        out.append((a, b + _end_of_turn(tokenizer, full[b:])))
    return out


def _tokenize(tokenizer, text, where):
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError:
        raise DataError(f"{where}: the tokenizer has no character offsets (a slow tokenizer); fasttune needs a fast "
                        "tokenizer (tokenizer.json) to locate the trained tokens") from None
    return enc["input_ids"], enc["offset_mapping"]


def tokenize_conversation(tokenizer, messages, *, train_on="assistant", trainable_roles=(), where="",
                          train_from=0) -> tuple[list, list]:
    """input_ids and labels (IGNORE where not trained) of one conversation, from one rendering.

    The ids are the tokenization of the conversation as the chat template renders it, which is what
    generation sees. A trained message trains the tokens of its rendered span (its content as the
    template printed it, its reasoning, its end-of-turn token), mapped onto tokens by character
    offsets: a token is trained if it overlaps the span. Role headers, template boilerplate and other
    messages are never trained. Messages before `train_from` (a preference pair's prompt) are not
    trained; the prompt as rendered with the generation prompt must then be the start of the rendering,
    and its tokenization the start of the ids, so that the prompt's tokens are what inference feeds
    the model whatever the response. Where the response's first characters merge with the prompt's
    last token (a SentencePiece word boundary, a newline after a header's newline), the record is
    refused (TemplateError), never tokenized in pieces.
    """
    trained_roles = {"assistant", *trainable_roles}
    candidates = [i for i, m in enumerate(messages) if m["role"] in trained_roles and i >= train_from]
    if train_on == "last_assistant":
        candidates = candidates[-1:]
    full = render(tokenizer, messages, where=where)
    spans = [] if train_on == "all" else trained_spans(tokenizer, messages, full, candidates, where)
    cut = 0
    if train_from:
        prompt = render(tokenizer, messages[:train_from], add_generation_prompt=True, where=where)
        if not full.startswith(prompt):
            raise TemplateError(f"{where}: the chat template renders the prompt with the generation prompt differently "
                                "from the start of the whole conversation, so the pair cannot share its prompt")
        cut = len(prompt)
    ids, offsets = _tokenize(tokenizer, full, where)
    if cut:
        prompt_ids = _tokenize(tokenizer, full[:cut], where)[0]
        if ids[: len(prompt_ids)] != prompt_ids or (len(ids) > len(prompt_ids) and offsets[len(prompt_ids)][0] < cut):
            raise TemplateError(f"{where}: the response's first characters {full[cut:cut + 8]!r} merge with the end of "
                                "the prompt into one token, so the pair's tokens cannot start with the prompt as "
                                "inference tokenizes it; edit the response's start (a leading space or newline)")
    if train_on == "all":
        return ids, [t if a >= cut else IGNORE for t, (a, _) in zip(ids, offsets)]
    labels = [t if any(max(a, s) < min(b, e) for s, e in spans) else IGNORE for t, (a, b) in zip(ids, offsets)]
    return ids, labels


# --------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------


@dataclass
class Example:
    input_ids: list
    labels: list  # IGNORE where not trained; not shifted
    where: str


def listed(reasons, n=5) -> str:
    """The first n reasons, one per indented line, and how many more."""
    more = f"\n    ... and {len(reasons) - n} more" if len(reasons) > n else ""
    return "".join(f"\n    {r}" for r in reasons[:n]) + more


@dataclass
class DataReport:
    path: str
    format: str
    examples: int = 0
    truncated: int = 0
    dropped: int = 0
    fully_masked: list = field(default_factory=list)  # where of examples with no trained token
    skipped: list = field(default_factory=list)  # why records the chat template cannot mask were skipped
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
        if self.skipped:
            lines.append(f"  {len(self.skipped)} records skipped because their masks cannot be built:" + listed(self.skipped))
        if self.fully_masked:
            lines.append(f"  {len(self.fully_masked)} examples have no trained token and are skipped, "
                         f"e.g. {self.fully_masked[0]}")
        return "\n".join(lines)


def load_sft(path, tokenizer, data_cfg) -> tuple[list[Example], DataReport]:
    from .sources import read_data

    records = read_data(path, data_cfg)
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
        for ex_where, conv, train_on in _conversations(msgs, data_cfg, where):
            try:
                ids, labels = tokenize_conversation(tokenizer, conv, train_on=train_on,
                                                    trainable_roles=data_cfg.trainable_roles, where=ex_where)
            except TemplateError as e:
                report.skipped.append(str(e))
                continue
            _add_example(out, report, ids, labels, ex_where, data_cfg)
    report.examples = len(out)
    if not out:
        raise DataError(f"{path}: no example has a trained token ({len(report.fully_masked)} fully masked, "
                        f"{report.dropped} dropped as too long, {len(report.skipped)} skipped"
                        + (f": {report.skipped[0]}" if report.skipped else "") + "); check data.train_on and data.roles")
    return out, report


def _conversations(msgs, data_cfg, where):
    """(where, messages, train_on) of the examples a conversation gives: itself, or with
    data.multi_turn = "split" one example per trained turn, ending with that turn and training it
    alone, so each turn is trained as the template renders it for generation."""
    if data_cfg.multi_turn != "split" or data_cfg.train_on != "assistant":
        return [(where, msgs, data_cfg.train_on)]
    roles = {"assistant", *data_cfg.trainable_roles}
    turns = [i for i, m in enumerate(msgs) if m["role"] in roles]
    return [(f"{where} (turn {i})" if len(turns) > 1 else where, msgs[: i + 1], "last_assistant") for i in turns]


def _add_example(out, report, ids, labels, where, data_cfg):
    """Fit one tokenized example to data.max_seq_len and keep it if it trains a token."""
    if len(ids) > data_cfg.max_seq_len:
        if data_cfg.overlong == "error":
            raise DataError(f"{where}: {len(ids)} tokens, more than data.max_seq_len = {data_cfg.max_seq_len}; "
                            "raise max_seq_len, or set data.overlong = \"truncate\" or \"drop\"")
        if data_cfg.overlong == "drop":
            report.dropped += 1
            return
        ids, labels = ids[: data_cfg.max_seq_len], labels[: data_cfg.max_seq_len]
        report.truncated += 1
    trained = sum(label != IGNORE for label in labels[1:])  # the first token is never predicted
    if trained == 0:
        report.fully_masked.append(where)
        return
    report.trained_tokens += trained
    report.lengths.append(len(ids))
    out.append(Example(ids, labels, where))


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
