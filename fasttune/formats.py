"""Data formats: a record (Alpaca, ShareGPT, OpenAI messages) as a list of chat messages.

- alpaca:   {"instruction", "input"?, "output", "system"?, "history"?: [[user, assistant], ...]}
- sharegpt: {"conversations": [{"from": "system"|"human"|"gpt"|other, "value": ...}, ...]}
- messages: {"messages": [{"role": ..., "content": ..., "reasoning_content"?: ...}, ...]} (OpenAI; also
  "conversations" with role/content)

`data.roles` renames roles (custom ones, a narrator say, are kept). `as_messages` reads one field that
is either a string or a list of messages (a prompt, a chosen or rejected response).
"""

from .sources import DataError

SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


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


def as_messages(value, role, where, what, roles) -> list[dict]:
    """A field that is a string (one message of `role`) or a list of {role, content} messages (roles
    mapped through `roles`): a prompt, a chosen or rejected response, a completion."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value):
        return [{"role": roles.get(m["role"], m["role"]), "content": m["content"]} for m in value]
    raise DataError(f"{where}: {what} must be a string or a list of {{role, content}} messages")
