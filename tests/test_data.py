"""SFT data: formats, masks checked token by token, errors, overlong policies and packing."""

import json

import pytest

from fasttune.builtin import byte_tokenizer
from fasttune.config import DataConfig
from fasttune.batches import packing_efficiency, packing_rows
from fasttune.data import load_sft
from fasttune.masks import IGNORE, tokenize_conversation
from fasttune.sources import DataError, read_records

TOK = byte_tokenizer()


def trained_text(ids, labels):
    """The trained tokens decoded, each run of consecutive trained tokens as one string."""
    runs, cur = [], []
    for i, lab in zip(ids, labels):
        if lab != IGNORE:
            assert lab == i
            cur.append(i)
        elif cur:
            runs.append(TOK.decode(cur))
            cur = []
    if cur:
        runs.append(TOK.decode(cur))
    return runs


def write(tmp_path, name, records, jsonl=True):
    p = tmp_path / name
    p.write_text("\n".join(json.dumps(r) for r in records) if jsonl else json.dumps(records))
    return p


CONV = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4, ünïcode ✓"}]


def test_masks_token_by_token():
    ids, labels = tokenize_conversation(TOK, CONV)
    assert TOK.decode(ids) == TOK.apply_chat_template(CONV, tokenize=False)
    assert trained_text(ids, labels) == ["Hello!<|im_end|>", "4, ünïcode ✓<|im_end|>"]
    ids, labels = tokenize_conversation(TOK, CONV, train_on="last_assistant")
    assert trained_text(ids, labels) == ["4, ünïcode ✓<|im_end|>"]
    ids, labels = tokenize_conversation(TOK, CONV, train_on="all")
    assert labels == ids


def test_custom_trainable_role():
    conv = [{"role": "user", "content": "Tell a story"}, {"role": "narrator", "content": "Once..."},
            {"role": "assistant", "content": "The end."}]
    ids, labels = tokenize_conversation(TOK, conv, trainable_roles=["narrator"])
    assert trained_text(ids, labels) == ["Once...<|im_end|>", "The end.<|im_end|>"]
    ids, labels = tokenize_conversation(TOK, conv)
    assert trained_text(ids, labels) == ["The end.<|im_end|>"]


@pytest.mark.parametrize("fmt", ["alpaca", "sharegpt", "messages", "alpaca_json"])
def test_formats_give_the_same_examples(tmp_path, fmt):
    if fmt.startswith("alpaca"):
        rec = {"system": "Be brief.", "history": [["Hi there", "Hello!"]], "instruction": "2+2?", "input": "",
               "output": "4, ünïcode ✓"}
    elif fmt == "sharegpt":
        rec = {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "Hi there"},
                                 {"from": "gpt", "value": "Hello!"}, {"from": "human", "value": "2+2?"},
                                 {"from": "gpt", "value": "4, ünïcode ✓"}]}
    else:
        rec = {"messages": CONV}
    path = write(tmp_path, "d.json" if fmt == "alpaca_json" else "d.jsonl", [rec, rec], jsonl=fmt != "alpaca_json")
    examples, report = load_sft(path, TOK, DataConfig())
    assert report.format == fmt.split("_")[0] and report.examples == 2
    want = tokenize_conversation(TOK, CONV)
    assert (examples[0].input_ids, examples[0].labels) == want


def test_sharegpt_role_mapping(tmp_path):
    rec = {"conversations": [{"from": "human", "value": "hi"}, {"from": "bot", "value": "yo"}]}
    cfg = DataConfig(roles={"bot": "assistant"})
    examples, _ = load_sft(write(tmp_path, "d.jsonl", [rec]), TOK, cfg)
    assert trained_text(examples[0].input_ids, examples[0].labels) == ["yo<|im_end|>"]


def test_malformed_line_names_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"messages": []}\n{"messages": [}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not valid JSON"):
        read_records(p)


def test_missing_empty_and_unknown(tmp_path):
    with pytest.raises(DataError, match="no such data file"):
        load_sft(tmp_path / "nope.jsonl", TOK, DataConfig())
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(DataError, match="empty"):
        load_sft(tmp_path / "e.jsonl", TOK, DataConfig())
    with pytest.raises(DataError, match="cannot tell the format"):
        load_sft(write(tmp_path, "u.jsonl", [{"question": "q", "answer": "a"}]), TOK, DataConfig())
    with pytest.raises(DataError, match=r"u2\.jsonl:2: this record is not in messages format"):
        load_sft(write(tmp_path, "u2.jsonl", [{"messages": CONV}, {"instruction": "x", "output": "y"}]), TOK,
                 DataConfig())


def test_fully_masked_reported_and_all_masked_error(tmp_path):
    ok = {"messages": CONV}
    masked = {"messages": [{"role": "user", "content": "only a question"}]}
    examples, report = load_sft(write(tmp_path, "d.jsonl", [ok, masked]), TOK, DataConfig())
    assert len(examples) == 1 and report.fully_masked == [f"{tmp_path / 'd.jsonl'}:2"]
    with pytest.raises(DataError, match="no example has a trained token"):
        load_sft(write(tmp_path, "m.jsonl", [masked, masked]), TOK, DataConfig())


def test_overlong_policies(tmp_path):
    long = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a" * 200}]}
    short = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    p = write(tmp_path, "d.jsonl", [short, long])
    with pytest.raises(DataError, match=r"d\.jsonl:2: \d+ tokens, more than data.max_seq_len = 64"):
        load_sft(p, TOK, DataConfig(max_seq_len=64, overlong="error"))
    ex, rep = load_sft(p, TOK, DataConfig(max_seq_len=64, overlong="drop"))
    assert len(ex) == 1 and rep.dropped == 1
    ex, rep = load_sft(p, TOK, DataConfig(max_seq_len=64, overlong="truncate"))
    assert len(ex) == 2 and rep.truncated == 1 and len(ex[1].input_ids) == 64


def test_best_fit_decreasing_packing():
    lengths = [500, 300, 300, 200, 200, 100, 90, 10, 1000, 24]
    rows = packing_rows(lengths, 1024)
    assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in r) <= 1024 for r in rows)
    assert len(rows) == 3  # 2724 tokens: the minimum is 3 rows of 1024
    assert packing_efficiency(lengths, rows, 1024) == pytest.approx(2724 / 3072)
    with pytest.raises(DataError, match="micro_batch_size >= data.max_seq_len"):
        packing_rows([2000], 1024)
