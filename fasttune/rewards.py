"""Reward functions for GRPO: built-in verifiable rewards, and loading the user's own.

A reward function is called as TRL's GRPOTrainer calls it, `fn(prompts=[...], completions=[...],
completion_ids=[...], **columns)` (each column a list aligned with the completions, e.g. `answer`),
and returns one float per completion. Prompts given as messages are conversational: prompts are
then message lists and completions [{"role": "assistant", "content": ...}], as in TRL.
Built-in:
- math_answer: 1.0 when the completion's final answer (the content of the last \\boxed{...}, else
  its last number) equals the `answer` column numerically, else 0.0;
- format: 1.0 when the completion ends with an answer in the layout "Answer: <number>" or
  \\boxed{<number>}, else 0.0.
User functions: "path/to/file.py:function" or "package.module:function".
"""

import importlib
import importlib.util
import math
import re
from pathlib import Path

from .config import ConfigError

NUMBER = r"-?\d+(?:\.\d+)?(?:/\d+)?"


def _number(text):
    text = text.strip().replace(",", "")
    try:
        if "/" in text:
            a, b = text.split("/")
            return float(a) / float(b)
        return float(text)
    except (ValueError, ZeroDivisionError):
        return None


def final_answer(completion: str):
    """The completion's final answer as a number: the last \\boxed{...}, else the last number."""
    boxed = re.findall(r"\\boxed\{([^{}]*)\}", completion)
    if boxed:
        return _number(boxed[-1])
    nums = re.findall(NUMBER, completion.replace(",", ""))
    return _number(nums[-1]) if nums else None


def _text(completion):
    """A completion as text: TRL passes conversational ones as [{"role": "assistant", "content": ...}]."""
    return completion if isinstance(completion, str) else completion[-1]["content"]


def math_answer(prompts, completions, answer, **_):
    out = []
    for c, a in zip(map(_text, completions), answer):
        got, want = final_answer(c), _number(str(a))
        out.append(1.0 if got is not None and want is not None and math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-9)
                   else 0.0)
    return out


def format_reward(prompts, completions, **_):
    layout = re.compile(rf"(Answer:\s*{NUMBER}|\\boxed\{{{NUMBER}\}})\s*$")
    return [1.0 if layout.search(_text(c).strip()) else 0.0 for c in completions]


def digit_ratio(prompts, completions, **_):
    return [sum(ch.isdigit() for ch in c) / max(1, len(c)) for c in map(_text, completions)]


BUILTIN = {"math_answer": math_answer, "format": format_reward, "digit_ratio": digit_ratio}


def load_reward(spec: str):
    """A built-in name, "file.py:function" or "module:function"."""
    if spec in BUILTIN:
        return BUILTIN[spec]
    if ":" not in spec:
        raise ConfigError(f"grpo.reward_funcs: {spec!r} is neither a built-in ({', '.join(BUILTIN)}) nor "
                          "\"path/to/file.py:function\" or \"package.module:function\"")
    where, name = spec.rsplit(":", 1)
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_file():
            raise ConfigError(f"grpo.reward_funcs: {spec!r}: no such file {path}")
        mod_spec = importlib.util.spec_from_file_location(f"fasttune_reward_{path.stem}", path)
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as e:
            raise ConfigError(f"grpo.reward_funcs: {spec!r}: cannot import {where} ({e})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(f"grpo.reward_funcs: {spec!r}: {where} has no function {name!r}")
    fn.__fasttune_name__ = spec
    return fn


def call_reward(fn, name, prompts, completions, columns):
    """Call one reward function and check what it returns; errors name the function and an example."""
    from .train import TrainingError

    try:
        out = fn(prompts=prompts, completions=completions, **columns)
    except Exception as e:  # noqa: BLE001 - the user's code: report it, with the example
        raise TrainingError(f"reward function {name} raised {type(e).__name__}: {e} (on the completion "
                            f"{_text(completions[0])[:80]!r} of the prompt {str(prompts[0])[-80:]!r})") from e
    out = list(out) if out is not None else []
    if len(out) != len(completions):
        raise TrainingError(f"reward function {name} returned {len(out)} values for {len(completions)} completions")
    vals = []
    for i, v in enumerate(out):
        if v is None:  # TRL's "does not apply to this sample": left out of the sum and of the means
            vals.append(math.nan)
            continue
        try:
            v = float(v)
        except (TypeError, ValueError):
            raise TrainingError(f"reward function {name} returned {v!r} (not a number) for the completion "
                                f"{_text(completions[i])[:80]!r}") from None
        if not math.isfinite(v):
            raise TrainingError(f"reward function {name} returned {v} for the completion {_text(completions[i])[:80]!r}")
        vals.append(v)
    return vals
