"""Writes the small data files of examples/smollm2/ (deterministic): `python examples/smollm2/make_data.py`.

Three tasks SmolLM2-135M-Instruct does not do as asked before training:
- SFT: answer an addition with the sum, then a final line "#### <sum>" (GSM8K's answer layout);
- DPO: the same questions; chosen answers end with that final line, rejected ones are the same
  sentence without it;
- GRPO: two-digit addition answered with one line "Answer: <sum>" (rewards: math_answer + format).
"""

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent / "data"


def additions(seed, n):
    rng = random.Random(seed)
    seen, out = set(), []
    while len(out) < n:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        if (a, b) not in seen:
            seen.add((a, b))
            out.append((a, b))
    return out


def sft(a, b):
    return {"messages": [{"role": "user", "content": f"What is {a} + {b}?"},
                         {"role": "assistant", "content": f"{a} + {b} = {a + b}\n#### {a + b}"}]}


def dpo(a, b):
    return {"prompt": f"What is {a} + {b}?", "chosen": f"{a} + {b} = {a + b}\n#### {a + b}",
            "rejected": f"{a} + {b} = {a + b}"}


def grpo(a, b):
    return {"prompt": [{"role": "user", "content": f"What is {a} + {b}? Reply with one line: Answer: <number>"}],
            "answer": str(a + b)}


def write(name, rows):
    (HERE / name).write_text("".join(json.dumps(r) + "\n" for r in rows))


def main():
    HERE.mkdir(exist_ok=True)
    pairs = additions(0, 96)
    train, held = pairs[:64], pairs[64:]
    write("sft_train.jsonl", [sft(a, b) for a, b in train])
    write("sft_eval.jsonl", [sft(a, b) for a, b in held[:16]])
    write("dpo_train.jsonl", [dpo(a, b) for a, b in train])
    write("dpo_eval.jsonl", [dpo(a, b) for a, b in held[:16]])
    write("grpo_train.jsonl", [grpo(a, b) for a, b in train])
    write("grpo_eval.jsonl", [grpo(a, b) for a, b in held[:16]])
    write("prompts.jsonl", [{"prompt": f"What is {a} + {b}?"} for a, b in held[16:24]])


if __name__ == "__main__":
    main()
