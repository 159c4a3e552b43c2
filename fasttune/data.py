"""SFT data: the examples of `data.train` / `data.eval`, each a tokenized conversation with its labels.

Records come from fasttune/sources.py, in a format fasttune/formats.py turns into messages, tokenized
with their masks by fasttune/masks.py. Templates that rewrite history (Qwen3 drops the think block of
earlier turns) train every turn as it stands in the full rendering; `data.multi_turn = "split"`
instead makes one example per trained turn, each ending with that turn, as generation renders it.
Examples longer than `data.max_seq_len` are truncated, dropped or refused (`data.overlong`). A record
whose masks cannot be built is skipped and counted, with the reason; so is an example with no trained
token. `DataReport.summary()` says what was read.
"""

from dataclasses import dataclass, field

from .formats import detect_format, to_messages
from .masks import IGNORE, TemplateError, tokenize_conversation
from .sources import DataError, read_data


@dataclass
class Example:
    input_ids: list
    labels: list  # IGNORE where not trained; not shifted
    where: str


def listed(reasons, n=5) -> str:
    """The first n reasons, one per indented line, and how many more."""
    more = f"\n    ... and {len(reasons) - n} more" if len(reasons) > n else ""
    return "".join(f"\n    {r}" for r in reasons[:n]) + more


def left_out(report, limit, skipped_as, masked_as) -> list[str]:
    """A data report's lines on what was cut or left out: truncated or dropped over `limit`, skipped
    because the masks cannot be built (with why), or without a trained token."""
    r, lines = report, []
    if r.truncated or r.dropped:
        lines.append(f"  over {limit}: {r.truncated} truncated, {r.dropped} dropped")
    if r.skipped:
        lines.append(f"  {len(r.skipped)} {skipped_as}skipped because their masks cannot be built:" + listed(r.skipped))
    if r.fully_masked:
        lines.append(f"  {len(r.fully_masked)} {masked_as} no trained token and are skipped, e.g. {r.fully_masked[0]}")
    return lines


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
        return "\n".join(lines + left_out(self, "max_seq_len", "records ", "examples have"))


def load_sft(path, tokenizer, data_cfg) -> tuple[list[Example], DataReport]:
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
