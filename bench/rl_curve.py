"""GRPO and RLOO on the real model, longer than the tests run them: the mean reward per step, plotted.

Both runs are `examples/smollm2/grpo.toml` (two-digit additions answered as "Answer: <n>", rewards
math_answer + format) on the fp32 base with LoRA, as tests/test_real_model.py runs it, for STEPS steps
with the same seed; they differ only in `grpo.advantage`. A third run at learning rate 0 (same prompts,
same sampling seeds) is the control: what the untrained model scores on the same prompts.

    python bench/rl_curve.py [--steps 30] [--out bench/results/rl]

Not part of `make bench` (a few minutes per run on 2 CPU cores); its curve and numbers are committed.
"""

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

RUNS = {"grpo": ['grpo.advantage="grpo"'], "rloo": ['grpo.advantage="rloo"'],
        "control (lr 0)": ['grpo.advantage="grpo"', "train.learning_rate=0.0"]}


def run(name, sets, steps, work: Path) -> dict:
    import test_real_model as real
    from fasttune.grpo import train_grpo

    out = work / name.split()[0]
    cfg = real.example("grpo", out, f"train.max_steps={steps}", "model.load_in_4bit=false",
                       "grpo.max_completion_len=12", f"run.save_every={steps}", 'data.eval=""', *sets)
    t = time.perf_counter()
    train_grpo(cfg, log=lambda *a, **k: None)
    rows = [json.loads(line) for line in open(out / "run" / "metrics.jsonl")]
    return {"rewards": [r["reward"] for r in rows], "seconds": round(time.perf_counter() - t, 1)}


def plot(curves: dict, png: Path, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    for name, c in curves.items():
        r = c["rewards"]
        avg = [sum(r[max(0, i - 4): i + 1]) / len(r[max(0, i - 4): i + 1]) for i in range(len(r))]
        line, = ax.plot(range(1, len(r) + 1), r, alpha=0.3)
        ax.plot(range(1, len(r) + 1), avg, color=line.get_color(), label=f"{name} (mean of 5 steps)")
    ax.set_xlabel("step")
    ax.set_ylabel("mean reward (math_answer + format)")
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "rl")
    args = ap.parse_args(argv)
    import tempfile

    from harness import env_info

    env = env_info()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        curves = {name: run(name, sets, args.steps, Path(tmp)) for name, sets in RUNS.items()}
    for name, c in curves.items():
        r = c["rewards"]
        half = len(r) // 2
        print(f"{name}: first half {sum(r[:half]) / half:.3f}, second half {sum(r[half:]) / (len(r) - half):.3f}, "
              f"{c['seconds']} s", flush=True)
    stem = args.out / f"{env['date']}-smollm2-grpo-rloo"
    stem.with_suffix(".json").write_text(json.dumps({"env": env, "steps": args.steps, "curves": curves}, indent=1))
    plot(curves, stem.with_suffix(".png"), f"SmolLM2-135M-Instruct, LoRA r16, 2 prompts x 8 completions per step; "
                                           f"{env['device']}, {env['date']}, {env['commit']}")
    print(f"saved {stem}.json and .png")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "bench"))
    sys.exit(main())
