"""Masks from what inference sees, on real tokenizers and chat templates (tests/real_tokenizers.py).

For Qwen3, Qwen2.5, Llama 3.1, Gemma 2 and 3, DeepSeek-V3, Mistral's [INST] template and Phi-3 (the
last two on the Llama 2 SentencePiece vocabulary) and Phi-4 (on the cl100k vocabulary): the ids of a
conversation are exactly the tokenization of its rendering, and the trained tokens, run by run, decode to each assistant message's content followed by its end-of-turn token and
nothing else (no role header, no template boilerplate such as Qwen3's empty think block).
"""

import json

import pytest

import real_tokenizers
from fasttune.data import load_sft
from fasttune.masks import IGNORE, TemplateError, tokenize_conversation

EOT = {"qwen3": "<|im_end|>", "qwen2.5": "<|im_end|>", "llama3": "<|eot_id|>", "gemma3": "<end_of_turn>",
       "gemma2": "<end_of_turn>", "deepseek_v3": "<｜end▁of▁sentence｜>", "mistral": "</s>", "phi3": "<|end|>",
       "phi4": "<|im_end|>"}
U, A, S = "user", "assistant", "system"
CONVERSATIONS = {
    "single": [(U, "What is 2 + 2?"), (A, "It is 4.")],
    "system": [(S, "You answer tersely."), (U, "Name a colour."), (A, "Blue.")],
    "multi_turn": [(U, "Hi!"), (A, "Hello, how can I help?"), (U, "Count to three."), (A, "One, two, three.")],
    "whitespace": [(U, "  spaced question \n"), (A, "\n It is 4.\n\n")],
    "non_english": [(U, "你好，世界有多大？"), (A, "世界很大。 مرحبا بالعالم")],
    "empty": [(U, "Say nothing."), (A, "")],
}


@pytest.fixture(scope="module", params=list(EOT))
def family(request):
    return request.param, real_tokenizers.load(request.param)


def _msgs(conv):
    return [{"role": r, "content": c} for r, c in conv]


def _runs(ids, labels):
    """The trained tokens, as one list per contiguous run."""
    runs, cur = [], []
    for t, lab in zip(ids, labels):
        if lab != IGNORE:
            assert lab == t
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    return runs + ([cur] if cur else [])


def _norm(text):
    return "".join(text.split())


TRIMMED = {"llama3", "gemma3", "gemma2"}  # these templates print every message's content stripped


def _printed(fam, msgs, i):
    """Message i's content as the family's template prints it (read off the templates): Llama 3 and
    Gemma strip it, Qwen3 drops the newlines that open an answer after the last user turn (it prints
    a think block before it), the others print it as it is."""
    text = msgs[i]["content"]
    if fam in TRIMMED:
        return text.strip()
    last_user = max(j for j, m in enumerate(msgs) if m["role"] == U)
    if fam == "qwen3" and msgs[i]["role"] == A and i > last_user:
        return text.lstrip("\n")
    return text


def expected_trained(tok, fam, msgs, rendered, first=0):
    """The token positions that must be trained: those overlapping an assistant message's content as
    printed, plus its end-of-turn token. Located here by searching the rendering in order for what the
    template is known to print (the code under test never searches for a response), so it checks the
    sentinel matching independently."""
    eot = EOT[fam]
    enc = tok(rendered, add_special_tokens=False, return_offsets_mapping=True)
    spans, cursor = [], 0
    for i, m in enumerate(msgs):
        text = _printed(fam, msgs, i)
        if m["role"] != A:
            cursor = rendered.index(text, cursor) + len(text)
            cursor += len(eot) if rendered.startswith(eot, cursor) else 0  # the turn's own end, if it has one
            continue
        at = rendered.index(eot, rendered.index(text, cursor) + len(text) if text else cursor)
        assert rendered[at - len(text) : at] == text, (rendered[cursor : at + len(eot)], text)
        if i >= first:
            spans.append((at - len(text), at + len(eot)))
        cursor = at + len(eot)
    return {j for j, (a, b) in enumerate(enc["offset_mapping"]) if any(max(a, s) < min(b, e) for s, e in spans)}


def _trained(labels):
    return {j for j, lab in enumerate(labels) if lab != IGNORE}


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_ids_and_masks(family, name):
    fam, tok = family
    msgs = _msgs(CONVERSATIONS[name])
    if fam in ("mistral", "gemma2") and name == "system":
        with pytest.raises(TemplateError, match="refuses"):  # their templates allow user/assistant only
            tokenize_conversation(tok, msgs, where="rec")
        return
    ids, labels = tokenize_conversation(tok, msgs, where="rec")
    rendered = tok.apply_chat_template(msgs, tokenize=False)
    assert ids == tok(rendered, add_special_tokens=False)["input_ids"]
    assert all(lab == t for t, lab in zip(ids, labels) if lab != IGNORE)
    assert _trained(labels) == expected_trained(tok, fam, msgs, rendered), [tok.decode(r) for r in _runs(ids, labels)]
    runs = _runs(ids, labels)
    answers = [m["content"] for m in msgs if m["role"] == A]
    assert len(runs) == len(answers), [tok.decode(r) for r in runs]
    for run, answer in zip(runs, answers):
        assert _norm(tok.decode(run)) == _norm(answer) + EOT[fam], (tok.decode(run), answer)


