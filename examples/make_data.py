"""Generate the shipped example datasets (deterministic): `python examples/make_data.py`.

Small tasks with visible rules that a tiny model can pick up: reverse a word, upper-case a
phrase, add two numbers, repeat a word. The same examples are written in Alpaca, ShareGPT and
OpenAI-messages form.
"""

import json
import random
from pathlib import Path

WORDS = ("apple river stone cloud piano tiger lemon candle forest rocket window garden silver orange "
         "planet bridge castle dragon yellow summer winter butter marble copper shadow velvet").split()
SYSTEM = "You are a precise assistant. Answer with the result only."


def task(rng):
    kind = rng.choice(["reverse", "upper", "add", "repeat"])
    w = rng.choice(WORDS)
    if kind == "reverse":
        return "Reverse the letters of the word.", w, w[::-1]
    if kind == "upper":
        phrase = " ".join(rng.sample(WORDS, 2))
        return "Write the phrase in capital letters.", phrase, phrase.upper()
    if kind == "add":
        a, b = rng.randint(0, 50), rng.randint(0, 50)
        return "Add the two numbers.", f"{a} + {b}", str(a + b)
    return "Repeat the word three times.", w, " ".join([w] * 3)


def main():
    out = Path(__file__).parent / "data"
    out.mkdir(exist_ok=True)
    rng = random.Random(0)
    alpaca = [dict(zip(("instruction", "input", "output"), task(rng))) for _ in range(320)]
    train, held_out = alpaca[:300], alpaca[300:]
    with open(out / "sft_alpaca.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in train)
    with open(out / "sft_alpaca_eval.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in held_out)
    sharegpt, messages = [], []
    for _ in range(24):
        turns = [task(rng) for _ in range(2)]
        conv = [{"from": "system", "value": SYSTEM}]
        msgs = [{"role": "system", "content": SYSTEM}]
        for ins, inp, outp in turns:
            conv += [{"from": "human", "value": f"{ins}\n\n{inp}"}, {"from": "gpt", "value": outp}]
            msgs += [{"role": "user", "content": f"{ins}\n\n{inp}"}, {"role": "assistant", "content": outp}]
        sharegpt.append({"conversations": conv})
        messages.append({"messages": msgs})
    (out / "sft_sharegpt.json").write_text(json.dumps(sharegpt, indent=1, ensure_ascii=False) + "\n")
    with open(out / "sft_messages.jsonl", "w") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in messages)


def preference():
    """DPO pairs with a visible rule: the chosen answer is right and ends with "!", the rejected one
    is the same answer ending with "." (a tiny model can learn to prefer it)."""
    out = Path(__file__).parent / "data"
    rng = random.Random(1)
    pairs = []
    for _ in range(320):
        ins, inp, ans = task(rng)
        pairs.append({"prompt": f"{ins}\n\n{inp}", "chosen": ans + "!", "rejected": ans + "."})
    with open(out / "dpo_pairs.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in pairs[:300])
    with open(out / "dpo_pairs_eval.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in pairs[300:])
    sharegpt, openai = [], []
    for _ in range(24):
        (i1, x1, a1), (i2, x2, a2) = task(rng), task(rng)
        sharegpt.append({"conversations": [
            {"from": "human", "value": f"{i1}\n\n{x1}"},
            {"from": "gpt", "value": a1 + "!", "label": "chosen"}, {"from": "gpt", "value": a1 + ".", "label": "rejected"},
            {"from": "human", "value": f"{i2}\n\n{x2}"},
            {"from": "gpt", "value": a2 + "!", "label": "chosen"}, {"from": "gpt", "value": a2 + ".", "label": "rejected"}]})
        openai.append({"input": {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"{i1}\n\n{x1}"}]},
                       "preferred_output": [{"role": "assistant", "content": a1 + "!"}],
                       "non_preferred_output": [{"role": "assistant", "content": a1 + "."}]})
    (out / "dpo_sharegpt.json").write_text(json.dumps(sharegpt, indent=1) + "\n")
    with open(out / "dpo_openai.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in openai)


def unpaired():
    """KTO completions, each alone with a label: the same rule as the DPO pairs (an answer ending with
    "!" is desirable, one ending with "." is not), half of each, in random order."""
    out = Path(__file__).parent / "data"
    rng = random.Random(3)
    rows = []
    for _ in range(320):
        ins, inp, ans = task(rng)
        good = rng.random() < 0.5
        rows.append({"prompt": f"{ins}\n\n{inp}", "completion": ans + ("!" if good else "."), "label": good})
    with open(out / "kto_unpaired.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows[:300])
    with open(out / "kto_unpaired_eval.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows[300:])


def arithmetic():
    """GRPO prompts: small additions with their answers (for the built-in math_answer reward)."""
    out = Path(__file__).parent / "data"
    rng = random.Random(2)
    with open(out / "grpo_arithmetic.jsonl", "w") as f:
        for _ in range(200):
            a, b = rng.randint(0, 20), rng.randint(0, 20)
            f.write(json.dumps({"prompt": f"What is {a} + {b}? End with: Answer: <number>", "answer": str(a + b)}) + "\n")


if __name__ == "__main__":
    main()
    preference()
    unpaired()
    arithmetic()
