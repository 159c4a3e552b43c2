"""Unpaired data for KTO: a prompt, one completion, and whether it is desirable.

Formats (JSON or JSONL, detected per file unless `data.format` says):
- kto: {"prompt", "completion", "label": true|false}, TRL's unpaired preference format; prompt and
  completion each a string or a list of messages (a string prompt is one user message, a string
  completion one assistant message);
- preference pairs (prompt/chosen/rejected, ShareGPT with labeled candidates, OpenAI
  preferred_output), only with `kto.from_pairs = true`: each pair gives its chosen response as a
  desirable completion and its rejected one as an undesirable completion.

Each example is tokenized as prompt + completion with the chat-template masks (fasttune/masks.py);
only the completion's tokens are trained. `mismatched` builds TRL's KL sequences: prompt i with completion i-1.
"""

from dataclasses import dataclass, field

from .data import Example, left_out
from .formats import as_messages
from .masks import IGNORE, TemplateError, tokenize_conversation
from .sources import DataError, read_data
from .preference import detect as detect_pairs, fit_lengths, record_pairs


@dataclass
class Unpaired:
    example: Example
    desirable: bool
    prompt_len: int  # tokens before the first trained one


@dataclass
class UnpairedReport:
    path: str
    format: str
    desirable: int = 0
    undesirable: int = 0
    truncated: int = 0
    dropped: int = 0
    fully_masked: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    lengths: list = field(default_factory=list)

    def summary(self) -> str:
        L = sorted(self.lengths) or [0]
        lines = [f"{self.path}: {self.desirable + self.undesirable} completions ({self.format}): {self.desirable} "
                 f"desirable, {self.undesirable} undesirable; tokens: min {L[0]}, median {L[len(L) // 2]}, max {L[-1]}"]
        return "\n".join(lines + left_out(self, "kto.max_len / max_prompt_len", "", "have"))


def detect(record) -> str | None:
    if "completion" in record and "label" in record:
        return "kto"
    return detect_pairs(record)


def record_examples(record, fmt, where, roles) -> list[tuple[list, list, bool, str]]:
    """(prompt messages, completion messages, desirable, where) of one record."""
    if fmt == "kto":
        label = record["label"]
        if not isinstance(label, bool):
            raise DataError(f"{where}: 'label' must be true or false, got {label!r}")
        prompt = as_messages(record["prompt"], "user", where, "prompt", roles) if "prompt" in record else []
        return [(prompt, as_messages(record["completion"], "assistant", where, "completion", roles), label, where)]
    return [(p.prompt, side, good, p.where) for p in record_pairs(record, fmt, where, roles)
            for side, good in ((p.chosen, True), (p.rejected, False))]


def load_unpaired(path, tokenizer, data_cfg, kto_cfg) -> tuple[list[Unpaired], UnpairedReport]:
    records = read_data(path, data_cfg)
    fmt = data_cfg.format if data_cfg.format != "auto" else detect(records[0][1])
    if fmt is None:
        raise DataError(f"{records[0][0]}: not a KTO record (keys: {sorted(records[0][1])}); expected "
                        "prompt/completion/label, or preference pairs with kto.from_pairs = true; or set data.format")
    if fmt != "kto" and not kto_cfg.from_pairs:
        raise DataError(f"{path}: preference pairs ({fmt}) given to kto, which trains on completions labelled "
                        "true/false; set kto.from_pairs = true to use chosen as desirable and rejected as undesirable")
    report, out = UnpairedReport(str(path), fmt), []
    for where, rec in records:
        if detect(rec) != fmt:
            raise DataError(f"{where}: this record is not in {fmt} format (keys: {sorted(rec)})")
        for prompt, completion, good, at in record_examples(rec, fmt, where, data_cfg.roles):
            try:
                ids, labels = tokenize_conversation(tokenizer, prompt + completion, train_from=len(prompt), where=at)
            except TemplateError as e:
                report.skipped.append(str(e))
                continue
            first = next((i for i, lab in enumerate(labels) if lab != IGNORE), len(labels))
            if len(ids) > kto_cfg.max_len or first > kto_cfg.max_prompt_len:
                if data_cfg.overlong == "error":
                    raise DataError(f"{at}: over kto.max_len = {kto_cfg.max_len} or kto.max_prompt_len = "
                                    f"{kto_cfg.max_prompt_len}; raise them, or set data.overlong = \"truncate\" or \"drop\"")
                if data_cfg.overlong == "drop":
                    report.dropped += 1
                    continue
                ids, labels = fit_lengths(ids, labels, kto_cfg.max_prompt_len, kto_cfg.max_len)
                report.truncated += 1
            if all(lab == IGNORE for lab in labels[1:]):
                report.fully_masked.append(at)
                continue
            report.lengths.append(len(ids))
            report.desirable += good
            report.undesirable += not good
            first = next(i for i, lab in enumerate(labels) if lab != IGNORE)
            out.append(Unpaired(Example(ids, labels, at), good, first))
    if not out:
        raise DataError(f"{path}: no usable completion ({len(report.fully_masked)} with no trained token, "
                        f"{report.dropped} dropped as too long, {len(report.skipped)} skipped"
                        + (f": {report.skipped[0]}" if report.skipped else "") + ")")
    report.format = fmt if fmt == "kto" else f"{fmt}, from pairs"
    return out, report


def mismatched(items: list[Unpaired], max_len: int) -> list[Example]:
    """TRL's KL sequences of a micro-batch: item i's prompt with item i-1's completion (cyclically)."""
    out = []
    for i, it in enumerate(items):
        other = items[i - 1]
        p = it.prompt_len
        ids = it.example.input_ids[:p] + other.example.input_ids[other.prompt_len :]
        labels = [IGNORE] * p + other.example.labels[other.prompt_len :]
        out.append(Example(ids[:max_len], labels[:max_len], f"{it.example.where} (KL)"))
    return out