def test_train_on_last_and_all(family):
    fam, tok = family
    msgs = _msgs(CONVERSATIONS["multi_turn"])
    ids, labels = tokenize_conversation(tok, msgs, train_on="last_assistant")
    rendered = tok.apply_chat_template(msgs, tokenize=False)
    assert _trained(labels) == expected_trained(tok, fam, msgs, rendered, first=3)
    ids, labels = tokenize_conversation(tok, msgs, train_on="all")
    assert labels == ids


@pytest.mark.parametrize("answer", ["5 is larger.", "It is 3", "\nnl", " spaced"])
def test_pair_prompt_is_the_generation_prompt(family, answer):
    """A preference pair's ids are the tokenization of its whole rendering, and start with the
    tokenization of the prompt rendered with the generation prompt (so both sides share it, as
    inference feeds it). A response whose start merges with the prompt's last token (SentencePiece's
    word boundary, Qwen's newlines) cannot have both, and is refused."""
    fam, tok = family
    prompt = _msgs([(U, "Which is larger, 3 or 5?")])
    msgs = prompt + _msgs([(A, answer)])
    prompt_ids = tok(tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True),
                     add_special_tokens=False)["input_ids"]
    rendered = tok.apply_chat_template(msgs, tokenize=False)
    whole = tok(rendered, add_special_tokens=False)["input_ids"]
    if whole[: len(prompt_ids)] != prompt_ids:
        with pytest.raises(TemplateError, match="merge with the end of the prompt"):
            tokenize_conversation(tok, msgs, train_from=1, where="rec")
        return
    ids, labels = tokenize_conversation(tok, msgs, train_from=1)
    assert ids == whole and ids[: len(prompt_ids)] == prompt_ids
    assert all(lab == IGNORE for lab in labels[: len(prompt_ids)])
    assert _trained(labels) == expected_trained(tok, fam, msgs, rendered, first=1)


def test_sentencepiece_response_after_inst_is_tokenized_as_inference_sees_it():
    """The bug this replaced: on Mistral's [INST] template each piece was tokenized alone, so the
    answer after [/INST] became '▁It' where the whole conversation has 'It'."""
    tok = real_tokenizers.load("mistral")
    msgs = _msgs([(U, "Which is larger?"), (A, "It is 5")])
    for train_from in (0, 1):
        ids, labels = tokenize_conversation(tok, msgs, train_from=train_from)
        assert ids == tok(tok.apply_chat_template(msgs, tokenize=False), add_special_tokens=False)["input_ids"]
        assert tok.convert_ids_to_tokens([i for i, lab in zip(ids, labels) if lab != IGNORE])[0] == "It"


def test_qwen3_reasoning_and_history(tmp_path):
    """Qwen3 prints reasoning_content in a think block of the last turn (trained) and drops it from
    earlier turns; the empty think block it adds to a last turn without reasoning is not trained.
    With data.multi_turn = split each turn is its own example, rendered as generation renders it."""
    tok = real_tokenizers.load("qwen3")
    msgs = [{"role": U, "content": "2+2?"}, {"role": A, "content": "4", "reasoning_content": "Two and two."},
            {"role": U, "content": "3+3?"}, {"role": A, "content": "6", "reasoning_content": "Three and three."}]
    ids, labels = tokenize_conversation(tok, msgs)
    runs = [tok.decode(r) for r in _runs(ids, labels)]
    assert _norm(runs[0]) == "4<|im_end|>"  # history: as the template prints it, without the reasoning
    assert _norm(runs[1]) == _norm("Three and three.") + "</think>6<|im_end|>"
    assert "Two and two" not in tok.decode(ids)

    from fasttune.config import DataConfig

    path = tmp_path / "split.jsonl"
    path.write_text(json.dumps({"messages": msgs}) + "\n")
    examples, report = load_sft(path, tok, DataConfig(multi_turn="split"))
    assert len(examples) == 2
    first = [tok.decode(r) for r in _runs(examples[0].input_ids, examples[0].labels)]
    assert _norm(first[0]) == _norm("Two and two.") + "</think>4<|im_end|>"


def test_a_record_the_template_refuses_is_skipped_and_counted(tmp_path):
    tok = real_tokenizers.load("mistral")
    from fasttune.config import DataConfig

    path = tmp_path / "mixed.jsonl"
    good = {"messages": _msgs(CONVERSATIONS["single"])}
    bad = {"messages": _msgs(CONVERSATIONS["system"])}
    path.write_text("\n".join(json.dumps(r) for r in (good, bad, good)) + "\n")
    examples, report = load_sft(path, tok, DataConfig())
    assert len(examples) == 2 and len(report.skipped) == 1
    assert "mixed.jsonl:2" in report.skipped[0] and "refuses" in report.skipped[0]
    assert "1 records skipped" in report.summary()


def test_generation_stops_at_the_templates_end_of_turn(family):
    """Generation (GRPO sampling, generate, chat) stops at the token that ends an assistant turn in the
    template, which training teaches, as well as at eos: Phi-3 ends turns with <|end|>, not eos."""
    from fasttune.masks import stop_token_ids

    fam, tok = family
    stops = stop_token_ids(tok)
    assert tok.convert_tokens_to_ids(EOT[fam]) in stops and tok.eos_token_id in stops
