"""Masks from what inference sees: render a conversation with the chat template, tokenize that text,
and train the tokens of each trained message's rendered span.

The whole conversation is rendered once with the chat template and that text is tokenized (with
character offsets); the ids are exactly what generation sees. Each trained message's rendered span
(its content as the template printed it, trimmed or not, its reasoning, its end-of-turn token) is
located by rendering once more with a sentinel in place of each trained field and matching the two
renderings piece by piece (`trained_spans`); tokens overlapping a span are trained. Role headers,
template boilerplate (an empty think block, a default system prompt, a date line) and the other
messages are never trained. No response is searched for as a string. A conversation whose masks
cannot be built raises TemplateError (its record is skipped and counted by the caller).
"""

from .sources import DataError

IGNORE = -100


class TemplateError(DataError):
    """A conversation the chat template renders in a way its masks cannot be built for; the record is
    skipped and counted, not the run stopped."""


def chat_text(tokenizer, messages, add_generation_prompt=False, where="") -> str:
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
        text = chat_text(tokenizer, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": probe}])
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
    marked = chat_text(tokenizer, probe, where=where)
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
    full = chat_text(tokenizer, messages, where=where)
    spans = [] if train_on == "all" else trained_spans(tokenizer, messages, full, candidates, where)
    cut = 0
    if train_from:
        prompt = chat_text(tokenizer, messages[:train_from], add_generation_prompt=True, where=where)
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
