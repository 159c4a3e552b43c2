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



def trl_style(completions, **kwargs):
    """Written as TRL's documentation writes a reward function for conversational prompts; it checks
    that it gets what TRL's GRPOTrainer passes."""
    prompts = kwargs["prompts"]
    assert isinstance(prompts[0], list) and prompts[0][-1]["role"] == "user", prompts[0]
    assert len(kwargs["completion_ids"]) == len(completions) and "answer" in kwargs, sorted(kwargs)
    return [-abs(20 - len(completion[0]["content"])) / 20 for completion in completions]


def fails_on_rank_1(prompts, completions, **_):
    """Fails during training on one process of a torchrun job (the check before training passes)."""
    import os

    if os.environ.get("RANK") == "1" and completions != ["Answer: 0"] * len(completions):
        raise ValueError("rank 1 met a record it cannot score")
    return [0.0] * len(completions)


def trl_plain(prompts, completions, **kwargs):
    """TRL's standard (not conversational) format: the prompt strings as written in the data, no template."""
    assert all(isinstance(p, str) and "<|im_start|>" not in p for p in prompts), prompts[0]
    assert all(isinstance(c, str) for c in completions)
    return [float(len(c)) for c in completions]


def only_even(prompts, completions, **_):
    """None where it does not apply (as TRL allows): every second completion."""
    return [1.0 if i % 2 == 0 else None for i in range(len(completions))]


def overflows_on_rank_1(prompts, completions, **_):
    """Finite rewards whose advantages overflow the loss on one process of a torchrun job only."""
    import os

    if os.environ.get("RANK") == "1" and completions != ["Answer: 0"] * len(completions):
        return [3e38 if i % 2 == 0 else -3e38 for i in range(len(completions))]
    return [0.0] * len(completions)
