"""Reward functions the GRPO tests load by path ("tests/grpo_rewards.py:name")."""


def likes_x(prompts, completions, **_):
    """A task the tiny model learns in a few steps: the share of 'x' in the completion."""
    return [c.count("x") / max(1, len(c)) for c in completions]


def raises(prompts, completions, **_):
    raise KeyError("answer_column")


def too_few(prompts, completions, **_):
    return [0.0]


def gives_nan(prompts, completions, **_):
    return [float("nan")] * len(completions)
